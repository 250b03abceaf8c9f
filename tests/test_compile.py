"""``torch.compile`` of a wrapped model: the OCD forward (conditioning pass, generation, the pass
with the generated deltas) compiles and gives what the eager model gives.

The CI uses the cheap ``aot_eager`` backend (graph capture and AOT autograd, no code
generation): it checks that dynamo traces the wrapped model's forward, with graph breaks where
it must, and that the traced pieces compute the same values. The speed of the ``inductor``
backend is measured by ``python -m benchmarks.speed --compile`` (docs/performance.md).
"""

from __future__ import annotations

import torch
from conftest import mlp_case

import ocdwrap
from ocdwrap.hypernet import OCDHyperNetwork


def _wrapped(delta: str) -> tuple[ocdwrap.OCDModel, torch.Tensor]:
    case = mlp_case()
    cfg = ocdwrap.OCDConfig(delta=delta, mlp_hidden=32, cond_dim=16, unet_channels=(4, 8))
    model = ocdwrap.wrap(
        case.make(), layer="fc2", config=cfg, sampling=ocdwrap.SamplingConfig(seed=0)
    )
    x = case.inputs(8)
    cond, _ = model.conditioning(x)
    torch.manual_seed(0)
    model.hypernet = OCDHyperNetwork(
        cfg, kind="linear", weight_shape=model.weight_shape, dims=cond.dims
    ).eval()
    with torch.no_grad():  # an untrained generator's output layer is zero: make it generate
        for p in model.hypernet.parameters():
            p.normal_(0, 0.1)
    return model, x


def test_compiled_wrapped_model_gives_the_eager_output() -> None:
    """Rank-one deltas, the CPU default (the full-matrix UNet path compiles too; tracing the
    UNet takes minutes on a 2-core CI machine, so it is not run here)."""
    torch._dynamo.reset()
    model, x = _wrapped("rank1")
    with torch.no_grad():
        eager = model(x)
        with model.disable_adapter():
            base = model(x)
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(x)
        again = compiled(x)  # the second call runs the cached graphs
    assert not torch.allclose(eager, base)  # the generated deltas change the output
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)
