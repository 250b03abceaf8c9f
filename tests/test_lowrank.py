"""Low-rank deltas (``delta="lowrank"`` / ``"auto"``): factors, application, storage, fit, errors.

A low-rank delta is stored and generated as r canonical factor pairs of delta / rho,
sum_k s_k u_k v_kᵀ (docs/how-ocd-works.md, "Deltas that are not rank one").
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import lenet_conv_case, mlp_case
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.deltas import LowRankDelta, canonical_factors, lowrank_factors
from ocdwrap.errors import BaseModelMismatchError, CollectionExistsError, ConfigError
from ocdwrap.hypernet import OCDHyperNetwork
from ocdwrap.io import part_name
from ocdwrap.layer import DynamicLayer, FullDelta, LayerState
from ocdwrap.store_writer import merge_parts

CE = nn.CrossEntropyLoss(reduction="none")
SMALL = dict(mlp_hidden=32, cond_dim=32, mlp_layers=2)
FIT = dict(batch_size=16, lr=1e-3)  # the FitArgs of these tests


# --- small models ------------------------------------------------------------------------------
class TokenNet(nn.Module):
    """A transformer-like token layer: ``proj`` is a Linear on (B, T, in) token vectors."""

    def __init__(self, tokens: int = 3, d: int = 8, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.proj = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, classes)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, 4)
        h = torch.tanh(self.proj(torch.tanh(self.embed(x))))  # (B, T, hidden)
        return self.head(h.mean(1))  # (B, classes)


class PoseToImage(nn.Module):
    """A model whose forward takes poses (B, 6) and returns images (B, H, W, 3).

    Like a NeRF, the target layer ``fc1`` sees the points of every sample flattened into
    (B·N, in) rows.
    """

    def __init__(self, side: int = 4, feats: int = 12) -> None:
        super().__init__()
        self.side = side
        g = torch.Generator().manual_seed(1)
        self.register_buffer("rays", torch.randn(side * side, 6, feats, generator=g))
        self.fc1 = nn.Linear(feats, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        B = pose.shape[0]
        pts = torch.sin(torch.einsum("bp,npf->bnf", pose, self.rays))  # (B, N, feats)
        rgb = torch.sigmoid(self.fc2(torch.relu(self.fc1(pts.reshape(-1, pts.shape[-1])))))
        return rgb.reshape(B, self.side, self.side, 3)  # (B, H, W, 3)


def _image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().flatten(1).mean(1)  # (B,)


def _tokens(n: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _images(n: int = 16, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    pose, img = torch.randn(n, 6, generator=g), torch.rand(n, 4, 4, 3, generator=g)
    return DataLoader(TensorDataset(pose, img), batch_size=batch)


def _lenet_data(n: int = 16, batch: int = 8) -> DataLoader:
    case = lenet_conv_case()
    return DataLoader(TensorDataset(case.inputs(n), case.targets(n)), batch_size=batch)


def _vectors(n: int = 32, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _cfg(**kw) -> ocdwrap.OCDConfig:
    return ocdwrap.OCDConfig(**{**SMALL, **kw})


def _random_factors(B: int, r: int, out: int, inner: int, seed: int = 0):
    """Orthonormal u (B, r, out), v (B, r, in) and distinct s (B, r), canonical."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(B, out, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(B, inner, r, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(3.0, 1.0, r, dtype=torch.float64).expand(B, r) + 0.1 * torch.rand(
        B, 1, generator=g, dtype=torch.float64
    )
    return canonical_factors(u.transpose(1, 2), s.clone(), v.transpose(1, 2))


