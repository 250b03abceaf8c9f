"""Benchmark: what verifying a collection's checksums costs when ``fit`` loads its data.

Every shard of a collection records an xxh3 checksum per tensor, and :meth:`DeltaStore.load`
checks each tensor it reads. This script measures, on collections of LeNet5's ``fc2`` layer
(120 -> 84) in the two layouts ``fit`` reads (``delta="rank1"``: u, v, rho and the conditioning;
``delta="full"``: the whole 84 x 120 matrix as well), with a warm page cache:

- ``load``: ``store.load(keys, verify=False)`` (the bytes read, parsed and concatenated);
- ``load_verified``: the same with the checksums checked (the default);
- ``fit_loading``: ``ocdwrap.fit``'s whole data loading (``load_training_data``: the verified
  load plus the finite-row and size checks);
- the cost: ``load_verified - load`` as a share of ``fit_loading`` (the goal: under 10 %), the
  median over repeats of each repeat's own difference and share (paired: the three variants of
  one repeat run back to back, so a load change on a shared machine hits all three).

It also measures the throughput of the hashes one could use (xxh3 from ``xxhash``, the one
ocdwrap uses; SHA-256, BLAKE2b and CRC-32 from the standard library; CRC-32C where the ``crc32c``
package is installed) on the same 64 MiB buffer, one core, which is why ocdwrap takes a small
dependency rather than ``hashlib``.

The rows are written with :class:`ocdwrap.store_writer.StoreWriter` from random values of the real
shapes (what a checksum costs depends on the bytes, not on their values), so the script needs no
data set and no overfitting. Timings are medians over ``--reps`` repeats, the variants
interleaved so load changes hit all of them; the rank-one loads take milliseconds, so they are
repeated more (41 against 7 for the full layout by default)::

    python -m benchmarks.integrity --json runs/integrity.json      # 20,000 samples, ~3 min
    python -m benchmarks.integrity --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

import torch

import ocdwrap
from ocdwrap.io import DIGEST_ALGORITHM
from ocdwrap.store import STOPPED_END, load_training_data
from ocdwrap.store_writer import StoreWriter

from . import zoo
from .cli import command
from .results import write_json
from .speed import interleaved
from .timing import log, machine

MODULE = "benchmarks.integrity"
OUT, IN, CLASSES = 84, 120, 10  # LeNet5's fc2 and its output
REPS = {"rank1": 41, "full": 7}
FIT_KEYS = {
    "rank1": ["u", "v", "rho", "cond_in", "cond_act", "cond_out"],
    "full": ["delta", "rho", "cond_in", "cond_act", "cond_out"],
}


def synthetic_collection(directory: str, n: int, delta: str, shard_size: int = 4096) -> None:
    """A collection of ``n`` rows of fc2's shapes, written as ``collect`` writes one."""
    g = torch.Generator().manual_seed(0)
    keys = ["index", "rho", "cond_in", "cond_act", "cond_out", "energy", "u", "v"]
    keys += ["delta"] if delta == "full" else []
    identity = {"layer": "fc2", "layer_kind": "linear", "weight_shape": [OUT, IN]}
    writer = StoreWriter.open(directory, identity, shard_size=shard_size, overwrite=True)
    writer.begin("synthetic", {"delta": delta})
    dims = {"cond_in": IN, "cond_act": OUT, "cond_out": CLASSES}
    writer.describe(dims=dims, keys=keys, store_rank1=True)
    for lo in range(0, n, 1024):
        b = min(1024, n - lo)
        rows = {
            "index": torch.arange(lo, lo + b),
            "rho": torch.rand(b, generator=g),
            "cond_in": torch.randn(b, IN, generator=g),
            "cond_act": torch.randn(b, OUT, generator=g),
            "cond_out": torch.randn(b, CLASSES, generator=g),
            "energy": torch.rand(b, generator=g),
            "u": torch.randn(b, OUT, generator=g),
            "v": torch.randn(b, IN, generator=g).sign(),
        }
        if delta == "full":
            rows["delta"] = torch.randn(b, OUT, IN, generator=g)
        writer.append(rows)
    writer.close(positions=n, stopped=STOPPED_END)


