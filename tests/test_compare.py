"""ocdwrap.compare: every row with its share, the rows' definitions, resumption, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import make_mlp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.batches import sample_losses
from ocdwrap.compare import ROWS, Comparison, Metric, compare
from ocdwrap.ensemble import log_mean_probability
from ocdwrap.errors import (
    BatchFormatError,
    CollectionExistsError,
    ComparisonExistsError,
    ConfigError,
    NotFittedError,
    OCDError,
    RowFailedError,
)
from ocdwrap.generators import Generator, GlobalScale, conditioning_statistics, stored_deltas

CE = nn.CrossEntropyLoss(reduction="none")
# a small generator network and short fits: the plumbing, not a result
CONFIG = dict(overfit_lr=1e-2, mlp_hidden=32, cond_dim=16, mlp_layers=1)
FIT = ocdwrap.FitArgs(steps=20, batch_size=32)


def _data(n: int = 260, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


X, Y = _data()
TRAIN = DataLoader(TensorDataset(X[:160], Y[:160]), batch_size=80)
EVAL = DataLoader(TensorDataset(X[160:], Y[160:]), batch_size=50)


def _wrapped(**over) -> ocdwrap.OCDModel:
    return ocdwrap.wrap(make_mlp(), layer="fc2", config=ocdwrap.OCDConfig(**{**CONFIG, **over}))


class MeanDelta:
    """A user generator: every input gets the training set's mean delta."""

    def fit(self, model, store, args) -> None:
        self.mean = stored_deltas(store)[1].full().mean(0)

    def generate(self, model, cond, inputs, rng):
        return ocdwrap.FullDelta(self.mean.expand(cond.layer_input.shape[0], *self.mean.shape))


def _train_fn(log: list):
    def train(base: nn.Module, seconds: float) -> None:
        log.append(seconds)
        torch.manual_seed(0)
        opt = torch.optim.Adam(base.parameters(), lr=1e-3)
        for x, y in TRAIN:  # a fixed amount of training: the row is reproducible
            opt.zero_grad()
            CE(base(x), y).mean().backward()
            opt.step()

    return train


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.argmax(-1) == y).float()


def _balanced(pred: torch.Tensor, y: torch.Tensor) -> float:  # one group per label
    return float((pred.argmax(-1) == y).float().mean())


METRICS = {
    "acc": Metric(_accuracy, True),
    "balanced": Metric(_balanced, True, per="group", group_fn=lambda x, y: y),
}


def _kw(**over):
    return {"fit_args": FIT, "progress": False, "resamples": 200, "num_draws": 3, **over}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Comparison, str, ocdwrap.OCDModel, list]:
    out = str(tmp_path_factory.mktemp("compare"))
    model, seen = _wrapped(), []
    c = compare(
        model, TRAIN, EVAL, CE, out_dir=out, train_fn=_train_fn(seen),
        generators={"mean": MeanDelta()}, metrics=METRICS, **_kw(),
    )  # fmt: skip
    return c, out, model, seen


def test_every_row_with_its_share(full) -> None:
    c = full[0]
    assert [r.name for r in c.rows] == [*ROWS, "mean"]
    for r in c.rows:
        assert r.skipped is None and r.share is not None, r
        assert r.share_low <= r.share + 1e-9 and r.share <= r.share_high + 1e-9
        assert r.metrics["acc"] == pytest.approx(r.metric)
    base, bound = c.row("base"), c.row("overfit")
    assert bound.loss < base.loss and bound.share == 100.0 and base.share == 0.0
    assert bound.uses_eval_labels and not c.row("ocd").uses_eval_labels
    assert base.predict_time == pytest.approx(1.0)
    pred = full[2].base_model(X[160:])
    per_label = [float((pred[Y[160:] == k].argmax(-1) == k).float().mean()) for k in range(3)]
    assert base.metrics["balanced"] == pytest.approx(sum(per_label) / 3)
    # the configured generator was fitted on the model, the regressor left it as it was
    model = full[2]
    assert model.config.generator == "diffusion" and model.hypernet is not None
    assert model.hypernet.config.generator == "diffusion" and model.fit_report is not None
    assert (
        c.best is not None and c.best != "overfit" and "best row without eval labels" in c.verdict
    )
    text = str(c)
    assert "verdict:" in text and "| ocd_k |" in text
    saved = json.load(open(os.path.join(full[1], "comparison.json")))
    assert Comparison.from_dict(saved["comparison"]).to_dict() == c.to_dict()


