"""Vectorized per-sample overfitting and the on-disk collection."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import bert_case, lenet_conv_case, lenet_linear_case, mlp_case
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.errors import (
    CollectionExistsError,
    EmptyDataError,
    LossShapeError,
    UnsupportedLayerError,
)

CE = torch.nn.CrossEntropyLoss(reduction="none")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(
    "case", [mlp_case(), lenet_linear_case(), lenet_conv_case(), bert_case()], ids=lambda c: c.name
)
def test_batch_equals_one_at_a_time(case, optimizer: str) -> None:
    cfg = ocdwrap.OCDConfig(
        overfit_optimizer=optimizer, overfit_lr=1e-2 if optimizer == "sgd" else 5e-4
    )
    model = ocdwrap.wrap(case.make(), layer=case.layer, config=cfg)
    B = 16 if case.name != "bert-classifier" else 6
    x, y = case.inputs(B), case.targets(B)
    res = ocdwrap.overfit_batch(model, x, y, case.loss)
    ref = ocdwrap.overfit_one(
        model, x, y, case.loss
    )  # torch.optim on a weight copy, one sample at a time
    assert res.delta.shape == (B, *model.weight_shape)
    assert res.delta.abs().max() > 1e-6
    assert (res.delta - ref).abs().max() < 1e-5
    assert (
        res.loss_after < res.loss_before
    ).float().mean() > 0.8  # overfitting lowers each sample's loss


def _loader(n: int = 40, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=batch)


def _store_tensors(store: ocdwrap.DeltaStore) -> dict[str, torch.Tensor]:
    return store.load()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_collect_batch16_equals_batch1(tmp_path, optimizer: str) -> None:
    cfg = ocdwrap.OCDConfig(overfit_optimizer=optimizer)
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
    a = ocdwrap.collect(
        m, _loader(batch=16), CE, tmp_path / "a", progress=False, shard_size=16
    ).load()
    b = ocdwrap.collect(
        m, _loader(batch=1), CE, tmp_path / "b", progress=False, shard_size=16
    ).load()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        assert (a[k].float() - b[k].float()).abs().max() < 1e-5, k


def test_collect_writes_manifest_and_shards(tmp_path) -> None:
    cfg = ocdwrap.OCDConfig(delta="full", overfit_optimizer="sgd", overfit_lr=0.05)
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
    store = ocdwrap.collect(m, _loader(), CE, tmp_path / "c", progress=False, shard_size=16)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["complete"] and len(store) == 40
    assert manifest["dims"] == {"cond_in": 32, "cond_act": 16, "cond_out": 3}
    data = store.load()
    # the normalised delta has unit per-element std, and rho * delta_hat is the raw delta
    assert torch.allclose(
        data["delta"].reshape(40, -1).std(1, unbiased=False), torch.ones(40), atol=1e-4
    )
    x, y = next(iter(_loader(batch=40)))
    raw = ocdwrap.overfit_batch(m, x, y, CE).delta
    torch.testing.assert_close(
        data["delta"] * data["rho"].view(-1, 1, 1), raw, rtol=1e-4, atol=1e-7
    )
    # the structural fact: with SGD a Linear delta on vector inputs is rank one
    assert manifest["summary"]["top_singular_energy"]["min"] >= 0.9999
    # and the stored factors rebuild it
    rebuilt = data["u"].unsqueeze(2) * data["v"].unsqueeze(1)
    torch.testing.assert_close(rebuilt, data["delta"], rtol=1e-3, atol=1e-5)


class _Interrupted(Exception):
    pass


def _interrupting(loader: DataLoader, after: int):
    for i, batch in enumerate(loader):
        if i == after:
            raise _Interrupted
        yield batch


def test_interrupt_and_resume_equals_uninterrupted(tmp_path) -> None:
    cfg = ocdwrap.OCDConfig()
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
    full = ocdwrap.collect(
        m, _loader(batch=8), CE, tmp_path / "full", progress=False, shard_size=16
    ).load()
    with pytest.raises(_Interrupted):
        ocdwrap.collect(
            m,
            _interrupting(_loader(batch=8), after=3),
            CE,
            tmp_path / "part",
            progress=False,
            shard_size=16,
        )
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert (
        not partial["complete"] and len(partial["shards"]) == 1
    )  # 24 samples seen, one full shard
    resumed = ocdwrap.collect(
        m, _loader(batch=8), CE, tmp_path / "part", progress=False, shard_size=16
    ).load()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_refuses_other_collection_unless_overwrite(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    ocdwrap.collect(m, _loader(), CE, tmp_path / "d", progress=False, shard_size=16)
    before = (tmp_path / "d" / "manifest.json").read_text()
    other = ocdwrap.wrap(mlp_case().make(), layer="fc1")
    with pytest.raises(CollectionExistsError, match="overwrite=True"):
        ocdwrap.collect(other, _loader(), CE, tmp_path / "d", progress=False, shard_size=16)
    assert (tmp_path / "d" / "manifest.json").read_text() == before
    store = ocdwrap.collect(
        other, _loader(), CE, tmp_path / "d", overwrite=True, progress=False, shard_size=16
    )
    assert store.layer == "fc1"


def test_refuses_a_collection_made_with_other_conditioning_pooling(tmp_path) -> None:
    """output_layout / output_grid / layer_calls change what the stored conditioning holds: a
    collection made with other values is refused (a default config's identity is unchanged, so
    collections made before these settings existed still resume)."""
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    ocdwrap.collect(m, _loader(), CE, tmp_path / "d", progress=False, shard_size=16)
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert "output_grid" not in manifest["identity"]
    other = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(output_grid=2))
    with pytest.raises(CollectionExistsError, match="overwrite=True"):
        ocdwrap.collect(other, _loader(), CE, tmp_path / "d", progress=False, shard_size=16)
    ocdwrap.collect(
        m, _loader(), CE, tmp_path / "d", progress=False, shard_size=16
    )  # same settings: resumes


def test_refuses_reordered_data_on_resume(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig())
    with pytest.raises(_Interrupted):
        ocdwrap.collect(
            m,
            _interrupting(_loader(batch=8), after=3),
            CE,
            tmp_path / "p",
            progress=False,
            shard_size=16,
        )
    with pytest.raises(CollectionExistsError, match="different data"):
        ocdwrap.collect(
            m, _loader(batch=8, seed=1), CE, tmp_path / "p", progress=False, shard_size=16
        )


def test_complete_collection_is_reused(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    ocdwrap.collect(m, _loader(), CE, tmp_path / "r", progress=False, shard_size=16)
    mtime = os.path.getmtime(tmp_path / "r" / "manifest.json")
    ocdwrap.collect(m, _loader(), CE, tmp_path / "r", progress=False, shard_size=16)
    assert os.path.getmtime(tmp_path / "r" / "manifest.json") == mtime


def test_conv_target_stores_full_matrix(tmp_path) -> None:
    case = lenet_conv_case()
    m = ocdwrap.wrap(case.make(), layer="conv2", config=ocdwrap.OCDConfig(delta="full"))
    loader = DataLoader(TensorDataset(case.inputs(6), case.targets(6)), batch_size=3)
    store = ocdwrap.collect(m, loader, CE, tmp_path / "conv", progress=False, shard_size=16)
    assert store.load(["delta"])["delta"].shape == (6, 16, 6 * 5 * 5)
    assert "u" not in store.keys and "energy" not in store.keys


def test_rank1_on_conv_is_a_clear_error(tmp_path) -> None:
    case = lenet_conv_case()
    m = ocdwrap.wrap(case.make(), layer="conv2", config=ocdwrap.OCDConfig(delta="rank1"))
    loader = DataLoader(TensorDataset(case.inputs(2), case.targets(2)), batch_size=2)
    with pytest.raises(UnsupportedLayerError, match="higher rank"):
        ocdwrap.collect(m, loader, CE, tmp_path / "x", progress=False, shard_size=16)


def test_mean_loss_is_refused(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    with pytest.raises(LossShapeError, match="reduction='none'"):
        ocdwrap.collect(
            m, _loader(), torch.nn.CrossEntropyLoss(), tmp_path / "m", progress=False, shard_size=16
        )


def test_sum_loss_is_accepted(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(delta="full"))
    a = ocdwrap.collect(
        m,
        _loader(),
        torch.nn.CrossEntropyLoss(reduction="sum"),
        tmp_path / "s",
        progress=False,
        shard_size=16,
    )
    b = ocdwrap.collect(m, _loader(), CE, tmp_path / "n", progress=False, shard_size=16)
    assert (a.load()["delta"] - b.load()["delta"]).abs().max() < 1e-5


def test_empty_loader_is_a_clear_error(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    with pytest.raises(EmptyDataError, match="no samples"):
        ocdwrap.collect(m, [], CE, tmp_path / "e", progress=False, shard_size=16)


class _Regressor(torch.nn.Module):
    """y = head(x): a layer with one output, whose Adam delta is lr * sign(residual) * sign(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).squeeze(-1)


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred, y, reduction="none")


