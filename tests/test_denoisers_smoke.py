"""``benchmarks.sampling_steps --denoisers``: generators of other sizes fitted on one collection,
scored, and their deltas compared with the first's at the same noise (smoke sizes)."""

from __future__ import annotations

import json

import pytest

from benchmarks.datasets import available


def test_smoke_denoisers_on_the_linear_base(tmp_path) -> None:
    if not available()["california_housing"]:
        pytest.skip("no California Housing data installed (tests/test_datasets.py names it)")
    from benchmarks import sampling_steps

    out = tmp_path / "out.json"
    argv = ["--smoke", "--domain", "tabular-linear", "--overfit-lr", "0.02"]
    argv += ["--delta-normalization", "rms", "--denoisers", "32:16:2", "16:16:1"]
    argv += ["--json", str(out), "--workdir", str(tmp_path / "work")]
    sampling_steps.main(argv)
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == [r.key for r in sampling_steps.rows(sampling_steps.parse_args(argv))]
    for s in (1, 3):  # the smoke step counts
        ref, other = rows[f"ocd@{s}:h32c16b2"]["metrics"], rows[f"ocd@{s}:h16c16b1"]["metrics"]
        assert ref["cos"]["mean"] == pytest.approx(1.0) and ref["norm"]["mean"] == pytest.approx(
            1.0
        )
        assert -1 <= other["cos"]["mean"] <= 1 and other["norm"]["mean"] > 0
        assert rows[f"ocd_k@{s}:h16c16b1"]["metrics"]["rmse"]["n"] == 1
