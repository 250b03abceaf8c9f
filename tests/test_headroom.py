"""ocdwrap.headroom: the report's rows, its claims on an underfitting vs a converged base, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.errors import BatchFormatError, EmptyDataError, OCDError
from ocdwrap.headroom import (
    HeadroomReport,
    LabelMismatchError,
    NotWrappedError,
    ProbeFitError,
    headroom,
    soft_cross_entropy,
)

CE = nn.CrossEntropyLoss(reduction="none")


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y.view_as(pred)) ** 2).reshape(pred.shape[0], -1).mean(1)


def _data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes the MLP's input determines
    return x, y


def _loader(x: torch.Tensor, y: torch.Tensor, bs: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _wrapped(lr: float = 1e-2) -> ocdwrap.OCDModel:
    return ocdwrap.wrap(make_mlp(), layer="fc2", config=ocdwrap.OCDConfig(overfit_lr=lr))


@pytest.fixture(scope="module")
def report() -> HeadroomReport:
    return headroom(_wrapped(), _loader(*_data()), CE)


def test_upper_bound_below_base_and_rows(report: HeadroomReport) -> None:
    assert [r.name for r in report.rows] == [
        "base",
        "overfit",
        "own_label",
        "probe",
        "probe_mixture",
    ]
    base, bound = report.row("base"), report.row("overfit")
    assert bound.loss < base.loss
    assert bound.accuracy >= base.accuracy
    assert bound.share_loss == pytest.approx(100.0)
    assert bound.cosine == pytest.approx(1.0, abs=1e-5)
    assert report.task == "classification" and report.n == 200
    assert report.n_base_correct + report.n_base_wrong == 200
    assert "cross-fitted" in report.probe["source"]
    # the ceiling is the best label-free share, clipped to [0, 100]
    free = [report.row(n).share_loss for n in ("own_label", "probe", "probe_mixture")]
    assert report.ceiling == pytest.approx(min(100.0, max(0.0, max(free))))
    assert f"about {report.ceiling:.0f} %" in report.verdict


def test_base_row_is_the_base_model(report: HeadroomReport) -> None:
    x, y = _data()
    with torch.no_grad():
        expected = CE(make_mlp()(x), y).mean()
    assert report.row("base").loss == pytest.approx(float(expected), rel=1e-6)


def test_probe_with_the_base_softmax_equals_the_base() -> None:
    """Overfitting towards the base's own soft prediction has zero gradient (p - q = 0)."""
    model = _wrapped()
    rep = headroom(model, _loader(*_data()), CE, probe=lambda cond, pred: pred.softmax(-1))
    base, probe = rep.row("base"), rep.row("probe")
    assert probe.loss == base.loss
    assert probe.accuracy == base.accuracy
    assert probe.share_loss == 0.0
    assert probe.cosine == 0.0  # the delta is exactly zero
    assert rep.probe["kind"].startswith("user-supplied")


def test_soft_cross_entropy_matches_autograd() -> None:
    z = torch.randn(5, 4, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4), -1)
    soft_cross_entropy(z, q).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    ref = -(q * torch.log_softmax(z2, -1)).sum(-1)
    ref.sum().backward()
    assert torch.allclose(soft_cross_entropy(z, q), ref)
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)