def _one_output_loader(positive: int, mixed: int) -> DataLoader:
    """``positive`` rows whose inputs are all > 0 (a constant-sign delta), ``mixed`` rows not."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(positive, 4, generator=g) + 0.1, torch.randn(mixed, 4, generator=g)])
    x[positive:, 0], x[positive:, 1] = 1.0, -1.0  # at least one sign change in every mixed row
    return DataLoader(TensorDataset(x, torch.randn(len(x), generator=g) * 3), batch_size=16)


@pytest.mark.parametrize("delta", ["rank1", "full"])
def test_rms_normalisation_has_unit_size(tmp_path, delta: str) -> None:
    cfg = ocdwrap.OCDConfig(delta=delta, delta_normalization="rms")
    model = ocdwrap.wrap(_Regressor(), layer="head", config=cfg)
    store = ocdwrap.collect(
        model, _one_output_loader(8, 8), _mse, tmp_path, progress=False, shard_size=16
    )
    assert store.manifest["identity"]["delta_normalization"] == "rms"
    t = store.load()
    if delta == "rank1":
        normalised = t["u"].unsqueeze(2) * t["v"].unsqueeze(1)
    else:
        normalised = t["delta"]
    rms = normalised.reshape(len(normalised), -1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_constant_deltas_under_std_normalisation_are_named_and_left_out(tmp_path, caplog) -> None:
    cfg = ocdwrap.OCDConfig(delta="rank1")
    model = ocdwrap.wrap(_Regressor(), layer="head", config=cfg)
    store = ocdwrap.collect(
        model, _one_output_loader(8, 24), _mse, tmp_path / "a", progress=False, shard_size=16
    )
    with caplog.at_level("WARNING", logger="ocdwrap"):
        ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=5), progress=False)
    assert "8 of 32 deltas" in caplog.text and "delta_normalization='rms'" in caplog.text
    assert model.hypernet.target_std < 10  # the constant rows did not set the target scale
    cond_delta = model.generate(
        ocdwrap.capture.Conditioning(
            store.load()["cond_in"], store.load()["cond_act"], store.load()["cond_out"]
        )
    )
    assert torch.isfinite(cond_delta.u).all() and cond_delta.u.abs().max() < 1.0

    strict = ocdwrap.wrap(_Regressor(), layer="head", config=cfg)
    store = ocdwrap.collect(
        strict, _one_output_loader(8, 24), _mse, tmp_path / "b", progress=False, shard_size=16
    )
    with pytest.raises(ocdwrap.errors.NonFiniteError, match="delta_normalization='rms'"):
        ocdwrap.fit(strict, store, ocdwrap.FitArgs(steps=5, on_nonfinite="raise"), progress=False)


def test_rank1_energy_from_the_known_right_factor_equals_the_svd() -> None:
    """Started from v, one power iteration plus the bracket (or the SVD where the bracket is
    loose) gives s1² / ‖Δ‖² as the SVD does: for near-rank-one deltas, exact rank-one ones, deltas
    far from rank one, a start vector far from the top one, and a zero delta."""
    from ocdwrap.deltas import rank1_energy

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 12, generator=g), torch.randn(6, 9, generator=g)
    delta = torch.einsum("bo,bi->boi", u, v) + 1e-3 * torch.randn(6, 12, 9, generator=g)
    delta[3] = torch.randn(12, 9, generator=g)  # far from rank one
    delta[4] = torch.einsum("o,i->oi", u[4], v[4])  # exactly rank one
    delta[5] = 0.0
    start = v.sign()
    start[2] = torch.randn(9, generator=g)  # a poor start
    s = torch.linalg.svdvals(delta)
    want = s[:, 0] ** 2 / (s**2).sum(1).clamp_min(1e-30)
    want[5] = 1.0
    torch.testing.assert_close(rank1_energy(delta, start), want, rtol=0, atol=2e-6)
    image = torch.bmm(delta, start.unsqueeze(2)).squeeze(2)  # Δv given: not computed again
    torch.testing.assert_close(rank1_energy(delta, start, image), want, rtol=0, atol=2e-6)
    # with ‖Δ‖² given, the bracket is first taken at the start itself; what it leaves loose
    # (the poor start, the delta far from rank one) takes the iteration and the SVD
    total = delta.reshape(6, -1).square().sum(1)
    torch.testing.assert_close(rank1_energy(delta, start, image, total), want, rtol=0, atol=2e-6)


def test_scale_from_sums_equals_the_two_pass_scale() -> None:
    """rho from each row's sum and sum of squares (the rows formula "sums") agrees with
    delta_scale's centred passes, also where the mean dominates (those rows are recomputed by
    delta_scale itself) and where the sum of squares overflows."""
    from ocdwrap.deltas import delta_scale, scale_from_sums

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(7, 500, generator=g) * torch.logspace(-6, 2, 7).unsqueeze(1)
    flat[1] = 0.5 + torch.randn(500, generator=g)  # a mean half as large as the spread
    flat[2] = 5.0 + 1e-4 * torch.randn(500, generator=g)  # nearly constant: the mean dominates
    flat[3] = 0.0
    flat[4] = 1e30 * torch.randn(500, generator=g)  # its square overflows float32
    row_sum, row_sumsq = flat.sum(1), torch.linalg.vecdot(flat, flat)
    assert not torch.isfinite(row_sumsq[4])
    for normalization in ("std", "rms"):
        want = delta_scale(flat, normalization)
        got = scale_from_sums(flat, normalization, row_sum, row_sumsq)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
        redone = [2, 4] if normalization == "std" else [4]
        assert torch.equal(got[redone], want[redone])


def test_the_finite_check_takes_one_sum_and_tells_overflow_from_nan() -> None:
    from ocdwrap.capture import Conditioning
    from ocdwrap.overfit import _finite_rows

    delta = torch.randn(5, 4, 3)
    delta[1, 2, 0] = float("nan")
    delta[2, 0, 1] = float("inf")
    delta[3] = 3e37  # finite elements whose sum overflows: still a finite delta
    cond = Conditioning(torch.zeros(5, 3), torch.zeros(5, 4), torch.zeros(5, 2))
    finite, sums = _finite_rows(delta, cond, (torch.zeros(5), None))
    assert finite.tolist() == [True, False, False, True, True]
    assert torch.equal(sums[[0, 4]], delta.reshape(5, -1).sum(1)[[0, 4]])


# --- what a directory already holds: never passed off as more than it is ------------------------
class _NoLen:
    """A loader without len(): an iterable of batches."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def _collect(d, loader, **kw) -> ocdwrap.DeltaStore:
    cfg = ocdwrap.OCDConfig(delta="rank1")
    model = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
    return ocdwrap.collect(model, loader, CE, d, progress=False, shard_size=16, **kw)