# --- factors -----------------------------------------------------------------------------------
def test_factors_are_canonical_whatever_the_order_and_signs() -> None:
    u, s, v = _random_factors(B=5, r=4, out=7, inner=6)
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(4, generator=g) for _ in range(5)])  # (B, r)
    sign = torch.randint(0, 2, (5, 4, 1), generator=g).double() * 2 - 1  # (B, r, 1)
    neg = torch.randint(0, 2, (5, 4), generator=g).bool()  # s_k < 0 with -v_k: same matrix
    pu = torch.gather(u, 1, perm.unsqueeze(2).expand_as(u)) * sign
    pv = torch.gather(v, 1, perm.unsqueeze(2).expand_as(v)) * sign
    ps = torch.gather(s, 1, perm)
    ps, pv = torch.where(neg, -ps, ps), torch.where(neg.unsqueeze(2), -pv, pv)
    assert not torch.equal(pu, u)  # the permuted, flipped factors differ as stored tensors
    same = LowRankDelta(pu, ps, pv).full()
    torch.testing.assert_close(same, LowRankDelta(u, s, v).full())  # but form the same matrices
    for got in (canonical_factors(pu, ps, pv), lowrank_factors(same, 4)[:3]):
        for a, b in zip(got, (u, s, v)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert (s[:, :-1] >= s[:, 1:]).all()  # descending
    peak = torch.gather(u, 2, u.abs().argmax(2, keepdim=True))
    assert (peak > 0).all()  # the largest-magnitude entry of each u_k is positive


@pytest.mark.parametrize("true_rank,rank", [(1, 1), (2, 2), (2, 4), (3, 5)])
def test_delta_of_rank_r_is_kept_exactly_with_rank_at_least_r(true_rank: int, rank: int) -> None:
    u, s, v = _random_factors(B=4, r=true_rank, out=8, inner=9, seed=true_rank)
    delta = LowRankDelta(u, s, v).full().float()  # (B, 8, 9), rank true_rank
    fu, fs, fv, energy = lowrank_factors(delta, rank)
    assert fu.shape == (4, rank, 8) and fs.shape == (4, rank) and fv.shape == (4, rank, 9)
    torch.testing.assert_close(LowRankDelta(fu, fs, fv).full(), delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(energy, torch.ones(4), rtol=0, atol=1e-5)
    # and a lower rank keeps only part of it: the energy is the share of the top singular values
    if true_rank > 1:
        _, _, _, part = lowrank_factors(delta, true_rank - 1)
        want = s[:, : true_rank - 1].square().sum(1) / s.square().sum(1)
        torch.testing.assert_close(part.double(), want, rtol=1e-5, atol=1e-6)


def test_collected_rank_one_delta_is_reproduced_to_rounding(tmp_path) -> None:
    """SGD on a Linear on vectors makes delta = u xᵀ exactly: delta_rank=1 keeps all of it."""
    cfg = _cfg(delta="lowrank", delta_rank=1, overfit_optimizer="sgd", overfit_lr=0.05)
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=cfg)
    data = _vectors(16, 16)
    store = ocdwrap.collect(m, data, CE, tmp_path / "c", progress=False)
    got = store.load()
    x, y = next(iter(data))
    ref = ocdwrap.overfit_batch(m, x, y, CE).delta  # (B, 16, 32)
    spec = LowRankDelta(
        got["lowrank_u"], got["lowrank_s"] * got["rho"].view(-1, 1), got["lowrank_v"]
    )
    scale = ref.abs().amax((1, 2), keepdim=True)
    assert ((spec.full() - ref).abs() / scale).max() < 1e-5
    assert got["lowrank_energy"].min() > 1 - 1e-6
    summary = store.manifest["summary"]["lowrank_energy"]
    assert summary["rank"] == 1 and summary["min"] > 1 - 1e-6


def test_token_layer_delta_of_rank_at_most_t_is_reproduced(tmp_path) -> None:
    """With SGD a token layer's delta is sum over T tokens of g_t x_tᵀ: rank <= T = 3."""
    cfg = _cfg(delta="lowrank", delta_rank=3, overfit_optimizer="sgd", overfit_lr=0.1)
    torch.manual_seed(0)
    m = ocdwrap.wrap(TokenNet(), layer="proj", config=cfg)
    data = _tokens(8)
    got = ocdwrap.collect(m, data, CE, tmp_path / "t", progress=False).load()
    x, y = next(iter(data))
    ref = ocdwrap.overfit_batch(m, x, y, CE).delta  # (8, 6, 8)
    assert torch.linalg.matrix_rank(ref).max() == 3  # more than rank one: a real test
    spec = LowRankDelta(
        got["lowrank_u"], got["lowrank_s"] * got["rho"].view(-1, 1), got["lowrank_v"]
    )
    scale = ref.abs().amax((1, 2), keepdim=True)
    assert ((spec.full() - ref).abs() / scale).max() < 1e-5


# --- batched = one at a time -----------------------------------------------------------------------
def test_collect_batch_equals_one_at_a_time(tmp_path) -> None:
    """A collected batch = the SVD of each sample's own delta from the reference loop."""
    cfg = _cfg(delta="lowrank", delta_rank=3)
    m = ocdwrap.wrap(lenet_conv_case().make(), layer="conv2", config=cfg)
    a = ocdwrap.collect(
        m, _lenet_data(8, 8), CE, tmp_path / "a", progress=False, shard_size=8
    ).load()
    b = ocdwrap.collect(
        m, _lenet_data(8, 1), CE, tmp_path / "b", progress=False, shard_size=8
    ).load()
    assert a.keys() == b.keys()
    for k in a:  # float32 rounding of the different batch sizes, nothing more
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    x, y = next(iter(_lenet_data(8, 8)))
    for i in range(8):
        ref = ocdwrap.overfit_one(m, x[i : i + 1], y[i : i + 1], CE)  # (1, 16, 6, 5, 5)
        rho = ref.flatten().std(unbiased=False)
        u, s, v, energy = lowrank_factors(ref / rho, 3)
        torch.testing.assert_close(a["rho"][i], rho, rtol=1e-4, atol=0)
        torch.testing.assert_close(a["lowrank_s"][i], s[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a["lowrank_u"][i], u[0], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["lowrank_v"][i], v[0], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["lowrank_energy"][i], energy[0], rtol=1e-4, atol=0)
    assert 0.2 < float(a["lowrank_energy"].mean()) < 0.999  # a conv delta is not rank 3


class _Interrupted(Exception):
    pass


def _interrupting(loader: DataLoader, after: int):
    for i, batch in enumerate(loader):
        if i == after:
            raise _Interrupted
        yield batch


def test_resumed_and_merged_collections_equal_one_uninterrupted(tmp_path) -> None:
    """Per-sample factors need nothing from other samples: resuming and merging parts are exact."""
    m = ocdwrap.wrap(lenet_conv_case().make(), layer="conv2", config=_cfg(delta="auto"))
    one = ocdwrap.collect(m, _lenet_data(24, 4), CE, tmp_path / "one", progress=False, shard_size=8)
    with pytest.raises(_Interrupted):
        ocdwrap.collect(
            m,
            _interrupting(_lenet_data(24, 4), 3),
            CE,
            tmp_path / "r",
            progress=False,
            shard_size=8,
        )
    assert not json.loads((tmp_path / "r" / "manifest.json").read_text())["complete"]
    resumed = ocdwrap.collect(
        m, _lenet_data(24, 4), CE, tmp_path / "r", progress=False, shard_size=8
    )
    # two processes' parts, as collect_distributed writes them, merged into one collection
    case = lenet_conv_case()
    x, y = case.inputs(24), case.targets(24)
    for rank, (lo, hi) in enumerate([(0, 12), (12, 24)]):
        part = DataLoader(TensorDataset(x[lo:hi], y[lo:hi]), batch_size=4)
        ocdwrap.collect(
            m, part, CE, tmp_path / "m" / part_name(rank, 2), progress=False, shard_size=8
        )
    merge_parts(tmp_path / "m", [(0, 12), (12, 24)], 2)
    merged = ocdwrap.DeltaStore(tmp_path / "m")
    want = one.load()
    for other in (resumed, merged):
        got = other.load()
        assert got.keys() == want.keys() and "lowrank_u" in got
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert other.manifest["summary"] == one.manifest["summary"]
    assert one.manifest["summary"]["lowrank_energy"]["rank"] == 4
    ocdwrap.fit(
        m, merged, ocdwrap.FitArgs(**FIT, steps=2), progress=False
    )  # the merged manifest resolves "auto"
    assert m.hypernet.delta == "lowrank"


# --- the layer applies the factors without forming the matrix ----------------------------------------
def _dynamic(layer: nn.Module, spec) -> DynamicLayer:
    state = LayerState()
    state.delta = spec
    return DynamicLayer(layer, state)


@pytest.mark.parametrize("shape", [(5, 9), (5, 4, 9), (5, 2, 3, 9), "flat"], ids=str)
def test_linear_applies_factors_as_the_formed_matrix(shape) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(9, 7)
    x = torch.randn(15, 9, generator=g) if shape == "flat" else torch.randn(shape, generator=g)
    spec = LowRankDelta(
        torch.randn(5, 3, 7, generator=g),
        torch.randn(5, 3, generator=g),
        torch.randn(5, 3, 9, generator=g),
    )
    got = _dynamic(layer, spec)(x)
    want = _dynamic(layer, FullDelta(spec.full()))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - layer(x)).abs().max() > 0.1  # the delta does change the output


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(stride=2, padding=1),
        dict(dilation=2, padding="same"),
        dict(padding=1, padding_mode="reflect"),
    ],
    ids=["plain", "stride-pad", "dilation-same", "reflect"],
)
def test_conv2d_applies_factors_as_the_formed_kernel(kw) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(3, 4, 9, 9, generator=g)
    spec = LowRankDelta(
        torch.randn(3, 2, 6, generator=g),
        torch.randn(3, 2, generator=g),
        torch.randn(3, 2, 36, generator=g),
    )
    got = _dynamic(layer, spec)(x)
    want = _dynamic(layer, FullDelta(spec.full(layer.weight.shape)))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - layer(x)).abs().max() > 0.1


