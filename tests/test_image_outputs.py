"""Models whose output is an image (a render (B, H, W, 3)): how the output is read for the
conditioning (``output_layout``, ``output_grid``), a target layer run in chunks of positions
(``layer_calls="chunks"``), ensembles in passes of at most ``max_pass_batch`` rows, per-view
image losses, the public overfit deltas (``OverfitResult.spec``) and the nearest-neighbour
control on a low-rank collection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.capture import pool_model_output
from ocdwrap.errors import ConfigError, LayerReachError, LossShapeError
from ocdwrap.evaluation import batch_conditioning
from ocdwrap.generators import NearestNeighbour
from ocdwrap.layer import FullDelta, LowRankDelta

SMALL = dict(mlp_hidden=32, cond_dim=32, mlp_layers=2)
FIT = dict(batch_size=16, lr=1e-3)  # the FitArgs of these tests


class Renderer(nn.Module):
    """Poses (B, 6) -> images (B, side, side, 3); ``fc1`` sees (B, points, feats) and runs over
    ``chunks`` slices of the points (as a NeRF renders its rays in chunks), each call with the
    whole batch in dim 0."""

    def __init__(self, side: int = 4, feats: int = 10, chunks: int = 1) -> None:
        super().__init__()
        self.side, self.chunks = side, chunks
        g = torch.Generator().manual_seed(1)
        self.register_buffer("rays", torch.randn(side * side, 6, feats, generator=g))
        self.fc1 = nn.Linear(feats, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        pts = torch.sin(torch.einsum("bp,npf->bnf", pose, self.rays))  # (B, N, feats)
        hidden = torch.cat([self.fc1(p) for p in pts.chunk(self.chunks, dim=1)], 1)
        rgb = torch.sigmoid(self.fc2(torch.relu(hidden)))
        return rgb.reshape(len(pose), self.side, self.side, 3)


def image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One value per view: the mean over its pixels (what docs/quickstart.md recommends)."""
    return (pred - target).square().flatten(1).mean(1)


def _data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.rand(n, 4, 4, 3, generator=g)


def _renderer(chunks: int = 1) -> Renderer:
    torch.manual_seed(0)
    return Renderer(chunks=chunks).eval()


# --- reading an image output -------------------------------------------------------------------
def test_channels_last_render_pools_to_its_colours() -> None:
    img = torch.rand(2, 6, 8, 3)
    # the default reads (B, C, H, W): a render's rows would become its "channels"
    assert pool_model_output(img).shape == (2, 6)
    mean = pool_model_output(img, layout="channels_last")
    torch.testing.assert_close(mean, img.mean(dim=(1, 2)))
    cells = pool_model_output(img, layout="channels_last", grid=2)
    assert cells.shape == (2, 3 * 2 * 2)
    # channel-major: red's four cells first; the top-left cell of red is rows 0-2, columns 0-3
    torch.testing.assert_close(cells[:, 0], img[:, :3, :4, 0].mean(dim=(1, 2)))
    torch.testing.assert_close(cells[:, 4], img[:, :3, :4, 1].mean(dim=(1, 2)))
    chw = img.permute(0, 3, 1, 2)
    torch.testing.assert_close(pool_model_output(chw, grid=2), cells)  # same cells either way


def test_output_grid_larger_than_the_image_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"output_grid=8.*spatial size \(4, 4\).*<= 4"):
        pool_model_output(torch.rand(2, 4, 4, 3), layout="channels_last", grid=8)
    with pytest.raises(ConfigError, match="output_layout"):
        ocdwrap.OCDConfig(output_layout="nhwc")
    with pytest.raises(ConfigError, match="output_grid"):
        ocdwrap.OCDConfig(output_grid=0)


def test_wrapped_renderer_conditions_on_colour_cells() -> None:
    pose, _ = _data(3)
    cfg = ocdwrap.OCDConfig(output_layout="channels_last", output_grid=2)
    model = ocdwrap.wrap(_renderer(), layer="fc1", config=cfg)
    cond, out = model.conditioning(pose)
    assert out.shape == (3, 4, 4, 3) and cond.model_output.shape == (3, 12)
    expected = F.adaptive_avg_pool2d(out.permute(0, 3, 1, 2), 2).flatten(1)
    torch.testing.assert_close(cond.model_output, expected)