@pytest.mark.parametrize("with_len", [True, False], ids=["len", "no-len"])
def test_partial_then_whole_continues_to_the_whole(tmp_path, with_len: bool) -> None:
    def data():
        return _loader(80, 16) if with_len else _NoLen(_loader(80, 16))

    whole = _collect(tmp_path / "ref", data()).load()
    part = _collect(tmp_path / "d", data(), max_samples=20)  # a quick look first
    assert len(part) == 20 and part.complete
    assert part.stopped == "max_samples" and part.positions == 20
    more = _collect(tmp_path / "d", data(), max_samples=50)  # a larger limit: continued to it
    assert len(more) == 50 and more.stopped == "max_samples"
    store = _collect(tmp_path / "d", data())  # no limit: continued to the end of the data
    assert len(store) == 80 and store.stopped == "end_of_data" and store.positions == 80
    got = store.load()
    for k, v in whole.items():  # equal to one uninterrupted collection, tensor for tensor
        assert torch.equal(v, got[k]), k


@pytest.mark.parametrize("with_len", [True, False], ids=["len", "no-len"])
def test_whole_then_partial_returns_the_whole_at_once(tmp_path, with_len: bool) -> None:
    def data():
        return _loader(48, 16) if with_len else _NoLen(_loader(48, 16))

    whole = _collect(tmp_path / "d", data())
    manifest = json.dumps(whole.manifest, sort_keys=True)
    seen = []

    class Counting(_NoLen):
        def __iter__(self):
            for batch in self.loader:
                seen.append(batch)
                yield batch

    again = _collect(tmp_path / "d", Counting(_loader(48, 16)), max_samples=20)
    assert len(again) == 48 and again.stopped == "end_of_data"
    assert json.dumps(again.manifest, sort_keys=True) == manifest  # nothing rewritten
    assert len(seen) == 1  # only the first batch was read: to check it is the same data
    # a smaller limit than a partial collection holds: returned as it is, holding more
    part = _collect(tmp_path / "p", data(), max_samples=32)
    assert len(_collect(tmp_path / "p", data(), max_samples=10)) == 32 == part.positions