def test_headroom_and_compare_agree_on_their_common_rows(full) -> None:
    c = full[0]
    rep = ocdwrap.headroom(_wrapped(), EVAL, CE, train_loader=TRAIN, mixture_classes=0)
    assert [r.name for r in rep.rows][:2] == ["base", "overfit"]  # one set of row names
    for name in ("base", "overfit", "own_label", "probe"):
        assert c.row(name).loss == pytest.approx(rep.row(name).loss, rel=1e-6), name
    assert c.ceiling == pytest.approx(rep.ceiling)
    # a report saved by 0.2.0 names the bound overfit_on_test: read under today's name
    old = rep.to_dict()
    old["rows"] = {("overfit_on_test" if k == "overfit" else k): v for k, v in old["rows"].items()}
    back = ocdwrap.HeadroomReport.from_dict(old)
    assert back.row("overfit").loss == rep.row("overfit").loss
    assert rep.row("overfit_on_test") is rep.row("overfit")


def test_nearest_is_the_brute_force_nearest_neighbour(full) -> None:
    c, out, model = full[0], full[1], full[2]
    store = ocdwrap.DeltaStore(out)
    data = store.load(["cond_in", "cond_act", "cond_out"])
    standardise = conditioning_statistics(store)
    train = standardise(ocdwrap.Conditioning.from_dict(data))
    _, spec = stored_deltas(store)
    losses = []
    for x, y in EVAL:
        cond, _ = model.conditioning(x)
        q = standardise(cond)
        nearest = torch.tensor([int(((train - v) ** 2).sum(1).argmin()) for v in q])
        with torch.no_grad(), model.use_deltas(spec.index(nearest)):
            losses.append(sample_losses(CE, model(x), y, len(y)))
    assert c.row("nearest").loss == pytest.approx(float(torch.cat(losses).mean()), rel=1e-6)


def test_a_user_generator_is_scored_as_a_row(full) -> None:
    c, out, model = full[0], full[1], full[2]
    assert isinstance(MeanDelta(), Generator)
    mean = stored_deltas(ocdwrap.DeltaStore(out))[1].full().mean(0)
    losses = []
    for x, y in EVAL:
        with torch.no_grad(), model.use_deltas(ocdwrap.FullDelta(mean.expand(len(y), *mean.shape))):
            losses.append(CE(model(x), y))
    assert c.row("mean").loss == pytest.approx(float(torch.cat(losses).mean()), rel=1e-6)
    assert "MeanDelta" in c.row("mean").source


def test_compute_matched_gets_the_measured_seconds(full) -> None:
    c, seen = full[0], full[3]
    info = c.info
    assert seen == [pytest.approx(info["collect_s"] + info["fit_s"]["ocd"])]
    assert info["collect_s"] > 0 and c.row("compute_matched").build_seconds > 0
    record = json.load(open(os.path.join(full[1], "compare_collection.json")))
    assert record["seconds"] == pytest.approx(info["collect_s"])


def test_a_rerun_reuses_every_row_and_other_settings_are_refused(full) -> None:
    c, out = full[0], full[1]
    seen: list = []
    again = compare(
        _wrapped(), TRAIN, EVAL, CE, out_dir=out, train_fn=_train_fn(seen),
        generators={"mean": MeanDelta()}, metrics=METRICS, **_kw(),
    )  # fmt: skip
    assert seen == [] and again.to_dict()["rows"] == c.to_dict()["rows"]
    with pytest.raises(ComparisonExistsError, match="num_draws"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=out, **_kw(num_draws=2))


def _same_rows(a: Comparison, b: Comparison, names, fields=("metrics",)) -> None:
    for name in names:
        ra, rb = a.row(name), b.row(name)
        for field in ("loss", "metric", "share", "share_low", "share_high", *fields):
            assert getattr(ra, field) == pytest.approx(getattr(rb, field), rel=1e-6), (name, field)