# --- auto, fit, save and load --------------------------------------------------------------------------
def test_auto_picks_rank_one_on_vectors_and_lowrank_elsewhere(tmp_path) -> None:
    vec = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=_cfg(delta="auto"))
    store = ocdwrap.collect(vec, _vectors(), CE, tmp_path / "v", progress=False)
    assert {"u", "v"} <= set(store.keys) and "lowrank_u" not in store.keys
    ocdwrap.fit(vec, store, ocdwrap.FitArgs(**FIT, steps=2), progress=False)
    assert vec.hypernet.delta == "rank1"
    # conv1 of LeNet5 is 6 x 25: the default rank is capped at 6 under "auto"
    conv = ocdwrap.wrap(
        lenet_conv_case().make(), layer="conv1", config=_cfg(delta="auto", delta_rank=8)
    )
    store = ocdwrap.collect(conv, _lenet_data(), CE, tmp_path / "c", progress=False)
    assert "lowrank_u" in store.keys and "u" not in store.keys
    assert store.load(["lowrank_s"])["lowrank_s"].shape == (16, 6)
    ocdwrap.fit(conv, store, ocdwrap.FitArgs(**FIT, steps=2), progress=False)
    assert conv.hypernet.delta == "lowrank" and conv.hypernet.rank == 6
    assert isinstance(conv.generate(conv.conditioning(torch.randn(2, 1, 28, 28))[0]), LowRankDelta)