def test_configs_without_the_new_fields_load_as_before(tmp_path) -> None:
    old = ocdwrap.OCDConfig().to_dict()
    for key in ("output_layout", "output_grid", "layer_calls"):
        old.pop(key)
    cfg = ocdwrap.OCDConfig.from_dict(old)
    assert (cfg.output_layout, cfg.output_grid, cfg.layer_calls) == (
        "channels_first",
        1,
        "once",
    )
    new = ocdwrap.OCDConfig(output_layout="channels_last", output_grid=4, layer_calls="chunks")
    new.save(tmp_path)
    assert ocdwrap.OCDConfig.load(tmp_path) == new


# --- a target layer run in chunks ----------------------------------------------------------------
def test_chunked_layer_is_an_error_that_names_the_setting() -> None:
    pose, _ = _data(2)
    model = ocdwrap.wrap(_renderer(chunks=4), layer="fc1")
    with pytest.raises(LayerReachError, match=r"reached 4 times.*layer_calls='chunks'"):
        model.conditioning(pose)


def test_chunked_layer_captures_and_overfits_as_one_call() -> None:
    pose, img = _data(4)
    cfg = ocdwrap.OCDConfig(overfit_steps=3, overfit_lr=1e-2, output_layout="channels_last")
    whole = ocdwrap.wrap(_renderer(chunks=1), layer="fc1", config=cfg)
    parts = ocdwrap.wrap(
        _renderer(chunks=3), layer="fc1", config=cfg.replace(layer_calls="chunks")
    )  # 16 points in chunks of 6, 6, 4: the mean must weight the chunks by their points
    a, b = whole.conditioning(pose)[0], parts.conditioning(pose)[0]
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y)
    ra = ocdwrap.overfit_batch(whole, pose, img, image_mse)
    rb = ocdwrap.overfit_batch(parts, pose, img, image_mse)
    assert ra.delta.abs().max() > 1e-4  # the overfit moved the weights
    torch.testing.assert_close(rb.delta, ra.delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rb.loss_after, ra.loss_after)
    assert bool((rb.loss_after < rb.loss_before).all())
    assert rb.layer_input.shape == (4, 16, 10)  # every chunk's points, joined


def test_chunks_that_split_the_batch_are_refused() -> None:
    class SplitsSamples(Renderer):
        def forward(self, pose):
            return torch.cat([super(SplitsSamples, self).forward(p) for p in pose.split(2)])

    torch.manual_seed(0)
    cfg = ocdwrap.OCDConfig(layer_calls="chunks")
    model = ocdwrap.wrap(SplitsSamples().eval(), layer="fc1", config=cfg)
    with pytest.raises(LayerReachError, match=r"got 2 rows in dim 0, not the batch of 4"):
        model.conditioning(_data(4)[0])


# --- per-view losses -------------------------------------------------------------------------
def test_a_loss_averaged_over_the_whole_batch_is_refused(tmp_path) -> None:
    pose, img = _data(4)
    model = ocdwrap.wrap(_renderer(), layer="fc1", config=ocdwrap.OCDConfig(delta="lowrank"))
    loader = DataLoader(TensorDataset(pose, img), batch_size=4)
    with pytest.raises(LossShapeError, match=r"not the sum of per-sample losses.*reduction='none'"):
        ocdwrap.collect(model, loader, F.mse_loss, tmp_path / "mean")  # one mean for the batch
    store = ocdwrap.collect(model, loader, image_mse, tmp_path / "per_view")
    assert len(store) == 4


def test_overfit_batch_called_directly_refuses_a_batch_mean_too() -> None:
    pose, img = _data(4)
    model = ocdwrap.wrap(_renderer(), layer="fc1", config=ocdwrap.OCDConfig(delta="lowrank"))
    with pytest.raises(LossShapeError, match=r"not the sum of per-sample losses"):
        ocdwrap.overfit_batch(model, pose, img, F.mse_loss)
    res = ocdwrap.overfit_batch(model, pose, img, F.mse_loss, check_loss=False)  # asked not to
    assert res.delta.shape[0] == 4
    summed = ocdwrap.overfit_batch(model, pose, img, lambda p, t: image_mse(p, t).sum())
    assert bool((summed.loss_after < summed.loss_before).all())