def test_an_interrupted_compare_resumes_to_the_uninterrupted_one(full, tmp_path) -> None:
    def broken(base, seconds):
        raise RuntimeError("out of memory")

    calls = {"n": 0}

    def flaky(pred, y):
        calls["n"] += 1
        if calls["n"] == 6:  # base, overfit, own_label, probe, ocd kept; stops at ocd_k
            raise ValueError("metric down")
        return _accuracy(pred, y)

    kw = _kw(metrics={"acc": Metric(flaky, True)}, generators={"mean": MeanDelta()})
    with pytest.raises(RowFailedError, match="'ocd_k'.*a metric"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path, train_fn=broken, **kw)
    kept = json.load(open(tmp_path / "comparison.json"))["comparison"]["rows"]
    assert sorted(kept) == ["base", "ocd", "overfit", "own_label", "probe"]
    with pytest.raises(RowFailedError, match="'compute_matched'.*train_fn raised RuntimeError"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path, train_fn=broken, **kw)
    kept = json.load(open(tmp_path / "comparison.json"))["comparison"]["rows"]
    assert "compute_matched" not in kept and "mean" in kept
    seen: list = []
    c = compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path, train_fn=_train_fn(seen), **kw)
    assert len(seen) == 1
    _same_rows(c, full[0], [*ROWS, "mean"], fields=())
    for name in [*ROWS, "mean"]:
        assert c.row(name).metrics["acc"] == pytest.approx(full[0].row(name).metrics["acc"])


def test_features_move_only_the_nearest_row(full, tmp_path) -> None:
    c = compare(
        _wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path, rows=["nearest"], features=lambda x: x,
        **_kw(),
    )  # fmt: skip
    assert [r.name for r in c.rows] == ["base", "overfit", "nearest"]
    _same_rows(c, full[0], ["base", "overfit"], fields=())
    idx, spec = stored_deltas(ocdwrap.DeltaStore(tmp_path))
    train_x = X[:160][idx]
    model = _wrapped()
    losses = []
    for x, y in EVAL:
        nearest = torch.cdist(x, train_x).argmin(1)
        with torch.no_grad(), model.use_deltas(spec.index(nearest)):
            losses.append(CE(model(x), y))
    assert c.row("nearest").loss == pytest.approx(float(torch.cat(losses).mean()), rel=1e-6)
    assert "features=" in c.row("nearest").description


def test_bad_input(tmp_path) -> None:
    unlabelled = DataLoader(TensorDataset(X[160:]), batch_size=50)
    with pytest.raises(BatchFormatError, match="compare needs a labelled eval_data"):
        compare(_wrapped(), TRAIN, unlabelled, CE, out_dir=tmp_path / "a", **_kw())
    with pytest.raises(ConfigError, match="Unknown rows \\['ocd_5'\\]"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "b", rows=["ocd_5"], **_kw())
    with pytest.raises(ConfigError, match="generate"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "b", generators={"x": 1}, **_kw())
    with pytest.raises(ConfigError, match="probe_samples=0"):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "b", probe_samples=0, **_kw())
    # a collection of another config in out_dir: refused, as collect refuses it
    ocdwrap.collect(_wrapped(overfit_lr=5e-3), TRAIN, CE, tmp_path / "c", progress=False)
    with pytest.raises(CollectionExistsError):
        compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "c", rows=["nearest"], **_kw())