def bench(delta: str, n: int, reps: int, work: str) -> dict[str, Any]:
    directory = os.path.join(work, f"integrity-{delta}")
    synthetic_collection(directory, n, delta)
    store = ocdwrap.DeltaStore(directory)
    model = ocdwrap.wrap(zoo.LeNet5(), layer="fc2", config=ocdwrap.OCDConfig(delta=delta))
    keys = FIT_KEYS[delta]
    times = interleaved(
        {
            "load": lambda: store.load(keys, verify=False),
            "load_verified": lambda: store.load(keys),
            "fit_loading": lambda: load_training_data(model, store, torch.device("cpu")),
        },
        reps,
        "cpu",
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    size = sum(os.path.getsize(p) for p in store.shard_paths())
    paired = list(zip(times["load_verified"], times["load"], times["fit_loading"]))
    cost = statistics.median(v - u for v, u, _ in paired)
    return {
        "samples": n,
        "reps": reps,
        "shard_bytes": size,
        "seconds": med,
        "all_seconds": times,
        "verify_seconds": cost,
        "verify_share_of_fit_loading": statistics.median((v - u) / f for v, u, f in paired),
        "verify_share_of_load": statistics.median((v - u) / u for v, u, _ in paired),
        "hashed_gb_per_s": size / 1e9 / cost if cost > 0 else None,
    }


def hash_throughput(mib: int, reps: int) -> dict[str, float]:
    """GB/s of each candidate hash over one buffer of ``mib`` MiB (median of ``reps``)."""
    import hashlib
    import zlib

    import xxhash

    data = memoryview(torch.randn(mib * 2**18).numpy()).cast("B")
    hashes = {
        "xxh3_64 (xxhash)": lambda: xxhash.xxh3_64_hexdigest(data),
        "sha256 (hashlib)": lambda: hashlib.sha256(data).hexdigest(),
        "blake2b (hashlib)": lambda: hashlib.blake2b(data).hexdigest(),
        "crc32 (zlib)": lambda: zlib.crc32(data),
    }
    try:
        import crc32c

        hashes["crc32c (crc32c)"] = lambda: crc32c.crc32c(data)
    except ImportError:
        pass
    times = interleaved(hashes, reps, "cpu")
    return {k: len(data) / 1e9 / statistics.median(v) for k, v in times.items()}


def render(r: dict[str, Any]) -> str:
    lines = [
        "| collection | samples | on disk | load (s) | load, verified (s) | fit's data loading (s) "
        "| verification / fit's loading |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # medians; the share is the median of each repeat's own
    for delta, v in r["results"].items():
        s = v["seconds"]
        lines.append(
            f"| {delta} | {v['samples']:,} | {v['shard_bytes'] / 2**20:.0f} MiB | {s['load']:.3f} "
            f"| {s['load_verified']:.3f} | {s['fit_loading']:.3f} "
            f"| {100 * v['verify_share_of_fit_loading']:.1f} % |"
        )
    lines += ["", "| hash | GB/s (one core) |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["hash_gb_per_s"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument(
        "--reps", type=int, default=None, help="timing repeats (default: 41 rank1, 7 full)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workdir", default=None, help="where the collections go (default: temp)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 300 if args.smoke else args.samples
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        results = {}
        for delta in ("rank1", "full"):
            reps = 2 if args.smoke else args.reps or REPS[delta]
            log(f"{delta}: {n:,} samples, {reps} repeats")
            results[delta] = bench(delta, n, reps, work)
    log("hash throughput")
    throughput = hash_throughput(4 if args.smoke else 64, 2 if args.smoke else 7)
    r = {
        "benchmark": MODULE,
        "command": command(MODULE, argv),
        "machine": machine("cpu"),
        "load_average": os.getloadavg(),
        "threads": args.threads,
        "checksum": DIGEST_ALGORITHM,
        "results": results,
        "hash_gb_per_s": throughput,
    }
    print(render(r))
    write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