def _digits_mlp(epochs: int) -> tuple[nn.Module, list]:
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.data, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(d.target)[perm]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(1200)
        for i in range(0, 1200, 32):
            idx = order[i : i + 32]
            loss = CE(net(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    held = [(x[i : i + 200], y[i : i + 200]) for i in range(1200, len(y), 200)]
    return net.eval(), held


def test_probe_captures_more_on_an_underfitting_base() -> None:
    """Digits MLP, Adam 5e-4 x 3 on the middle layer, cross-fitted probe: the probe's soft label
    closes most of the gap for a 1-epoch base and little of it for a 40-epoch base
    (docs/headroom.md, "An underfitting base vs a converged one")."""
    shares = {}
    for epochs in (1, 40):
        net, held = _digits_mlp(epochs)
        rep = headroom(ocdwrap.wrap(net, layer="2"), held, CE, mixture_classes=0)
        shares[epochs] = rep.row("probe").share_loss
        assert rep.row("overfit").loss < rep.row("base").loss
    # measured: docs/results/headroom_examples.json (seed 0 is this setting: the probe falls back
    # to the base after forty epochs; on other seeds it finds a part of the small gap)
    assert shares[1] > 60.0
    assert shares[40] < shares[1] - 40.0


def test_train_loader_probe_and_max_samples() -> None:
    x, y = _data(300)
    rep = headroom(
        _wrapped(),
        _loader(x[:100], y[:100], bs=32),
        CE,
        max_samples=90,  # cuts the third batch
        train_loader=_loader(x[100:], y[100:]),
        mixture_classes=2,
    )
    assert rep.n == 90
    assert "train_loader" in rep.probe["source"] and "200 samples" in rep.probe["source"]


def test_regression_rows() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(120, 5)
    y = x[:, :1] * 2 + 0.5 * x[:, 1:2] ** 2
    model = ocdwrap.wrap(net.eval(), layer="2", config=ocdwrap.OCDConfig(overfit_lr=1e-2))
    rep = headroom(model, _loader(x, y.squeeze(1), bs=40), _mse)
    assert rep.task == "regression"
    names = ["base", "overfit", "own_label", "probe", "probe_mixture"]
    assert [r.name for r in rep.rows] == names
    assert rep.probe["mixture_points"] == 8 and rep.probe["residual_std"][0] > 0
    assert rep.row("base").accuracy is None
    assert rep.row("overfit").loss < rep.row("base").loss
    own = rep.row("own_label")
    assert own.loss == rep.row("base").loss and "zero gradient" in own.note
    assert "ridge" in rep.probe["kind"]
    assert "median" in rep.split


def test_to_dict_round_trip_and_table(report: HeadroomReport) -> None:
    d = report.to_dict()
    text = json.dumps(d)  # plain numbers and strings
    back = HeadroomReport.from_dict(json.loads(text))
    assert back.to_dict() == d
    assert set(d["rows"]) == {"base", "overfit", "own_label", "probe", "probe_mixture"}
    assert d["rows"]["base"]["loss"] == report.row("base").loss
    table = str(report)
    assert "| row | loss | acc % |" in table
    for name in d["rows"]:
        assert f"| {name} |" in table
    assert "verdict: a label-free generator can be expected to capture at most about" in table


def test_model_state_is_left_alone() -> None:
    model = _wrapped()
    model.base_model.train()
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    headroom(model, _loader(*_data(60)), CE, mixture_classes=0)
    assert model.base_model.training
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, before[k])


# --- bad input -------------------------------------------------------------------------------------


def test_unlabelled_loader() -> None:
    x, _ = _data()
    with pytest.raises(BatchFormatError, match="labelled held-out loader"):
        headroom(_wrapped(), DataLoader(TensorDataset(x), batch_size=32), CE)


def test_empty_loader() -> None:
    with pytest.raises(EmptyDataError):
        headroom(_wrapped(), [], CE)


@pytest.mark.parametrize(
    "labels, match",
    [
        (lambda y: y + 5, "labels 0..2"),  # out of range for 3 classes
        (lambda y: y.float(), "integer class index"),  # float labels with cross-entropy
        (lambda y: y.unsqueeze(1), "integer class index"),  # (B, 1) labels
    ],
)
def test_labels_that_do_not_fit(labels, match: str) -> None:
    x, y = _data()
    with pytest.raises(LabelMismatchError, match=match) as info:
        headroom(_wrapped(), _loader(x, labels(y)), CE, task="classification")
    assert isinstance(info.value, OCDError) and isinstance(info.value, ValueError)


def test_labels_the_loss_cannot_take() -> None:
    x, y = _data()
    with pytest.raises(LabelMismatchError, match="loss_fn could not score"):
        headroom(_wrapped(), _loader(x, torch.randn(len(y), 7)), _mse)


def test_not_wrapped() -> None:
    with pytest.raises(NotWrappedError, match=r"ocdwrap.wrap\(base") as info:
        headroom(make_mlp(), _loader(*_data()), CE)
    assert isinstance(info.value, TypeError)


def test_probe_cannot_be_fitted_on_a_single_class() -> None:
    x, _ = _data()
    y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(ProbeFitError, match="at least two classes"):
        headroom(_wrapped(), _loader(x, y), CE)


def test_probe_needs_enough_samples_and_a_distribution() -> None:
    x, y = _data(6)
    with pytest.raises(ProbeFitError, match="at least 10 samples"):
        headroom(_wrapped(), _loader(x, y), CE)
    with pytest.raises(ProbeFitError, match="summing to 1"):
        headroom(_wrapped(), _loader(x, y), CE, probe=lambda cond, pred: pred)


# --- the command line ------------------------------------------------------------------------------

_CLI_FILE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]