def test_regression_marks_own_label_skipped_and_no_train_fn_skips_compute_matched(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x = torch.randn(120, 5)
    y = x[:, :1] * 2 + 0.1 * torch.randn(120, 1)
    mse = nn.MSELoss(reduction="none")
    model = ocdwrap.wrap(net, layer="2", config=ocdwrap.OCDConfig(**CONFIG))
    ev = DataLoader(TensorDataset(x[80:], y[80:]), batch_size=40)
    tr = DataLoader(TensorDataset(x[:80], y[:80]), batch_size=40)
    c = compare(
        model, tr, ev, mse, out_dir=tmp_path, rows=["own_label", "compute_matched"], **_kw()
    )
    assert c.task == "regression" and c.metric == "rmse"
    assert "zero gradient" in c.row("own_label").skipped
    assert "no train_fn" in c.row("compute_matched").skipped
    assert c.row("base").metric == pytest.approx(float(((net(x[80:]) - y[80:]) ** 2).mean().sqrt()))
    assert "skipped: " in str(c)


def test_the_model_card_carries_the_verdict(full, tmp_path) -> None:
    comparison, _, model, _ = full
    assert model.compare_report is comparison
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "`ocdwrap.compare`" in card and comparison.verdict in card
    from ocdwrap.card import read_card

    assert any("ocdwrap.compare" in s for s in read_card(str(tmp_path / "adapter"))["sections"])


def test_a_generator_is_scored_when_rows_does_not_name_it(tmp_path) -> None:
    kw = {**_kw(), "rows": ["nearest"], "generators": {"mean": MeanDelta()}}
    c = compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "g", **kw)
    assert [r.name for r in c.rows] == ["base", "overfit", "nearest", "mean"]
    assert c.row("mean").loss is not None


class HugeDelta(MeanDelta):
    """A generator whose deltas send the logits to thousands: cross-entropies far past 69."""

    def generate(self, model, cond, inputs, rng):
        return ocdwrap.FullDelta(1e5 * super().generate(model, cond, inputs, rng).delta)


def test_one_draw_cross_entropy_is_capped_as_the_ensembles(tmp_path) -> None:
    model = _wrapped()
    kw = {**_kw(), "rows": ["base"], "generators": {"huge": HugeDelta()}}
    c = compare(model, TRAIN, EVAL, CE, out_dir=tmp_path / "h", **kw)
    mean = stored_deltas(ocdwrap.DeltaStore(tmp_path / "h"))[1].full().mean(0)
    raw, capped = [], []
    for x, y in EVAL:
        spec = ocdwrap.FullDelta(1e5 * mean.expand(len(y), *mean.shape))
        with torch.no_grad(), model.use_deltas(spec):
            logits = model(x)
        raw.append(CE(logits, y))
        capped.append(CE(log_mean_probability(logits[None]), y))
    raw, capped = torch.cat(raw), torch.cat(capped)
    assert raw.max() > 1000 and capped.max() == pytest.approx(-math.log(1e-30), rel=1e-4)
    # one draw is scored as an ensemble of one: the same floor as OCDModel.ensemble
    assert c.row("huge").loss == pytest.approx(float(capped.mean()), rel=1e-5)
    assert c.row("huge").loss < float(raw.mean()) / 10


def test_global_scale_is_the_models_generator_at_the_mean_scale(tmp_path) -> None:
    model = _wrapped()
    with pytest.raises(NotFittedError, match="fit it first"):
        GlobalScale().generate(model, None, None, None)
    kw = {**_kw(), "rows": ["ocd"], "generators": {"global_scale": GlobalScale()}}
    c = compare(model, TRAIN, EVAL, CE, out_dir=tmp_path / "gs", **kw)
    rng, losses = torch.Generator().manual_seed(0), []
    for x, y in EVAL:
        with torch.no_grad(), model.sampling(scale="global"):
            cond, _ = model.conditioning(x)
            with model.use_deltas(model.generate(cond, rng=rng)):
                losses.append(CE(model(x), y))
    assert c.row("global_scale").loss == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)
    assert c.row("global_scale").loss != pytest.approx(c.row("ocd").loss, rel=1e-6)
    assert "ocdwrap.generators.GlobalScale" in c.row("global_scale").source


def test_probe_samples_caps_the_probes_training_data(full, tmp_path) -> None:
    _, out, _, _ = full
    kw = {**_kw(), "rows": ["probe"]}
    capped = compare(_wrapped(), TRAIN, EVAL, CE, out_dir=tmp_path / "p", probe_samples=40, **kw)
    assert "(40 samples)" in capped.info["probe"]["source"]
    assert capped.identity["probe_samples"] == 40  # a rerun without it is another comparison


def test_plot(full, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = full[0].plot(tmp_path / "compare.png")
    assert os.path.getsize(path) > 1000


def test_errors_are_ocd_errors() -> None:
    assert issubclass(RowFailedError, OCDError) and issubclass(
        ComparisonExistsError, FileExistsError
    )


_CLI_FILE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def _split(lo, hi):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + 40], y[i : i + 40]) for i in range(lo, hi, 40)]


