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
    from ocdwrap.datasets import available

    need = {"mnist": "mnist", "tabular": "california_housing", "fashion_mnist": "fashion_mnist"}[
        name
    ]
    if not available()[need]:
        pytest.skip(f"{need} data not installed")
    module = _load(name)
    out = tmp_path / "out.json"
    module.main(["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")])
    part = json.loads(out.read_text())
    _check(part, module.ROWS)
    assert part["command"].startswith(f"python benchmarks/{name}.py --smoke")
    common = sys.modules["common"]
    assert "| row |" in common.render(str(out))


def test_smoke_text(tmp_path) -> None:
    from ocdwrap.datasets import available

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
        ]
    )
    d = json.loads(out.read_text())
    assert set(d["datasets"]) == {"rotten_tomatoes", "womens_department"}
    for part in d["datasets"].values():
        _check(part, module.ROWS)