def unlabelled():
    return [torch.randn(8, 10)]
"""


def test_cli_headroom(tmp_path, capsys) -> None:
    from ocdwrap.cli import main

    path = tmp_path / "user.py"
    path.write_text(_CLI_FILE)
    argv = ["headroom", "--model", f"{path}:model", "--data", f"{path}:data", "--layer", "2"]
    argv += ["--set", "overfit_lr=0.01", "--mixture-classes", "2"]
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n"] == 120 and d["layer"] == "2" and d["overfit"]["lr"] == 0.01
    assert d["rows"]["overfit"]["loss"] < d["rows"]["base"]["loss"]
    assert main(argv) == 0
    assert "verdict:" in capsys.readouterr().out
    bad = ["headroom", "--model", f"{path}:model", "--data", f"{path}:unlabelled", "--layer", "2"]
    assert main(bad) == 2
    assert "labelled held-out loader" in capsys.readouterr().err


def test_regression_mixture_is_the_probe_delta_when_the_probe_is_certain() -> None:
    """With no residual spread the quantile mixture is the delta towards the probe's target;
    with a spread wider than the residual, steps towards both sides of the base cancel."""
    from ocdwrap.overfit import overfit_batch
    from ocdwrap.probe import gaussian_mixture

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    model = ocdwrap.wrap(net.eval(), layer="2", config=ocdwrap.OCDConfig(overfit_lr=1e-2))
    x = torch.randn(6, 5)
    with model.disable_adapter(), torch.no_grad():
        base = model(x)  # (6, 1)
    mean = base + 0.5
    target = mean.squeeze(1)
    certain = gaussian_mixture(model, x, target, _mse, mean, torch.zeros(1), 8)
    towards = overfit_batch(model, x, target, _mse).delta
    torch.testing.assert_close(certain, towards, rtol=1e-5, atol=1e-8)
    unsure = gaussian_mixture(model, x, target, _mse, mean, torch.full((1,), 50.0), 8)
    assert float(unsure.norm()) < 0.5 * float(towards.norm())


def test_a_wide_regression_output_keeps_a_summary_of_the_residual_spread() -> None:
    """A waveform or an image has one residual spread per element: the report keeps a summary,
    so a benchmark JSON does not grow by one number per output element."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 100))
    x, y = torch.randn(40, 5), torch.randn(40, 100)
    model = ocdwrap.wrap(net.eval(), layer="2", config=ocdwrap.OCDConfig(overfit_lr=1e-2))
    rep = headroom(model, _loader(x, y, bs=20), _mse, mixture_classes=0)
    summary = rep.probe["residual_std_summary"]
    assert "residual_std" not in rep.probe and summary["outputs"] == 100
    assert 0 < summary["min"] <= summary["mean"] <= summary["max"]