def train():
    return _split(0, 120)


def test():
    return _split(120, 160)


def train_fn(base, seconds):
    SEEN.append(seconds)


SEEN = []


class Zero:  # a user generator: no delta at all (scores as the base)
    def fit(self, model, store, args):
        pass

    def generate(self, model, cond, inputs, rng):
        import ocdwrap

        w = model.target_layer.weight
        return ocdwrap.FullDelta(torch.zeros(cond.layer_input.shape[0], *w.shape))


def top2():
    from ocdwrap.compare import Metric

    return Metric(lambda p, y: (p.topk(2, -1).indices == y[:, None]).any(1).float(), True)


def first_feature(x):
    return x[:, :1]
"""


def test_cli_compare(tmp_path, capsys) -> None:
    from ocdwrap.cli import main

    path = tmp_path / "user.py"
    path.write_text(_CLI_FILE)
    argv = ["compare", "--model", f"{path}:model", "--data", f"{path}:test", "--layer", "2"]
    argv += ["--train-data", f"{path}:train", "--out", str(tmp_path / "out"), "--steps", "5"]
    argv += ["--rows", "nearest,compute_matched", "--train-fn", f"{path}:train_fn"]
    argv += ["--set", "overfit_lr=0.01", "mlp_hidden=32", "cond_dim=16", "mlp_layers=1"]
    assert main([*argv, "--json", "--resamples", "50"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert list(d["rows"]) == ["base", "overfit", "nearest", "compute_matched"]
    assert d["rows"]["overfit"]["loss"] < d["rows"]["base"]["loss"]
    assert main([*argv, "--resamples", "50"]) == 0  # resumed: every row kept
    assert "verdict:" in capsys.readouterr().out
    assert main([*argv, "--rows", "ocd_9"]) == 2
    assert "Unknown rows" in capsys.readouterr().err
    assert main([*argv, "--num-draws", "2"]) == 2  # other settings than --out holds
    assert "ComparisonExistsError" in capsys.readouterr().err
    # a generator, a metric and the nearest row's features of the user's, by import path
    extra = ["--generator", f"zero={path}:Zero", "--metric", f"top2={path}:top2"]
    extra += ["--features", f"{path}:first_feature", "--out", str(tmp_path / "out2")]
    assert main([*argv, *extra, "--json", "--resamples", "50"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert list(d["rows"]) == ["base", "overfit", "nearest", "compute_matched", "zero"]
    assert d["rows"]["zero"]["loss"] == pytest.approx(d["rows"]["base"]["loss"], rel=1e-6)
    assert d["rows"]["zero"]["metrics"]["top2"] >= d["rows"]["zero"]["metric"] / 100 - 1e-9
    assert main([*argv, "--generator", "zero"]) == 2
    assert "NAME=import.path" in capsys.readouterr().err


def test_verdict_branches() -> None:
    from ocdwrap.compare.report import Row, paired_share, verdict

    g = torch.Generator().manual_seed(0)
    base = 1.0 + torch.rand(200, generator=g, dtype=torch.float64)
    losses = {"base": base, "overfit": base - 0.5, "ocd": base - 0.3, "nearest": base - 0.1}
    rows = [Row("base", loss=float(base.mean()), share=0.0)]
    for name in ("overfit", "ocd", "nearest"):
        share, lo, hi = paired_share(base, losses["overfit"], losses[name], resamples=50)
        rows.append(Row(name, loss=float(losses[name].mean()), share=share, share_low=lo,
                        share_high=hi, uses_eval_labels=name == "overfit"))  # fmt: skip
    assert rows[2].share == pytest.approx(60.0) and rows[2].share_low == pytest.approx(60.0)
    best, text = verdict(rows, losses, resamples=50, seed=0)
    assert best == "ocd" and "OCD is the best, 40.0 points" in text and "nearest" in text
    rows[1].loss = rows[0].loss  # a bound that does not beat the base
    best, text = verdict(rows, losses, resamples=50, seed=0)
    assert best is None and "no gap" in text
