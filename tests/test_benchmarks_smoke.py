"""Every benchmark runs end to end on a tiny setting (``--smoke``) and reports every row; the
shared pieces (benchmarks.results, benchmarks.notes, benchmarks.report, benchmarks.figures,
benchmarks.timing, benchmarks.scoring, benchmarks.experiment) give the numbers and markdown
docs/results.md is built from. Every domain computes its shared rows through ``ocdwrap.compare``:
its JSON carries the comparison, and the table's rows are the comparison's."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import benchmarks.cli as cli
import benchmarks.controls as controls
from benchmarks import figures, notes, report, timing
from benchmarks.datasets import available, tensor_loader
from benchmarks.experiment import COMPARE_ROWS
from benchmarks.results import Metric, Results, Row
from benchmarks.scoring import Task, evaluate_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"mnist": "mnist", "tabular": "california_housing", "fashion_mnist": "fashion_mnist"}


def _need(*names: str) -> None:
    have = available()
    missing = [n for n in names if not have[n]]
    if missing:
        pytest.skip(f"data not installed: {missing} (tests/test_datasets.py names the install)")


def _check(part: dict, rows: list) -> None:
    assert list(part["rows"]) == [r.key for r in rows]
    for key, row in part["rows"].items():
        for metric, stats in row["metrics"].items():
            assert stats["n"] == 1, (key, metric)
            assert stats["mean"] == stats["mean"], (key, metric)  # not NaN
    assert "| row |" in part["table"]
    _check_compare(part)


def _check_compare(part: dict, key: str = "ocd", metric: str | None = None) -> None:
    """The table's shared rows are ocdwrap.compare's: the JSON carries the comparison, and each
    shared row of the table has the comparison's mean loss (``metric``: the table's column
    that is the mean loss, "loss" or "mse"; None for a table without one)."""
    comparison = part["info"]["0"][key]["comparison"]
    shared = [r for r in COMPARE_ROWS if r in part["rows"]]
    assert {"base", "overfit", "ocd", "ocd_k"} <= set(shared)
    assert set(shared) <= set(comparison["rows"])
    assert comparison["verdict"].startswith(("the best row", "no gap"))
    metric = metric or next(
        (m for m in ("loss", "mse") if m in part["rows"]["base"]["metrics"]), None
    )
    if metric is None:
        return
    for row in shared:
        ours = part["per_seed"]["0"][row][metric]
        assert ours == pytest.approx(comparison["rows"][row]["loss"], rel=1e-9), row


def _smoke_argv(tmp_path) -> list[str]:
    return ["--smoke", "--json", str(tmp_path / "out.json"), "--workdir", str(tmp_path / "work")]


def test_mnist_smoke_as_a_module(tmp_path) -> None:
    """``python -m benchmarks.mnist`` from the repository root: the script finds the installed
    ``mnist`` data package (benchmarks/mnist.py does not shadow it) and prints its table."""
    _need("mnist")
    figs = tmp_path / "figs"
    argv = _smoke_argv(tmp_path) + ["--plots", str(figs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mnist", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base LeNet5 (early stopping on val split) |" in proc.stdout
    from benchmarks import mnist

    part = json.loads((tmp_path / "out.json").read_text())
    _check(part, mnist.ROWS)
    assert part["command"].startswith("python -m benchmarks.mnist --smoke")
    rows = part["per_seed"]["0"]
    # the "no scaling" ablation runs the same generator with the training set's mean rho
    assert rows["global"] != rows["ocd"] and rows["sgd_global"] != rows["sgd_ocd"]
    assert "| row |" in report.render(str(tmp_path / "out.json"))
    assert (figs / "results-mnist.png").stat().st_size > 10_000
    _check_headroom(part)
    assert "headroom report (ocdwrap.headroom on 500 held-out samples" in proc.stdout


def _check_headroom(part: dict) -> None:
    """The headroom report of the validation split is in the JSON, before any OCD row."""
    hr = part["info"]["0"]["headroom"]
    rows = hr["rows"]
    assert set(rows) >= {"base", "overfit", "own_label", "probe"}
    assert rows["overfit"]["loss"] < rows["base"]["loss"]  # the bound beats the base
    assert hr["ceiling"] is None or 0 <= hr["ceiling"] <= 100
    assert hr["n"] > 0 and hr["seconds"] > 0


def test_headroom_only_stops_after_the_report(tmp_path) -> None:
    _need(DATA["tabular"])
    from benchmarks import tabular

    tabular.main(_smoke_argv(tmp_path) + ["--headroom-only"])
    part = json.loads((tmp_path / "out.json").read_text())
    _check_headroom(part)
    assert set(part["per_seed"]["0"]) == {"base"}  # nothing collected or fitted


@pytest.mark.parametrize("name", ["tabular", "fashion_mnist"])
def test_smoke_rows(name: str, tmp_path) -> None:
    _need(DATA[name])
    module = importlib.import_module(f"benchmarks.{name}")
    figs = tmp_path / "figs"
    module.main(_smoke_argv(tmp_path) + ["--plots", str(figs)])
    part = json.loads((tmp_path / "out.json").read_text())
    _check(part, module.ROWS)
    assert part["command"].startswith(f"python -m benchmarks.{name} --smoke")
    assert "| row |" in report.render(str(tmp_path / "out.json"))
    assert (figs / f"results-{name}.png").stat().st_size > 10_000
    _check_headroom(part)


def test_smoke_text(tmp_path) -> None:
    _need("minilm", "rotten_tomatoes", "womens_reviews")
    from benchmarks import text_fewshot

    out = tmp_path / "out.json"
    argv = _smoke_argv(tmp_path) + ["--cache-dir", str(tmp_path / "c")]
    text_fewshot.main(argv + ["--plots", str(tmp_path / "figs")])
    d = json.loads(out.read_text())
    assert d["command"].startswith("python -m benchmarks.text_fewshot --smoke")
    assert set(d["datasets"]) == {"rotten_tomatoes", "womens_department"}
    for key, part in d["datasets"].items():
        _check(part, text_fewshot.ROWS)
        rep = part["info"]["0"]["ocd"]["uncertainty"]
        for target in ("ocd_wrong", "base_wrong"):
            assert set(rep["auroc"][target]) == {"spread", "base_msp", "ocd_mean_prob"}
            assert all(0.0 <= v <= 1.0 for v in rep["auroc"][target].values())
        assert rep["errors"]["base"] == round((1 - rep["accuracy"]["base"]) * rep["n"])
        for fig in (
            "results-text_fewshot-{}",
            "text_fewshot-{}-reliability",
            "text_fewshot-{}-uncertainty",
        ):
            assert (tmp_path / "figs" / (fig.format(key) + ".png")).stat().st_size > 10_000
    section = report.render(str(out), "uncertainty_table")
    assert section.count("| OCD ensemble spread (std between draws) |") == 2
    with pytest.raises(KeyError, match="rerun its script"):
        report.render(str(out), "no_such_section")


def test_smoke_tabular_linear_base(tmp_path) -> None:
    _need("california_housing")
    from benchmarks import tabular

    argv = ["--smoke", "--hidden-layers", "0", "--overfit-lr", "0.02", "--json"]
    argv += [str(tmp_path / "out.json")]
    tabular.main(argv + ["--workdir", str(tmp_path / "work")])
    part = json.loads((tmp_path / "out.json").read_text())
    _check(part, tabular.rows_for(tabular.parse_args(argv)))
    assert "alt" not in part["rows"]
    assert all(not r["paper"] for r in part["rows"].values())  # the paper's rows are for the MLP
    assert part["rows"]["overfit"]["label"] == "overfit head on test (Adam 0.02 × 3; upper bound)"
    assert part["info"]["0"]["ocd"]["layer"] == "head"


def test_smoke_layer_selection(tmp_path, capsys) -> None:
    _need("mnist", "california_housing")
    from benchmarks import layer_selection

    out = tmp_path / "selection.json"
    r = layer_selection.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["command"] == (
        f"python -m benchmarks.layer_selection --smoke --json {out}"
    )
    for key, paper in (
        ("lenet5_mnist", "fc2"),
        ("mlp_california", "blocks.0.linear"),
        ("resnet18_fashion", "fc"),
    ):
        assert r[key]["paper_pick"] == paper
        for perturbation in ("gaussian", "reinit"):
            names = [s["name"] for s in r[key][perturbation]["layers"]]
            assert r[key][perturbation]["best"] in names, (key, perturbation)
    assert r["lenet5_mnist"]["epoch_seconds"] > 0
    assert "## Summary" in capsys.readouterr().out


def _report(spread_auroc: float, low: float) -> dict:
    scores = {"spread": spread_auroc, "base_msp": 0.8, "ocd_mean_prob": 0.81}
    added = {"difference": low + 0.01, "difference_low": low, "difference_high": low + 0.02}
    return {
        "num_draws": 5,
        "n_bins": 15,
        "n": 100,
        "auroc": {"ocd_wrong": scores, "base_wrong": scores},
        "added_value": {"ocd_wrong": added, "base_wrong": added},
        "accuracy": {"base": 0.9, "ocd": 0.91},
        "errors": {"base": 10, "ocd": 9},
        "ece": {"base": 0.05, "ocd": 0.04},
        "spearman_spread_vs_base_msp": 0.9,
    }


def test_uncertainty_table_mean_sd_over_seeds() -> None:
    text = notes.uncertainty_table([_report(0.6, -0.01), _report(0.7, 0.02)])
    spread = next(line for line in text.splitlines() if line.startswith("| OCD ensemble spread"))
    assert "0.6500 ± 0.0707" in spread  # mean ± sample sd of 0.6 and 0.7
    added = next(line for line in text.splitlines() if "added by the spread" in line)
    assert "1 of 2 with the 95 % interval above 0" in added
    assert "| accuracy (%) | 90.00 ± 0.00 | 91.00 ± 0.00 |" in text
    assert notes.uncertainty_table([]) == ""


def test_summary_table_gap_share(tmp_path) -> None:
    rows = [
        Row("base", "base", {"loss": "0.080"}),
        Row("ocd", "OCD", {"loss": "0.010"}),
        Row("ocd_k", "OCD(5)"),
        Row("regression", "regression"),
        Row("nearest", "nearest neighbour"),
        Row("overfit", "overfit on test", {"loss": "0.002"}),
    ]
    res = Results("mnist", rows, [Metric("loss", "CE", ".4f")])
    for seed, (b, o, u) in enumerate([(0.04, 0.03, 0.02), (0.05, 0.04, 0.01)]):
        for key, v in {"base": b, "ocd": o, "ocd_k": b, "overfit": u}.items():
            res.add(seed, key, {"loss": v})
        res.add(seed, "regression", {"loss": b - 0.001})
        res.add(seed, "nearest", {"loss": b - 0.002})
    path = tmp_path / "mnist.json"
    res.write(str(path), command="python -m benchmarks.mnist")
    line = report.summary_table([str(path)]).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "MNIST / LeNet5" and cells[1] == "cross-entropy"
    assert cells[5].endswith("(nearest neighbour)")  # the best label-free row, lower loss
    assert cells[7] == "37.5 ± 17.7 %"  # per seed 50 % and 25 %
    assert cells[8] == "0.0 ± 0.0 %"  # OCD(5) equal to the base in both seeds
    assert cells[9] == "90 %"  # (0.080 - 0.010) / (0.080 - 0.002)
    with pytest.raises(KeyError, match="add it to the script's rows"):
        res.add(0, "no_such_row", {"loss": 0.0})


def test_report_update_renders_the_committed_docs(tmp_path, capsys) -> None:
    """``python -m benchmarks.report --update`` on docs/results.md and docs/figures.md changes
    nothing: every block there is the verbatim rendering of the committed JSONs."""
    docs = [
        shutil.copy(os.path.join(ROOT, "docs", n), tmp_path / n)
        for n in ("results.md", "figures.md")
    ]
    report.main(["--update", *map(str, docs)])
    for doc in docs:
        name = os.path.basename(doc)
        with open(os.path.join(ROOT, "docs", name)) as f:
            assert open(doc).read() == f.read(), f"docs/{name} is not what its JSONs render"
    printed = capsys.readouterr().out
    for name in ("results.md", "figures.md"):  # every marked block was rendered
        with open(os.path.join(ROOT, "docs", name)) as f:
            blocks = sum(line.startswith("<!-- render: ") for line in f)
        assert blocks >= 1 and f"{name}: {blocks} blocks rendered" in printed
    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text("<!-- render: docs/results/mnist.json -->\nold text\n")
    with pytest.raises(ValueError, match="not closed"):
        report.update_markdown(str(unclosed))


def test_figures_from_json_on_disk(tmp_path, capsys) -> None:
    written = figures.main([str(tmp_path), os.path.join(ROOT, "docs", "results", "tabular.json")])
    assert written == [str(tmp_path / "results-tabular.png")]
    assert (tmp_path / "results-tabular.png").stat().st_size > 10_000
    assert f"wrote {written[0]}" in capsys.readouterr().out


def test_timing_helpers() -> None:
    out, seconds = timing.timed(lambda: sum(range(1000)))
    assert out == 499500 and seconds >= 0
    assert timing.machine("cpu").endswith(")") and "-core CPU" in timing.machine("cpu")


def test_old_row_names_are_read_as_todays() -> None:
    """A JSON written before the shared rows went through ocdwrap.compare (nn, pseudo) is read
    under today's names (nearest, own_label), its rendered table kept as written."""
    from benchmarks.results import parts

    old = {"rows": {"base": {}, "nn": {}, "pseudo": {}}, "per_seed": {"0": {"nn": {"loss": 1.0}}}}
    ((_, part),) = parts({"datasets": {"x": {**old, "table": "| nn |"}}})
    assert list(part["rows"]) == ["base", "nearest", "own_label"]
    assert part["per_seed"]["0"] == {"nearest": {"loss": 1.0}} and part["table"] == "| nn |"