def test_positions_count_skipped_samples_not_stored_rows(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 10, generator=g), torch.randint(0, 3, (48,), generator=g)
    x[[5, 18, 19]] = float("nan")  # three samples skipped, two of them at the limit's edge

    def data():
        return DataLoader(TensorDataset(x, y), batch_size=8)

    cfg = ocdwrap.OCDConfig(delta="rank1")

    def collect(d, **kw):
        model = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
        return ocdwrap.collect(model, data(), CE, d, progress=False, shard_size=16, **kw)

    part = collect(tmp_path / "d", max_samples=20)
    assert part.positions == 20 and len(part) == 17
    assert part.manifest["summary"]["skipped_nonfinite"] == 3
    assert len(collect(tmp_path / "d", max_samples=20)) == 17  # holds the 20 positions asked for
    store = collect(tmp_path / "d")
    whole = collect(tmp_path / "ref")
    assert len(store) == len(whole) == 45 and store.positions == 48
    assert store.manifest["skipped"] == whole.manifest["skipped"] == 3
    a, b = store.load(), whole.load()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_complete_collection_of_other_data_is_refused(tmp_path) -> None:
    _collect(tmp_path / "d", _loader(32, 16, seed=0))
    with pytest.raises(CollectionExistsError, match="different data"):
        _collect(tmp_path / "d", _loader(32, 16, seed=1))
    # overwrite=True replaces it with the new data's collection
    store = _collect(tmp_path / "d", _loader(32, 16, seed=1), overwrite=True)
    fresh = _collect(tmp_path / "fresh", _loader(32, 16, seed=1))
    assert torch.equal(store.load()["u"], fresh.load()["u"])


def test_a_collection_directory_is_locked_while_collecting(tmp_path) -> None:
    from ocdwrap.errors import CollectionBusyError
    from ocdwrap.io import directory_lock

    with directory_lock(str(tmp_path / "d")):  # as another process collecting into it would
        with pytest.raises(CollectionBusyError, match="right now"):
            _collect(tmp_path / "d", _loader(16, 16))
    assert len(_collect(tmp_path / "d", _loader(16, 16))) == 16  # free again afterwards


def test_store_without_manifest_is_an_ocd_error_and_a_file_not_found_error(tmp_path) -> None:
    from ocdwrap.errors import CollectionNotFoundError

    with pytest.raises(CollectionNotFoundError, match="run ocdwrap.collect first") as e:
        ocdwrap.DeltaStore(tmp_path)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ocdwrap.OCDError)