# --- ensembles in passes of at most max_pass_batch rows ---------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> ocdwrap.OCDModel:
    pose, img = _data(16)
    cfg = ocdwrap.OCDConfig(delta="lowrank", delta_rank=2, output_layout="channels_last", **SMALL)
    model = ocdwrap.wrap(_renderer(), layer="fc1", config=cfg)
    store = ocdwrap.collect(
        model, DataLoader(TensorDataset(pose, img), batch_size=8), image_mse,
        tmp_path_factory.mktemp("store"),
    )  # fmt: skip
    ocdwrap.fit(model, store, ocdwrap.FitArgs(**FIT, steps=5, seed=0), progress=False)
    model.store = store
    return model


def test_ensemble_in_passes_equals_one_pass(fitted) -> None:
    pose, _ = _data(4, seed=1)
    calls = []
    handle = fitted.base_model.fc2.register_forward_hook(
        lambda m, a, o: calls.append(a[0].shape[0])
    )
    try:
        one = fitted.ensemble(pose, num_draws=3, rng=torch.Generator().manual_seed(0))
        calls.clear()
        with fitted.sampling(max_pass_batch=5):
            parts = fitted.ensemble(pose, num_draws=3, rng=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [4, 5, 5, 2]  # the capture pass, then 12 rows in passes of 5
    torch.testing.assert_close(parts.draws, one.draws)
    torch.testing.assert_close(parts.output, one.output)
    assert one.draws.shape == (3, 4, 4, 4, 3)
    with fitted.sampling(num_draws=3, seed=0, max_pass_batch=4):
        called = fitted(pose)
    with fitted.sampling(num_draws=3, seed=0):
        torch.testing.assert_close(called, fitted(pose))


def test_max_pass_batch_below_one_is_refused(fitted) -> None:
    with pytest.raises(ConfigError, match="max_pass_batch=0"):
        ocdwrap.SamplingConfig(max_pass_batch=0)
    with pytest.raises(ConfigError, match="max_pass_batch"), fitted.sampling(max_pass_batch=-1):
        pass


# --- the overfit deltas, public ------------------------------------------------------------------
def test_overfit_result_spec_full_and_truncated(fitted) -> None:
    pose, img = _data(4, seed=2)
    res = ocdwrap.overfit_batch(fitted, pose, img, image_mse)
    spec = res.spec()
    assert isinstance(spec, FullDelta) and torch.equal(spec.delta, res.delta)
    with torch.no_grad():
        with fitted.disable_adapter():
            base = image_mse(fitted(pose), img)
        with fitted.use_deltas(spec):
            over = image_mse(fitted(pose), img)
    torch.testing.assert_close(over, res.loss_after)
    assert bool((over < base).all())
    low = res.spec(rank=2)
    assert isinstance(low, LowRankDelta) and low.rank == 2
    u, s, vh = torch.linalg.svd(res.delta)
    best = (u[..., :2] * s[:, None, :2]) @ vh[:, :2]
    torch.testing.assert_close(low.full(), best, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="rank=0"):
        res.spec(rank=0)


# --- nearest neighbour on a low-rank collection ------------------------------------------------
def test_nearest_neighbour_reads_lowrank_factors(fitted) -> None:
    store = fitted.store
    pose, img = _data(16)
    near = NearestNeighbour(lambda x: x, DataLoader(TensorDataset(pose, img), batch_size=8))
    near.fit(fitted, store)
    query = pose[[5, 2]]
    spec = near.generate(fitted, batch_conditioning(fitted, query)[0], query, None)
    assert isinstance(spec, LowRankDelta) and spec.rank == 2
    # the neighbour of a training pose is that pose: its stored rank-2 delta, rho included
    expected = ocdwrap.overfit_batch(fitted, pose[[5, 2]], img[[5, 2]], image_mse).spec(rank=2)
    torch.testing.assert_close(spec.full(), expected.full(), rtol=1e-3, atol=1e-6)


def test_another_output_grid_after_fitting_names_the_setting(fitted) -> None:
    pose, _ = _data(2, seed=3)
    fitted.config = fitted.config.replace(output_grid=2)
    try:
        with pytest.raises(
            ocdwrap.errors.BaseModelMismatchError,
            match=r"widths \(10, 16, 12\).*fitted on \(10, 16, 3\).*output_grid",
        ):
            fitted(pose)
    finally:
        fitted.config = fitted.config.replace(output_grid=1)
    assert fitted(pose).shape == (2, 4, 4, 3)