def test_command_line_reruns_the_module() -> None:
    argv = ["--smoke", "--json", "runs/a b.json"]
    assert cli.command("benchmarks.mnist", argv) == (
        "python -m benchmarks.mnist --smoke --json 'runs/a b.json'"
    )
    args = cli.resolve_defaults(cli.base_parser("benchmarks.mnist", "doc").parse_args(["--smoke"]))
    assert (args.fit_steps, args.delta, args.smoke) == (3000, "rank1", True)


def test_overfit_all_layers_zero_steps_is_the_base() -> None:
    """The vectorized per-sample overfit of every parameter: no step leaves the base's metrics,
    three steps on each test sample's own label lower its loss."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    test = tensor_loader(x, y, 8)
    task = Task.classification()
    before = evaluate_module(base, test, task, "cpu")
    same = controls.overfit_all_layers(base, test, task, steps=0, chunk=5)
    assert same["loss"] == pytest.approx(before["loss"], rel=1e-5) and same["acc"] == before["acc"]
    after = controls.overfit_all_layers(base, test, task, lr=0.05, steps=3, chunk=5)
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize("domain", ["mnist", "tabular"])
def test_smoke_sampling_steps(domain: str, tmp_path) -> None:
    """benchmarks.sampling_steps scores one fitted generator at each step count and times it."""
    _need(DATA[domain])
    from benchmarks import sampling_steps

    argv = _smoke_argv(tmp_path) + ["--domain", domain]
    sampling_steps.main(argv)
    part = json.loads((tmp_path / "out.json").read_text())
    rows = part["rows"]
    assert list(rows) == [r.key for r in sampling_steps.rows(sampling_steps.parse_args(argv))]
    metric = "loss" if domain == "mnist" else "rmse"
    for key, row in rows.items():
        assert row["metrics"][metric]["n"] == 1, key
        # only the one-draw rows are timed
        assert row["metrics"]["overhead"]["n"] == int(key.startswith("ocd@")), key
    for s in (1, 3):  # the smoke step counts
        assert rows[f"ocd@{s}"]["metrics"]["overhead"]["mean"] > 0
