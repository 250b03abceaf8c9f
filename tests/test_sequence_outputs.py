"""Models whose output is a multi-channel sequence (a separator's (B, speakers, samples)): how
the output is read for the conditioning (``output_layout="sequence_channels_first"`` /
``"sequence_channels_last"`` with ``output_grid``), so that its width does not depend on the
length, and the errors for outputs of another shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.capture import pool_model_output
from ocdwrap.errors import BaseModelMismatchError, ConfigError

SMALL = dict(mlp_hidden=32, cond_dim=32, mlp_layers=2)
FIT = dict(batch_size=8, lr=1e-3)  # the FitArgs of these tests


class ToySeparator(nn.Module):
    """Waveforms (B, T) -> (B, S, T): frames of ``hop`` samples, ``proj`` a Linear on the frame
    sequence (B, frames, N) giving one mask per speaker, as in benchmarks/speech_model.py."""

    def __init__(self, speakers: int = 3, hop: int = 4, n: int = 8) -> None:
        super().__init__()
        self.S, self.hop, self.n = speakers, hop, n
        self.enc = nn.Linear(hop, n)
        self.proj = nn.Linear(n, speakers * n)
        self.dec = nn.Linear(n, hop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        feats = torch.relu(self.enc(x.reshape(B, T // self.hop, self.hop)))  # (B, F, N)
        masks = torch.sigmoid(self.proj(feats)).reshape(B, -1, self.S, self.n)
        est = self.dec(masks * feats[:, :, None])  # (B, F, S, hop)
        return est.permute(0, 2, 1, 3).reshape(B, self.S, T)


def source_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().flatten(1).mean(1)


def _separator() -> ToySeparator:
    torch.manual_seed(0)
    return ToySeparator().eval()


# --- reading a sequence output -------------------------------------------------------------------
def test_channels_first_sequence_pools_each_channel_over_time() -> None:
    out = torch.randn(2, 3, 40)  # (B, speakers, samples)
    # the default reads (B, T, F) tokens: the speakers would be averaged, 40 values per sample
    torch.testing.assert_close(pool_model_output(out), out.mean(1))
    mean = pool_model_output(out, layout="sequence_channels_first")
    torch.testing.assert_close(mean, out.mean(2))
    cells = pool_model_output(out, layout="sequence_channels_first", grid=4)
    assert cells.shape == (2, 3 * 4)
    # channel-major: speaker 0's four cells first; its second cell is samples 10-19
    torch.testing.assert_close(cells[:, 1], out[:, 0, 10:20].mean(1))
    torch.testing.assert_close(cells[:, 4], out[:, 1, :10].mean(1))
    last = pool_model_output(out.transpose(1, 2), layout="sequence_channels_last", grid=4)
    torch.testing.assert_close(last, cells)  # same cells either way


def test_sequence_width_does_not_depend_on_the_length() -> None:
    for T in (37, 40, 801):
        out = torch.randn(2, 3, T)
        assert pool_model_output(out, layout="sequence_channels_first", grid=5).shape == (2, 15)
        assert pool_model_output(out).shape == (2, T)  # the token reading: T-wide


def test_sequence_pooling_ignores_padded_positions() -> None:
    out = torch.randn(2, 12, 3)  # (B, T, C)
    mask = torch.ones(2, 12)
    mask[1, 6:] = 0  # sample 1 has 6 real positions
    cells = pool_model_output(out, mask, layout="sequence_channels_last", grid=2)
    torch.testing.assert_close(cells[0], out[0].reshape(2, 6, 3).mean(1).T.flatten())
    torch.testing.assert_close(cells[1, 0], out[1, :6, 0].mean())  # first half: all real
    torch.testing.assert_close(cells[1, 1], torch.tensor(0.0))  # second half: nothing real


def test_sequence_layouts_name_the_problem_and_the_fix() -> None:
    with pytest.raises(
        ConfigError, match=r"reads a 3-D model output.*\(2, 3, 4, 4\).*'channels_first'"
    ):
        pool_model_output(torch.rand(2, 3, 4, 4), layout="sequence_channels_first")
    with pytest.raises(ConfigError, match=r"output_grid=8.*length 5.*<= 5"):
        pool_model_output(torch.rand(2, 3, 5), layout="sequence_channels_first", grid=8)
    with pytest.raises(ConfigError, match=r"output_layout='sequence'.*sequence_channels_first"):
        ocdwrap.OCDConfig(output_layout="sequence")
    # outputs of 1-2 dimensions are read as before under every layout
    assert pool_model_output(torch.rand(4), layout="sequence_channels_last").shape == (4, 1)
    assert pool_model_output(torch.rand(4, 6), layout="sequence_channels_first").shape == (4, 6)


# --- a wrapped separator -------------------------------------------------------------------------
def test_wrapped_separator_conditions_on_speaker_cells_at_any_length() -> None:
    cfg = ocdwrap.OCDConfig(output_layout="sequence_channels_first", output_grid=4)
    model = ocdwrap.wrap(
        _separator(), layer="proj", config=cfg, sampling=ocdwrap.SamplingConfig(task="regression")
    )
    for T in (64, 96):
        cond, out = model.conditioning(torch.randn(2, T))
        assert out.shape == (2, 3, T) and cond.dims == (8, 24, 12)
        torch.testing.assert_close(cond.model_output, F.adaptive_avg_pool1d(out, 4).flatten(1))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> ocdwrap.OCDModel:
    g = torch.Generator().manual_seed(0)
    mix, src = torch.randn(16, 64, generator=g), torch.randn(16, 3, 64, generator=g)
    cfg = ocdwrap.OCDConfig(
        delta="lowrank", delta_rank=2, output_layout="sequence_channels_first", output_grid=4,
        overfit_steps=3, overfit_lr=1e-2, **SMALL,
    )  # fmt: skip
    model = ocdwrap.wrap(
        _separator(), layer="proj", config=cfg, sampling=ocdwrap.SamplingConfig(task="regression")
    )
    loader = DataLoader(TensorDataset(mix, src), batch_size=8)
    store = ocdwrap.collect(model, loader, source_mse, tmp_path_factory.mktemp("store"))
    assert store.load(["cond_out"])["cond_out"].shape == (16, 12)  # the pooled cells
    ocdwrap.fit(model, store, ocdwrap.FitArgs(**FIT, steps=5, seed=0), progress=False)
    return model


def test_fitted_on_one_length_predicts_another_and_reloads(fitted, tmp_path) -> None:
    longer = torch.randn(3, 128)  # fitted on 64 samples: the conditioning is as wide
    with fitted.sampling(seed=0):
        one = fitted(longer)
    with fitted.disable_adapter():
        base = fitted(longer)
    assert one.shape == (3, 3, 128) and not torch.allclose(one, base)
    fitted.save_pretrained(tmp_path / "adapter")
    loaded = ocdwrap.OCDModel.from_pretrained(_separator(), tmp_path / "adapter")
    assert (loaded.config.output_layout, loaded.config.output_grid) == (
        "sequence_channels_first",
        4,
    )
    with loaded.sampling(seed=0):
        torch.testing.assert_close(loaded(longer), one)


def test_the_token_reading_after_fitting_names_the_setting(fitted) -> None:
    fitted.config = fitted.config.replace(output_layout="channels_first")
    try:
        with pytest.raises(
            BaseModelMismatchError, match=r"\(8, 24, 64\).*\(8, 24, 12\).*output_layout"
        ):
            fitted(torch.randn(2, 64))
    finally:
        fitted.config = fitted.config.replace(output_layout="sequence_channels_first")


# --- ensembles whose draws need aligning (speaker order) --------------------------------------
def test_ensemble_align_reorders_each_draw_before_combining(fitted) -> None:
    x = torch.randn(2, 64)
    plain = fitted.ensemble(x, num_draws=3, rng=torch.Generator().manual_seed(0))
    seen = []

    def swap_odd_draws(d: torch.Tensor) -> torch.Tensor:  # speakers 0 and 1 swapped in draw 1
        seen.append(d.clone())
        out = d.clone()
        out[1] = d[1][:, [1, 0, 2]]
        return out

    ens = fitted.ensemble(
        x, num_draws=3, rng=torch.Generator().manual_seed(0), align=swap_odd_draws
    )
    torch.testing.assert_close(seen[0], plain.draws)  # the raw draws, (K, B, S, T)
    expected = swap_odd_draws(plain.draws)
    torch.testing.assert_close(ens.draws, expected)
    torch.testing.assert_close(ens.mean, expected.mean(0))
    torch.testing.assert_close(ens.output, expected.mean(0))
    torch.testing.assert_close(ens.std, expected.std(0, unbiased=False))
    assert not torch.allclose(ens.mean, plain.mean)  # the hook changed what was averaged
    loader = DataLoader(TensorDataset(x, torch.zeros(2, 3, 64)), batch_size=2)
    res = ocdwrap.evaluate_ocd(
        fitted, loader, source_mse, num_draws=3, task="regression", align=swap_odd_draws
    )
    assert res["loss"] == pytest.approx(float(source_mse(ens.mean, torch.zeros(2, 3, 64)).mean()))


def test_ensemble_align_of_another_shape_names_the_problem(fitted) -> None:
    with pytest.raises(ConfigError, match=r"returned \(2, 3, 64\).*\(3, 2, 3, 64\).*same shape"):
        fitted.ensemble(torch.randn(2, 64), num_draws=3, align=lambda d: d.mean(0))
