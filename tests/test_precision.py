"""Precision and devices: a bfloat16 / float16 base works, OCD's own networks stay float32,
outputs come back in the base model's dtype, and everything follows the base model's device."""

from __future__ import annotations

import pytest
import torch
from conftest import bert_inputs, make_bert, make_lenet, make_mlp
from torch import nn

import ocdwrap

LOW = [torch.bfloat16, torch.float16]


def ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(pred.float(), y, reduction="none")


def tiny(**kw) -> ocdwrap.OCDConfig:
    base = dict(unet_channels=(8, 8), mlp_hidden=16, cond_dim=16)
    base.update(kw)
    return ocdwrap.OCDConfig(**base)


def hyper_dtypes(model: ocdwrap.OCDModel) -> set[torch.dtype]:
    return {t.dtype for t in model.hypernet.state_dict().values() if t.is_floating_point()}


def fitted(make, layer, x, y, tmp_path, dtype, **cfg) -> ocdwrap.OCDModel:
    model = ocdwrap.wrap(make().to(dtype), layer=layer, config=tiny(**cfg))
    store = ocdwrap.collect(model, [(x, y)], ce, tmp_path / "deltas", progress=False)
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=4, batch_size=8), progress=False)
    return model


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    "make,layer,shape,delta",
    [
        (make_mlp, "fc2", (10,), "rank1"),
        (make_mlp, "fc2", (10,), "full"),
        (make_lenet, "conv2", (1, 28, 28), "full"),
    ],
    ids=["mlp-rank1", "mlp-full", "lenet-conv"],
)
def test_low_precision_base_end_to_end(make, layer, shape, delta, dtype, tmp_path):
    x = torch.randn(12, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.arange(12) % 3
    model = fitted(make, layer, x, y, tmp_path, dtype, delta=delta)
    assert hyper_dtypes(model) == {torch.float32}
    # the collected data are stored as float32
    assert ocdwrap.DeltaStore(tmp_path / "deltas").load(["rho"])["rho"].dtype == torch.float32
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    with model.disable_adapter():
        base_out = model(x)
    assert base_out.dtype == dtype
    ens = model.ensemble(x, num_draws=3, rng=torch.Generator().manual_seed(0))
    assert ens.output.dtype == dtype
    # save, and load into a fresh base of the same dtype
    model.save_pretrained(tmp_path / "adapter")
    again = ocdwrap.OCDModel.from_pretrained(make().to(dtype), tmp_path / "adapter")
    assert hyper_dtypes(again) == {torch.float32}
    with model.sampling(seed=3), again.sampling(seed=3):
        torch.testing.assert_close(again(x), model(x))


def test_low_precision_deltas_match_float32(tmp_path):
    """Overfitting a bf16 base gives (nearly) the deltas of the float32 base."""
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    stores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ocdwrap.wrap(make_mlp().to(dtype), layer="fc2", config=tiny(delta="rank1"))
        stores[dtype] = ocdwrap.collect(
            model, [(x.to(dtype), y)], ce, tmp_path / str(dtype), progress=False
        ).load(["u", "rho"])
    u32, u16 = stores[torch.float32]["u"], stores[torch.bfloat16]["u"]
    cos = nn.functional.cosine_similarity(u32, u16, dim=1)
    assert cos.min() > 0.95, cos
    r32, r16 = stores[torch.float32]["rho"], stores[torch.bfloat16]["rho"]
    torch.testing.assert_close(r16, r32, rtol=0.1, atol=0.0)


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_casting_the_model_casts_the_base_only(cast, tmp_path):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    model = fitted(make_mlp, "fc2", x, torch.arange(8) % 3, tmp_path, torch.float32, delta="rank1")
    dtype = {"to": torch.bfloat16, "half": torch.float16, "bfloat16": torch.bfloat16}[cast]
    if cast == "to":
        model.to(dtype)
    else:
        getattr(model, cast)()
    assert next(model.base_model.parameters()).dtype == dtype
    assert hyper_dtypes(model) == {torch.float32}
    assert model(x.to(dtype)).dtype == dtype
    model.float()
    assert model(x).dtype == torch.float32


def test_hypernet_stays_float32_under_autocast(tmp_path):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    model = fitted(make_mlp, "fc2", x, torch.arange(8) % 3, tmp_path, torch.float32, delta="rank1")
    seen: list[torch.dtype] = []
    handle = model.hypernet.ema.encoder.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    handle.remove()
    assert seen == [torch.float32]
    assert out.dtype == torch.bfloat16  # the base model ran under autocast, as asked


def test_hypernet_cast_on_purpose(tmp_path):
    """A user may put OCD's networks in bf16 explicitly; generation then runs in bf16."""
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    model = fitted(make_mlp, "fc2", x, torch.arange(8) % 3, tmp_path, torch.float32, delta="rank1")
    model.hypernet.to(torch.bfloat16)
    model.to(torch.float16)  # casting the whole model leaves the hypernetwork's choice alone
    assert hyper_dtypes(model) == {torch.bfloat16}
    out = model(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out.float()).all()


def test_bf16_hugging_face_classifier(tmp_path):
    inputs = bert_inputs(6)
    y = torch.arange(6) % 3
    model = ocdwrap.wrap(make_bert().to(torch.bfloat16), layer="classifier", config=tiny())
    store = ocdwrap.collect(model, [({**inputs, "labels": y})], ce, tmp_path / "d", progress=False)
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=4, batch_size=8), progress=False)
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    assert hyper_dtypes(model) == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_base_device(tmp_path):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 3
    model = fitted(make_mlp, "fc2", x, y, tmp_path, torch.float32, delta="rank1")
    model.to("cuda", torch.bfloat16)
    assert {t.device.type for t in model.hypernet.state_dict().values()} == {"cuda"}
    assert hyper_dtypes(model) == {torch.float32}
    out = model(x.cuda().bfloat16())
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    # collect and fit on the device the base lives on
    store = ocdwrap.collect(
        model, [(x.bfloat16(), y)], ce, tmp_path / "gpu", overwrite=True, progress=False
    )
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=4, batch_size=8), progress=False)
    assert next(model.hypernet.parameters()).device.type == "cuda"
    model.save_pretrained(tmp_path / "adapter")
    again = ocdwrap.OCDModel.from_pretrained(
        make_mlp().to("cuda", torch.bfloat16), tmp_path / "adapter"
    )
    assert next(again.hypernet.parameters()).device.type == "cuda"
