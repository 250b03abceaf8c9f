"""Every benchmark script runs end to end on a tiny setting (``--smoke``) and reports every row."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"ocdwrap_bench_{name}", os.path.join(BENCH, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(part: dict, rows: list) -> None:
    assert list(part["rows"]) == [r.key for r in rows]
    for key, row in part["rows"].items():
        for metric, stats in row["metrics"].items():
            assert stats["n"] == 1, (key, metric)
            assert stats["mean"] == stats["mean"], (key, metric)  # not NaN
    assert "| row |" in part["table"]


@pytest.mark.parametrize("name", ["mnist", "tabular", "fashion_mnist"])
def test_smoke_rows(name: str, tmp_path) -> None:
    from benchmarks.datasets import available

    need = {"mnist": "mnist", "tabular": "california_housing", "fashion_mnist": "fashion_mnist"}[
        name
    ]
    if not available()[need]:
        pytest.skip(f"{need} data not installed")
    module = _load(name)
    out = tmp_path / "out.json"
    figs = tmp_path / "figs"
    module.main(
        ["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work"), "--plots", str(figs)]
    )
    part = json.loads(out.read_text())
    _check(part, module.ROWS)
    assert part["command"].startswith(f"python benchmarks/{name}.py --smoke")
    common = sys.modules["common"]
    assert "| row |" in common.render(str(out))
    assert (figs / f"results-{name}.png").stat().st_size > 10_000


def test_smoke_text(tmp_path) -> None:
    from benchmarks.datasets import available

    have = available()
    if not (have["minilm"] and have["rotten_tomatoes"] and have["womens_reviews"]):
        pytest.skip("MiniLM or the text data sets are not installed")
    module = _load("text_fewshot")
    out = tmp_path / "out.json"
    module.main(
        [
            "--smoke",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--plots",
            str(tmp_path / "figs"),
        ]
    )
    d = json.loads(out.read_text())
    assert set(d["datasets"]) == {"rotten_tomatoes", "womens_department"}
    for key, part in d["datasets"].items():
        _check(part, module.ROWS)
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
    common = sys.modules["common"]
    section = common.render(str(out), "uncertainty_table")
    assert section.count("| OCD ensemble spread (std between draws) |") == 2
    with pytest.raises(KeyError, match="rerun its script"):
        common.render(str(out), "no_such_section")


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
    sys.path.append(BENCH)
    import common

    text = common.uncertainty_table([_report(0.6, -0.01), _report(0.7, 0.02)])
    spread = next(line for line in text.splitlines() if line.startswith("| OCD ensemble spread"))
    assert "0.6500 ± 0.0707" in spread  # mean ± sample sd of 0.6 and 0.7
    added = next(line for line in text.splitlines() if "added by the spread" in line)
    assert "1 of 2 with the 95 % interval above 0" in added
    assert "| accuracy (%) | 90.00 ± 0.00 | 91.00 ± 0.00 |" in text
    assert common.uncertainty_table([]) == ""


def test_summary_table_gap_share(tmp_path) -> None:
    sys.path.append(BENCH)
    import common
    from common import Metric, Results, Row

    rows = [
        Row("base", "base", {"loss": "0.080"}),
        Row("ocd", "OCD", {"loss": "0.010"}),
        Row("ocd_k", "OCD(5)"),
        Row("regression", "regression"),
        Row("nn", "nearest neighbour"),
        Row("overfit", "overfit on test", {"loss": "0.002"}),
    ]
    res = Results("mnist", rows, [Metric("loss", "CE", ".4f")])
    for seed, (b, o, u) in enumerate([(0.04, 0.03, 0.02), (0.05, 0.04, 0.01)]):
        for key, v in {"base": b, "ocd": o, "ocd_k": b, "overfit": u}.items():
            res.add(seed, key, {"loss": v})
        res.add(seed, "regression", {"loss": b - 0.001})
        res.add(seed, "nn", {"loss": b - 0.002})
    path = tmp_path / "mnist.json"
    res.write(str(path), command="python benchmarks/mnist.py")
    line = common.summary_table([str(path)]).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "MNIST / LeNet5" and cells[1] == "cross-entropy"
    assert cells[5].endswith("(nearest neighbour)")  # the best label-free row, lower loss
    assert cells[7] == "37.5 ± 17.7 %"  # per seed 50 % and 25 %
    assert cells[8] == "0.0 ± 0.0 %"  # OCD(5) equal to the base in both seeds
    assert cells[9] == "90 %"  # (0.080 - 0.010) / (0.080 - 0.002)


def test_smoke_tabular_linear_base(tmp_path) -> None:
    from benchmarks.datasets import available

    if not available()["california_housing"]:
        pytest.skip("california_housing data not installed")
    module = _load("tabular")
    out = tmp_path / "out.json"
    argv = ["--smoke", "--hidden-layers", "0", "--overfit-lr", "0.02", "--json", str(out)]
    module.main(argv + ["--workdir", str(tmp_path / "work")])
    part = json.loads(out.read_text())
    rows = module.rows_for(module.parse_args(argv))
    _check(part, rows)
    assert "alt" not in part["rows"]
    assert all(not r["paper"] for r in part["rows"].values())  # the paper's rows are for the MLP
    assert part["rows"]["overfit"]["label"] == "overfit head on test (Adam 0.02 × 3; upper bound)"
    assert part["info"]["0"]["ocd"]["layer"] == "head"