def test_image_output_model_with_flattened_points(tmp_path) -> None:
    """Poses in, images out, a per-image loss, the layer on (B·N, in) rows: auto -> lowrank."""
    m = ocdwrap.wrap(PoseToImage(), layer="fc1", config=_cfg(delta="auto", delta_rank=3))
    store = ocdwrap.collect(m, _images(), _image_mse, tmp_path / "img", progress=False)
    assert "lowrank_u" in store.keys and "u" not in store.keys
    assert not store.manifest["identity"]["store_rank1"]
    report = ocdwrap.fit(m, store, ocdwrap.FitArgs(**FIT, steps=30), progress=False)
    assert m.hypernet.delta == "lowrank" and report.losses[-1] < report.losses[0]
    out = m(torch.randn(5, 6))
    assert out.shape == (5, 4, 4, 3) and torch.isfinite(out).all()


def test_fit_lowers_the_loss_and_generates_factors(tmp_path) -> None:
    # the packed factors are r·(out + 1 + in') = 334 values: a hidden width near that learns
    # them (a 32-wide one, the other tests' size, is a bottleneck and barely moves in 150 steps)
    cfg = _cfg(delta="lowrank", delta_rank=2, mlp_hidden=256)
    m = ocdwrap.wrap(lenet_conv_case().make(), layer="conv2", config=cfg)
    store = ocdwrap.collect(m, _lenet_data(32, 16), CE, tmp_path / "c", progress=False)
    report = ocdwrap.fit(m, store, ocdwrap.FitArgs(**FIT, steps=150), progress=False)
    first, last = sum(report.losses[:10]) / 10, sum(report.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
    cond, _ = m.conditioning(torch.randn(3, 1, 28, 28))
    spec = m.generate(cond, num_draws=2, rng=torch.Generator().manual_seed(0))
    assert spec.u.shape == (6, 2, 16) and spec.s.shape == (6, 2) and spec.v.shape == (6, 2, 150)
    # a diffusion draw is a valid factorisation: unit u_k and v_k, the size of each term in s_k
    torch.testing.assert_close(spec.u.norm(dim=2), torch.ones(6, 2))
    torch.testing.assert_close(spec.v.norm(dim=2), torch.ones(6, 2))
    # and the generated factors live on the stored factors' scale (s times rho)
    stored = store.load(["lowrank_s", "rho"])
    typical = (stored["lowrank_s"] * stored["rho"].unsqueeze(1)).abs().mean()
    assert 0.1 < float(spec.s.abs().mean() / typical) < 10


@pytest.mark.parametrize("delta", ["lowrank", "auto"])
def test_save_load_round_trip(tmp_path, delta: str) -> None:
    m = ocdwrap.wrap(
        lenet_conv_case().make(), layer="conv2", config=_cfg(delta=delta, delta_rank=2)
    )
    ocdwrap.fit(
        m,
        ocdwrap.collect(m, _lenet_data(), CE, tmp_path / "c", progress=False),
        ocdwrap.FitArgs(**FIT, steps=20),
        progress=False,
    )
    x = torch.randn(4, 1, 28, 28)
    with m.sampling(seed=3):
        before = m(x)
    m.save_pretrained(tmp_path / "adapter")
    spec = json.loads((tmp_path / "adapter" / "ocd_config.json").read_text())
    assert spec["delta"] == delta and spec["delta_rank"] == 2
    loaded = ocdwrap.OCDModel.from_pretrained(m.unload(), tmp_path / "adapter")
    assert loaded.hypernet.delta == "lowrank" and loaded.hypernet.rank == 2
    with loaded.sampling(seed=3):
        after = loaded(x)
    assert torch.equal(before, after)
    with loaded.disable_adapter():
        assert not torch.allclose(loaded(x), after)  # the adapter does something


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_delta_rank_below_one_is_a_config_error(rank) -> None:
    with pytest.raises(ConfigError, match=f"delta_rank={rank!r}.*>= 1"):
        ocdwrap.OCDConfig(delta="lowrank", delta_rank=rank)


def test_delta_rank_above_the_layer_is_named_at_wrap_and_before_collecting(tmp_path) -> None:
    pattern = r"delta_rank=7.*'conv1'.*\(6, 1, 5, 5\).*6 x 25.*delta_rank <= 6"
    with pytest.raises(ConfigError, match=pattern):
        ocdwrap.wrap(
            lenet_conv_case().make(), layer="conv1", config=_cfg(delta="lowrank", delta_rank=7)
        )
    m = ocdwrap.wrap(
        lenet_conv_case().make(), layer="conv1", config=_cfg(delta="lowrank", delta_rank=6)
    )
    m.config = m.config.replace(delta_rank=7)  # changed after wrapping: collect checks again
    with pytest.raises(ConfigError, match=pattern):
        ocdwrap.collect(m, _lenet_data(), CE, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()  # nothing was overfitted or written
    with pytest.raises(ConfigError, match=r"\(16, 32\).*delta_rank <= 16"):
        ocdwrap.wrap(mlp_case().make(), layer="fc2", config=_cfg(delta="lowrank", delta_rank=17))
    ocdwrap.wrap(mlp_case().make(), layer="fc2", config=_cfg(delta="auto", delta_rank=17))


@pytest.fixture(scope="module")
def conv_stores(tmp_path_factory) -> dict[str, str]:
    """LeNet5 conv2 collections made with delta='full' and with delta='lowrank' rank 2."""
    out = {}
    for name, cfg in (
        ("full", dict(delta="full")),
        ("lowrank", dict(delta="lowrank", delta_rank=2)),
    ):
        d = tmp_path_factory.mktemp(name)
        m = ocdwrap.wrap(lenet_conv_case().make(), layer="conv2", config=_cfg(**cfg))
        ocdwrap.collect(m, _lenet_data(), CE, d, progress=False)
        out[name] = str(d)
    return out


@pytest.mark.parametrize(
    "store,cfg,says",
    [
        (
            "full",
            dict(delta="lowrank", delta_rank=2),
            r"holds full deltas.*asks for lowrank rank 2.*OCDConfig\(delta='full'\)",
        ),
        ("full", dict(delta="auto"), r"holds full deltas.*asks for lowrank rank 4"),
        (
            "lowrank",
            dict(delta="full"),
            r"holds lowrank rank 2 deltas.*asks for full.*delta='lowrank', delta_rank=2",
        ),
        (
            "lowrank",
            dict(delta="lowrank", delta_rank=3),
            r"lowrank rank 2 deltas.*asks for lowrank rank 3",
        ),
        (
            "lowrank",
            dict(delta="auto", delta_rank=3),
            r"lowrank rank 2 deltas.*asks for lowrank rank 3",
        ),
    ],
    ids=["full-as-lowrank", "full-as-auto", "lowrank-as-full", "rank2-as-rank3", "rank2-as-auto3"],
)
def test_collection_of_another_delta_is_refused(
    conv_stores, store: str, cfg: dict, says: str
) -> None:
    m = ocdwrap.wrap(lenet_conv_case().make(), layer="conv2", config=_cfg(**cfg))
    with pytest.raises(BaseModelMismatchError, match=says):
        ocdwrap.fit(m, conv_stores[store], ocdwrap.FitArgs(**FIT, steps=1), progress=False)
    assert m.hypernet is None


def test_rank_one_collection_is_refused_for_lowrank(tmp_path) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=_cfg(delta="rank1"))
    store = ocdwrap.collect(m, _vectors(), CE, tmp_path / "r", progress=False)
    other = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=_cfg(delta="lowrank", delta_rank=2))
    with pytest.raises(
        BaseModelMismatchError, match=r"holds rank1 deltas.*OCDConfig\(delta='rank1'\)"
    ):
        ocdwrap.fit(other, store, ocdwrap.FitArgs(**FIT, steps=1), progress=False)


def test_resuming_with_another_rank_is_refused(conv_stores) -> None:
    m = ocdwrap.wrap(
        lenet_conv_case().make(), layer="conv2", config=_cfg(delta="lowrank", delta_rank=3)
    )
    with pytest.raises(CollectionExistsError, match="another base model or config"):
        ocdwrap.collect(m, _lenet_data(), CE, conv_stores["lowrank"], progress=False)


def test_auto_hypernetwork_needs_the_collection() -> None:
    cfg = _cfg(delta="auto")
    with pytest.raises(ConfigError, match="auto.*ocdwrap.fit"):
        OCDHyperNetwork(cfg, kind="conv2d", weight_shape=(16, 6, 5, 5), dims=(6, 16, 10))
    hyper = OCDHyperNetwork(
        cfg, kind="conv2d", weight_shape=(16, 6, 5, 5), dims=(6, 16, 10), delta="lowrank"
    )
    assert (
        hyper.target_shape == (4 * (16 + 1 + 150),) and cfg.delta == "auto"
    )  # the user's config untouched
    assert copy.deepcopy(hyper).spec()["delta_rank"] == 4
