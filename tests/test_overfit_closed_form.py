"""The closed-form Adam step of collection (a Linear layer on one input vector per sample).

The per-sample gradient is g xᵀ, so Adam's moments stay M xᵀ and V (x²)ᵀ and each update
element is -lr/bc1 · M_o x_i / (sqrt(V_o / bc2) |x_i| + eps). ``_adam_outer_update`` evaluates it
without any (B, out, in) gradient or moment; it must agree with the element-wise mirror of
``torch.optim.Adam`` (``_adam_update`` on the formed gradient) to rounding, and collections
record which formula made them.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import mlp_case

import ocdwrap
from ocdwrap.errors import CollectionExistsError
from ocdwrap.overfit import (
    ADAM_OUTER_FORMULA,
    ADAM_OUTER_FORMULA_V1,
    _adam_outer_update,
    _adam_update,
    _input_terms,
)

CE = torch.nn.CrossEntropyLoss(reduction="none")
collect_module = importlib.import_module("ocdwrap.collect")


def _inputs(B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(B, n, generator=g))  # ReLU zeros, as after an activation
    x[:, 0] = 0.0  # a whole zero column
    x[:, 1] = 1e-7  # inputs so small that eps dominates the denominator
    x[:, 2] = -3.0  # negative inputs
    return x


@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.0])
def test_closed_form_equals_element_wise_adam(eps: float) -> None:
    B, out, n, lr, betas = 16, 12, 10, 5e-4, (0.9, 0.999)
    x = _inputs(B, n, 0)
    if eps == 0:  # x_i = 0 gives 0/0 in both formulas (and in torch.optim.Adam): nonzero inputs
        x = x + (x == 0).float()
    ref, fast = torch.zeros(B, out, n), torch.zeros(B, out, n)
    m_full, v_full = torch.zeros(B, out, n), torch.zeros(B, out, n)
    m, v = torch.zeros(B, out), torch.zeros(B, out)
    buf = torch.empty(B, out, n)
    g_rng = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        # gradients over six orders of magnitude, and outputs whose gradient is exactly zero
        g = torch.randn(B, out, generator=g_rng) * 10 ** torch.empty(B, out).uniform_(
            -6, 0, generator=g_rng
        )
        if eps:  # (with eps = 0 a zero gradient is 0/0 in torch.optim.Adam too)
            g[:, :2] = 0.0
        _adam_update(ref, g.unsqueeze(2) * x.unsqueeze(1), m_full, v_full, step, lr, betas, eps)
        _adam_outer_update(fast, (g, x), m, v, step, lr, betas, eps, buf)
    assert torch.isfinite(fast).all()
    assert (fast[:, :, x.eq(0).all(0)] == 0).all()  # zero inputs: exact zeros
    # rounding only: each step moves an element by at most ~lr
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * lr)


def test_precomputed_input_terms_give_the_same_step() -> None:
    B, out, n = 8, 6, 5
    x = _inputs(B, n, 2)
    g = torch.randn(B, out)
    a, b = torch.zeros(B, out, n), torch.zeros(B, out, n)
    for delta, outer in ((a, (g, x)), (b, (g, x, *_input_terms(x, 1e-8)))):
        m, v = torch.zeros(B, out), torch.zeros(B, out)
        _adam_outer_update(delta, outer, m, v, 1, 5e-4, (0.9, 0.999), 1e-8, torch.empty(B, out, n))
    assert torch.equal(a, b)


def test_collection_identity_names_the_formula(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    identity = collect_module._identity(m, m.config, 4096)
    assert identity["adam_outer_formula"] == ADAM_OUTER_FORMULA
    sgd = m.config.replace(overfit_optimizer="sgd")
    assert "adam_outer_formula" not in collect_module._identity(m, sgd, 4096)


def test_a_collection_made_with_another_formula_is_not_resumed(tmp_path, monkeypatch) -> None:
    """A partial collection whose identity names another Adam formula is refused rather than
    continued with differently rounded deltas (one made by 0.1.0, which names none, continues
    with 0.1.0's formula: tests/test_compat.py)."""
    case = mlp_case()
    x, y = case.inputs(40), case.targets(40)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    m = ocdwrap.wrap(case.make(), layer="fc2", config=ocdwrap.OCDConfig())
    monkeypatch.setattr(collect_module, "ADAM_OUTER_FORMULA", ADAM_OUTER_FORMULA_V1)
    ocdwrap.collect(m, loader, CE, tmp_path / "d", max_samples=16, progress=False)
    monkeypatch.undo()
    with pytest.raises(CollectionExistsError):
        ocdwrap.collect(m, loader, CE, tmp_path / "d", progress=False)
    store = ocdwrap.collect(m, loader, CE, tmp_path / "d", overwrite=True, progress=False)
    assert len(store) == 40


def test_the_earlier_formula_gives_the_same_deltas_up_to_rounding() -> None:
    case = mlp_case()
    m = ocdwrap.wrap(case.make(), layer="fc2")
    x, y = case.inputs(16), case.targets(16)
    new = ocdwrap.overfit_batch(m, x, y, CE).delta
    old = ocdwrap.overfit_batch(m, x, y, CE, adam_formula=ADAM_OUTER_FORMULA_V1).delta
    torch.testing.assert_close(new, old, rtol=0, atol=1e-5 * m.config.overfit_lr)
    with pytest.raises(ocdwrap.errors.ConfigError):
        ocdwrap.overfit_batch(m, x, y, CE, adam_formula="another")


def test_a_reused_workspace_gives_the_same_deltas() -> None:
    """collect passes one workspace for its whole run: its buffers are reused batch after batch
    (a smaller last batch uses part of them), with the same deltas as fresh buffers."""
    case = mlp_case()
    m = ocdwrap.wrap(case.make(), layer="fc2")
    workspace: dict = {}
    for B in (16, 16, 5):
        x, y = case.inputs(B), case.targets(B)
        fresh = ocdwrap.overfit_batch(m, x, y, CE).delta
        reused = ocdwrap.overfit_batch(m, x, y, CE, workspace=workspace).delta
        assert torch.equal(fresh, reused)
    assert set(workspace) == {"delta", "buf"}


def test_collection_identity_names_the_rows_formula_and_never_mixes_two(
    tmp_path, monkeypatch
) -> None:
    """rho and the rank-one energy ("sums") round differently from the two-pass formula the
    collections made before it used: a partial collection naming another formula is refused,
    and the two agree to about 1e-6 (one made before the record names none and continues with
    the two-pass formula: tests/test_compat.py)."""
    case = mlp_case()
    x, y = case.inputs(40), case.targets(40)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    m = ocdwrap.wrap(case.make(), layer="fc2", config=ocdwrap.OCDConfig())
    assert collect_module._identity(m, m.config, 4096)["rows_formula"] == "sums"
    calls: list[int] = []  # batches whose rho came from the sums
    from_sums = collect_module.scale_from_sums

    def counted(*a, **kw):
        calls.append(1)
        return from_sums(*a, **kw)

    monkeypatch.setattr(collect_module, "ROWS_FORMULA", collect_module.ROWS_FORMULA_V1)
    monkeypatch.setattr(collect_module, "scale_from_sums", counted)
    old = ocdwrap.collect(m, loader, CE, tmp_path / "old", progress=False).load()
    ocdwrap.collect(m, loader, CE, tmp_path / "d", max_samples=16, progress=False)
    assert calls == []  # the two-pass formula throughout
    monkeypatch.setattr(collect_module, "ROWS_FORMULA", "sums")
    with pytest.raises(CollectionExistsError):
        ocdwrap.collect(m, loader, CE, tmp_path / "d", progress=False)
    new = ocdwrap.collect(m, loader, CE, tmp_path / "new", progress=False).load()
    assert len(calls) == len(loader)  # every batch of a new collection
    for k in ("index", "v", "cond_in", "cond_act", "cond_out"):
        assert torch.equal(new[k], old[k]), k
    for k in ("rho", "u"):
        torch.testing.assert_close(new[k], old[k], rtol=1e-5, atol=0, msg=k)
    torch.testing.assert_close(new["energy"], old["energy"], rtol=0, atol=2e-6)
