"""Figures (headless, non-empty PNGs) and the uncertainty metrics (against hand-computed cases)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import mlp_case
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from examples.results_chart import plot_results
from ocdwrap.analysis import plots
from ocdwrap.analysis.uncertainty import (
    auroc,
    bootstrap_auroc_difference,
    expected_calibration_error,
    misclassification_report,
    reliability_bins,
    roc_curve,
    spearman,
)

pytest.importorskip("matplotlib")

CE = torch.nn.CrossEntropyLoss(reduction="none")
SMALL = dict(mlp_hidden=32, cond_dim=32, mlp_layers=2, unet_channels=(8, 16))
FIT = dict(batch_size=16)  # the FitArgs of these tests


# --------------------------------------------------------------------------- AUROC / ECE by hand


def test_auroc_matches_hand_counted_pairs() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 2) / 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert math.isnan(auroc([1, 2, 3], [1, 1, 1]))


def test_auroc_accepts_torch_numpy_and_lists() -> None:
    s, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert auroc(torch.tensor(s), torch.tensor(y, dtype=torch.bool)) == pytest.approx(0.75)
    assert auroc(np.array(s), np.array(y)) == pytest.approx(0.75)


def test_auroc_agrees_with_sklearn_and_with_the_roc_area() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (500,), generator=g).double()  # many ties
    y = (torch.rand(500, generator=g) < 0.2 + 0.03 * s).long()
    fpr, tpr = roc_curve(s, y)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(auroc(s, y), abs=1e-12)
    sk = pytest.importorskip("sklearn.metrics")
    assert auroc(s, y) == pytest.approx(sk.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)


def test_ece_matches_hand_computation() -> None:
    probs = [[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.55, 0.45]]
    targets = [0, 1, 1, 0]
    # 5 bins: 0.9 -> (0.8, 1] right; 0.75, 0.7 -> (0.6, 0.8] one right; 0.55 -> (0.4, 0.6] right
    # ECE = (1 * |1 - 0.9| + 2 * |0.5 - 0.725| + 1 * |1 - 0.55|) / 4 = 0.25
    assert expected_calibration_error(probs, targets, n_bins=5) == pytest.approx(0.25)
    b = reliability_bins(probs, targets, n_bins=5)
    assert b.count.tolist() == [0, 0, 1, 2, 1]
    assert b.accuracy[3] == pytest.approx(0.5) and b.confidence[3] == pytest.approx(0.725)
    # perfectly calibrated: confidence 0.75 everywhere, 3 of 4 right
    assert expected_calibration_error([[0.75, 0.25]] * 4, [0, 0, 0, 1]) == pytest.approx(0.0)


def test_spearman_and_bootstrap() -> None:
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    d, lo, hi = bootstrap_auroc_difference(
        [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 0, 1, 1, 1], resamples=50
    )
    assert d == pytest.approx(1.0) and lo <= d <= hi


# --------------------------------------------------------------------------- a tiny fitted model


def _loader(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)),
        batch_size=32,
    )


@pytest.fixture(scope="module", params=["rank1", "full"])
def fitted(request, tmp_path_factory):
    m = ocdwrap.wrap(
        mlp_case().make(),
        layer="fc2",
        config=ocdwrap.OCDConfig(**SMALL, delta=request.param),
    )
    store = ocdwrap.collect(m, _loader(), CE, tmp_path_factory.mktemp("st"), progress=False)
    report = ocdwrap.fit(m, store, ocdwrap.FitArgs(**FIT, steps=40), progress=False)
    return m, report


def _png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plotting_does_not_import_matplotlib_until_called() -> None:
    code = (
        "import sys, ocdwrap, ocdwrap.analysis.plots, ocdwrap.analysis.uncertainty; "
        "assert 'matplotlib' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_layer_scores(tmp_path) -> None:
    scores = ocdwrap.select_layer(mlp_case().make(), _loader(16), CE, draws=8, progress=False)
    fig = plots.plot_layer_scores(scores, reference="fc2", path=tmp_path / "a" / "layers.png")
    _png(tmp_path / "a" / "layers.png")
    assert fig.axes
    plots.plot_layer_scores([["fc1", -3.0], ["fc2", 2.0]], path=tmp_path / "list.png")
    _png(tmp_path / "list.png")


def test_plot_fit_losses(fitted, tmp_path) -> None:
    _, report = fitted
    plots.plot_fit_losses(report, smooth=5, path=tmp_path / "fit.png")
    _png(tmp_path / "fit.png")
    plots.plot_fit_losses(
        {"diffusion": report, "from dict": report.to_dict()}, path=tmp_path / "fit2.png"
    )
    _png(tmp_path / "fit2.png")


def test_delta_comparison_and_heat_maps(fitted, tmp_path) -> None:
    model, _ = fitted
    x, y = next(iter(_loader(4, seed=1)))
    cmp = plots.delta_comparison(model, x, y, CE, rng=torch.Generator().manual_seed(0))
    assert cmp.generated.shape == cmp.overfit.shape == (4, 16, 32)
    assert cmp.cosine.shape == (4,) and bool((cmp.cosine.abs() <= 1 + 1e-5).all())
    plots.plot_deltas(cmp, layer="fc2", path=tmp_path / "deltas.png")
    _png(tmp_path / "deltas.png")
    plots.plot_deltas(cmp, images=torch.rand(4, 1, 8, 8), max_samples=2, path=tmp_path / "d2.png")
    _png(tmp_path / "d2.png")


def test_plot_results_with_seeds_and_paper_values(tmp_path) -> None:
    rows = {
        "base": [{"loss": 0.068, "accuracy": 0.979}, {"loss": 0.070, "accuracy": 0.977}],
        "ocd": {"loss": 0.060, "accuracy": 0.981},
        "overfit": {"loss": 0.027, "accuracy": 0.992},
    }
    paper = {"base": ("0.080 ± 0.009", "99.2 ± 0.1"), "ocd": {"loss": 0.010}, "x": "—"}
    fig = plot_results(rows, paper=paper, labels={"ocd": "OCD"}, path=tmp_path / "r.png")
    _png(tmp_path / "r.png")
    assert len(fig.axes) == 2
    plot_results({"a": 0.5, "b": [0.4, 0.45]}, metrics=["mse"], path=tmp_path / "r2.png")
    _png(tmp_path / "r2.png")


def test_uncertainty_report_and_its_figures(fitted, tmp_path) -> None:
    model, _ = fitted
    rep = misclassification_report(model, _loader(96, seed=2), num_draws=3, resamples=20)
    assert rep.n == 96 and rep.base_probs.shape == rep.ocd_probs.shape == (96, 3)
    assert set(rep.auroc) == {"ocd_wrong", "base_wrong"}
    for target in rep.auroc.values():
        assert set(target) == {"spread", "base_msp", "ocd_mean_prob"}
        assert all(0.0 <= v <= 1.0 for v in target.values())
    assert 0.0 <= rep.ece["base"] <= 1.0 and 0.0 <= rep.ece["ocd"] <= 1.0
    assert "AUROC" in rep.table() and isinstance(rep.to_dict()["spread_adds_information"], bool)
    plots.plot_reliability(rep, path=tmp_path / "rel.png")
    _png(tmp_path / "rel.png")
    plots.plot_uncertainty(rep, path=tmp_path / "unc.png")
    _png(tmp_path / "unc.png")
    plots.plot_uncertainty(rep, target="base", path=tmp_path / "unc_base.png")
    _png(tmp_path / "unc_base.png")
