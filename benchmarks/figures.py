"""The results figures of the benchmarks: each table of a benchmark JSON as a chart.

Every script draws its own with ``--plots DIR``; for JSONs already on disk::

    python -m benchmarks.figures docs/img docs/results/*.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from .results import METRIC_LABELS, parts


def plot_json(d: dict[str, Any], out_dir: str) -> list[str]:
    """Draw each table of a benchmark JSON: every row's mean ± sd over seeds, one panel per
    metric, the paper's value beside ours where it has one. Writes
    ``results-<benchmark>[-<data set>].png`` under ``out_dir``; returns the paths."""
    from examples.results_chart import plot_results

    paths = []
    for key, part in parts(d):
        rows = {
            k: r for k, r in part["rows"].items() if any(m["values"] for m in r["metrics"].values())
        }
        if not rows:
            continue
        names = {m: METRIC_LABELS.get(m, m) for m in next(iter(rows.values()))["metrics"]}
        values = {
            k: {names[m]: v["values"] for m, v in r["metrics"].items() if m in names}
            for k, r in rows.items()
        }
        paper = {
            k: {names[m]: v for m, v in r["paper"].items() if m in names}
            for k, r in rows.items()
            if r.get("paper")
        }
        labels = {k: re.sub(r"[*`†]", "", r["label"]).strip() for k, r in rows.items()}
        name = d.get("benchmark", part["benchmark"]) + (f"-{key}" if key else "")
        seeds = sorted(int(s) for s in part["per_seed"])
        path = os.path.join(out_dir, f"results-{name}.png")
        plot_results(
            values,
            metrics=list(names.values()),
            paper=paper,
            labels=labels,
            path=path,
            title=f"{part.get('title') or name}: seeds {seeds}",
        )
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.figures",
        description="Draw the results figure(s) of benchmark JSONs already on disk.",
    )
    p.add_argument("out_dir", help="where the PNGs go")
    p.add_argument("json", nargs="+", help="benchmark JSONs (written with --json)")
    args = p.parse_args(argv)
    written = []
    for path in args.json:
        with open(path) as f:
            for out in plot_json(json.load(f), args.out_dir):
                print(f"wrote {out}")
                written.append(out)
    return written


if __name__ == "__main__":
    main()
