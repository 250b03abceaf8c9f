"""Smoke test of benchmarks.integrity: what verifying checksums costs fit's data loading."""

from __future__ import annotations

import json

import torch

import ocdwrap


def test_integrity_benchmark_smoke(tmp_path, capsys) -> None:
    from benchmarks import integrity

    out = tmp_path / "integrity.json"
    integrity.main(["--smoke", "--json", str(out), "--workdir", str(tmp_path)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python -m benchmarks.integrity --smoke")
    assert r["checksum"] == "xxh3_64"
    for delta in ("rank1", "full"):
        v = r["results"][delta]
        assert v["samples"] == 300 and v["shard_bytes"] > 0
        assert set(v["seconds"]) == {"load", "load_verified", "fit_loading"}
        assert all(s > 0 for s in v["seconds"].values())
    # the full layout stores the whole matrix: far more bytes to hash than rank one
    assert r["results"]["full"]["shard_bytes"] > 20 * r["results"]["rank1"]["shard_bytes"]
    assert "verification / fit's loading" in capsys.readouterr().out
    assert r["hash_gb_per_s"]["xxh3_64 (xxhash)"] > 0 and "sha256 (hashlib)" in r["hash_gb_per_s"]


def test_synthetic_collection_reads_like_a_collected_one(tmp_path) -> None:
    from benchmarks.integrity import synthetic_collection

    synthetic_collection(str(tmp_path / "c"), 50, "full", shard_size=16)
    store = ocdwrap.DeltaStore(tmp_path / "c")
    assert len(store) == 50 and store.verified and store.stopped == "end_of_data"
    data = store.load(["delta", "u", "index"])
    assert data["delta"].shape == (50, 84, 120) and torch.equal(data["index"], torch.arange(50))
