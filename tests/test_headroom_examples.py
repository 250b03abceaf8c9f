"""benchmarks.headroom_examples: the examples and timing of docs/headroom.md, run at tiny sizes
(``--smoke``), their JSON, and the doc blocks rendered from it. That the committed doc is what
``--update-doc`` renders from the committed JSON is checked with the other rendered docs, in
tests/test_speed_doc.py."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import headroom_examples as hx
from benchmarks.datasets import available


def test_smoke_run_writes_every_report_and_renders(tmp_path) -> None:
    pytest.importorskip("sklearn")
    if not available()["mnist"]:
        pytest.skip("MNIST not installed (tests/test_datasets.py names the install)")
    out = tmp_path / "h.json"
    d = hx.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(d))
    assert d["seeds"] == [0] and d["machine"] and d["command"].endswith(f"--out {out}")
    reps = [*d["digits"]["0"].values(), d["lenet5"]["0"]["cross_fitted"]]
    reps.append(d["lenet5"]["0"]["train_loader"])
    for r in reps:
        assert list(r["rows"]) == list(hx.ROWS)
        assert r["wall_seconds"] > 0 and len(r["load_start"]) == 3
    assert "cross-fitted" in d["lenet5"]["0"]["cross_fitted"]["probe"]["source"]
    assert "train_loader" in d["lenet5"]["0"]["train_loader"]["probe"]["source"]
    assert d["lenet5"]["0"]["base_training"]["epochs_run"] == 1

    # the doc blocks: rendered between the markers, named by the JSON, idempotent
    rel = os.path.relpath(out, hx.ROOT)
    doc = tmp_path / "doc.md"
    blocks = "\n".join(f"{hx.DOC_START}{rel} {s} -->\nstale\n{hx.DOC_END}\n" for s in hx.SECTIONS)
    doc.write_text("# title\n\n" + blocks)
    assert hx.update_doc(str(doc)) == len(hx.SECTIONS)
    text = doc.read_text()
    assert "stale" not in text and text.count(f"From `{rel}`") == len(hx.SECTIONS)
    assert "| 1 epoch |" in text and "| probe_mixture |" in text and "train_loader=" in text
    hx.update_doc(str(doc))
    assert doc.read_text() == text


def test_an_unclosed_block_is_an_error(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"{hx.DOC_START}{hx.DEFAULT_OUT} digits -->\nno end\n")
    with pytest.raises(ValueError, match="not closed"):
        hx.update_doc(str(doc))
