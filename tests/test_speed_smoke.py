"""``python -m benchmarks.speed --smoke``: the speed benchmark runs end to end on a tiny setting
and reports every figure.

No timing is asserted: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.datasets import available


def test_speed_smoke(tmp_path, capsys) -> None:
    if not (available()["mnist"] or available()["mnist_subset"]):
        pytest.skip("no MNIST data installed (tests/test_datasets.py names the install)")
    from benchmarks import speed

    out = tmp_path / "speed.json"
    speed.main(["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python -m benchmarks.speed --smoke")
    assert r["threads"] == 1 and r["device"] == "cpu"
    # the checksum-verification rows (benchmarks.integrity's, measured in the same run)
    for delta in ("rank1", "full"):
        v = r["integrity"][delta]
        assert v["samples"] == 300 and set(v["seconds"]) == {"load", "load_verified", "fit_loading"}
        assert isinstance(v["verify_share_of_fit_loading"], float)

    c = r["collection"]
    for key in (
        "vectorized_samples_per_s",
        "loop_samples_per_s",
        "speedup_vs_loop",
        "speedup_vs_loop_whole_passes",
        "vectorized_whole_passes_samples_per_s",
        "epoch_seconds",
        "collect_full_epochs",
        "collect_rank1_epochs",
    ):
        assert c[key] > 0, key
    assert c["max_abs_diff_vs_loop"] < 1e-5  # the vectorized deltas are the loop's
    # collect() against the epoch and the loop, within rounds
    assert c["collect_rank1_vs_loop"] > 0 and len(c["collect_rounds"]) >= 1
    for rnd in c["collect_rounds"]:
        assert rnd["collect_rank1_epochs"] > 0 and len(rnd["epoch_seconds"]) == 2
    # the docs' tables render from such a JSON (here the same run as before and after)
    table = speed.doc_tables(str(out), str(out))
    assert "| goal (issue 26) |" in table and ("missed" in table or "met" in table)

    inf = r["inference"]
    for key in ("rank1", "full", "full_small_unet"):
        rows = {b: v for b, v in inf[key].items() if b != "generator"}
        assert "1" in rows and len(rows) == 2, key
        for v in rows.values():
            assert v["overhead"] > 0 and v["ocd_ms_per_sample"] > 0
            assert set(v["breakdown_ms"]) == {"base_passes", "generation"}
    assert inf["rank1"]["1"]["overhead_whole_passes"] > 0  # the same with the split forward off
    assert {"default", "small"} <= set(inf["unet_pass"])

    fs = r["fit_step"]  # one full-path fit step, in one pass and in fit's micro-batches
    assert fs["one_pass"]["micro_batch"] == fs["batch"] >= fs["micro_batched"]["micro_batch"] >= 1
    for v in (fs["one_pass"], fs["micro_batched"]):
        assert v["seconds_per_step"] > 0 and 0 <= v["kernel_share"] <= 1
        assert v["minor_faults_per_step"] >= 0

    assert set(r["fitting"]) == {"full", "rank1"}
    assert all(v["samples_per_s"] > 0 for v in r["fitting"].values())

    # the memory figures come from a fresh `python -m benchmarks.speed --_child` process
    mem = r["memory"]
    for key in ("collect_full", "collect_rank1", "fit_full", "fit_rank1"):
        assert mem[key]["host_peak_mb"] >= 0, key
    st = mem["stored"]
    # the full matrix is 84 x 120 float32; rank one stores u (84) and v (120)
    assert st["delta_bytes_per_sample_full"] == 84 * 120 * 4
    assert st["delta_bytes_per_sample_rank1"] == (84 + 120) * 4
    assert set(r["goals"]) and set(r["paper_cost_model"])
    printed = capsys.readouterr().out
    assert "## Collection" in printed and "## One fit step, full path" in printed
