"""The results of a benchmark: rows x metrics x seeds, their mean ± sd, the table and the JSON.

Every benchmark script fills one :class:`Results` per table (``add(seed, row, metrics)``) and
writes it with ``--json``: per-seed numbers, mean ± sd, the markdown table with the paper's
number next to ours, the notes, the command and the machine. :mod:`benchmarks.report` and
:mod:`benchmarks.figures` read those JSONs back (:func:`parts` gives their tables).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ocdwrap.headroom import LEGACY_ROWS

from .timing import machine

PAPER_REF = "Lutati & Wolf, OCD: Learning to Overfit with Conditional Diffusion Models, ICLR 2023"
METRIC_LABELS = {
    "loss": "cross-entropy",
    "acc": "accuracy (%)",
    "mse": "MSE",
    "rmse": "RMSE",
    "psnr": "PSNR (dB)",
    "sisdri": "SI-SDRi (dB)",
    "sisdri_unseen": "SI-SDRi, unseen speakers (dB)",
    "ndcg10": "NDCG@10",
}


@dataclass
class Metric:
    """One column: ``key`` in the per-seed dicts, its header, format, and the paper's header."""

    key: str
    header: str
    fmt: str = ".4f"


@dataclass
class Row:
    """One table row; ``paper`` maps metric keys to the paper's number as printed there."""

    key: str
    label: str
    paper: dict[str, str] = field(default_factory=dict)


def with_overfit_lr(rows: Sequence[Row], lr: float) -> list[Row]:
    """``rows`` with the released code's overfit lr (5e-4) in their labels replaced by ``lr``."""
    return [Row(r.key, r.label.replace("5e-4", f"{lr:g}"), r.paper) for r in rows]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd of the finite ``values`` (sd 0 for one value; NaN, NaN for none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_sd(values: Sequence[float], fmt: str) -> str:
    """'mean ± sd' in format ``fmt`` ('mean' alone for one value, '—' for none)."""
    m, s = mean_sd(values)
    if math.isnan(m):
        return "—"
    return f"{m:{fmt}}" + (f" ± {s:{fmt.lstrip('+')}}" if len(values) > 1 else "")


def gap_fraction(base: float, ocd: float, upper: float) -> float | None:
    """Share of the base -> upper-bound improvement that ``ocd`` obtains (lower is better)."""
    gap = base - upper
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        return None
    return (base - ocd) / gap


class Results:
    """Rows x metrics x seeds; mean ± sd; the markdown table; the JSON.

    Example:
        >>> res = Results("mnist", [Row("base", "base")], [Metric("loss", "CE")])
        >>> res.add(0, "base", {"loss": 0.05})
        >>> res.summary()["base"]["loss"]["mean"]
        0.05
    """

    def __init__(self, name: str, rows: list[Row], metrics: list[Metric]) -> None:
        self.name = name
        self.rows = rows
        self.metrics = metrics
        self.per_seed: dict[int, dict[str, dict[str, float]]] = {}
        self.info: dict[int, dict[str, Any]] = {}
        self.notes: list[str] = []

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.rows]

    def add(self, seed: int, key: str, metrics: dict[str, float]) -> None:
        if key not in self.keys:
            raise KeyError(f"unknown row {key!r}; add it to the script's rows first: {self.keys}")
        self.per_seed.setdefault(seed, {})[key] = {k: float(v) for k, v in metrics.items()}

    def values(self, key: str, metric: str) -> list[float]:
        return [
            rows[key][metric]
            for rows in self.per_seed.values()
            if key in rows and metric in rows[key]
        ]

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for r in self.rows:
            out[r.key] = {}
            for m in self.metrics:
                vals = self.values(r.key, m.key)
                mean, sd = mean_sd(vals)
                out[r.key][m.key] = {"mean": mean, "sd": sd, "n": len(vals), "values": vals}
        return out

    def gap(self, ocd_key: str, base_key: str, upper_key: str, metric: str) -> list[float]:
        """Per seed: the fraction of the base -> upper gap that row ``ocd_key`` captured."""
        out = []
        for rows in self.per_seed.values():
            if all(k in rows for k in (ocd_key, base_key, upper_key)):
                f = gap_fraction(
                    rows[base_key][metric], rows[ocd_key][metric], rows[upper_key][metric]
                )
                if f is not None:
                    out.append(f)
        return out

    def table(self) -> str:
        head = ["row"]
        for m in self.metrics:
            head += [f"{m.header} (ours)", f"{m.header} (paper)"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in self.rows:
            cells = [r.label]
            for m in self.metrics:
                cells += [fmt_mean_sd(self.values(r.key, m.key), m.fmt), r.paper.get(m.key, "—")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def report(self, title: str) -> str:
        seeds = sorted(self.per_seed)
        text = f"{title}\n\nseeds {seeds}; mean ± sd over seeds\n\n{self.table()}\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "paper": PAPER_REF,
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": {
                r.key: {"label": r.label, "paper": r.paper, "metrics": s}
                for r, s in zip(self.rows, self.summary().values())
            },
            "per_seed": {str(k): v for k, v in self.per_seed.items()},
            "info": {str(k): v for k, v in self.info.items()},
            "notes": self.notes,
            "table": self.table(),
            **extra,
        }

    def write(self, path: str | None, **extra: Any) -> None:
        """The JSON (with ``extra`` fields) to ``path``; nothing without a path."""
        write_json(path, self.to_json(**extra))


def json_default(o: Any) -> Any:
    """How a benchmark JSON stores what ``json`` cannot: tensors and tuples as lists."""
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json(path: str | None, data: dict[str, Any], indent: int = 1) -> None:
    """Write ``data`` to ``path`` atomically (a stopped run never leaves half a file); nothing
    without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=json_default)
    os.replace(tmp, path)


MERGE_IGNORED = ("seeds", "json", "plots", "workdir", "progress", "merge")


def merge_results(res: Results, paths: Sequence[str], command: str) -> dict[str, Any]:
    """Fill ``res`` (one table) with every seed's rows and info from the JSONs at ``paths``
    (runs of the same script with other seeds, e.g. one process per seed) and return the fields
    its merged JSON carries beside them: the commands, the settings (seeds updated), the
    summed and the per-run seconds. The runs must agree on every setting but ``--seeds`` and
    where they wrote; a seed found in two runs is an error (no row is silently replaced)."""
    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append(json.load(f))

    def same(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d["settings"].items() if k not in MERGE_IGNORED}

    for path, d in zip(paths, loaded):
        if same(d) != same(loaded[0]):
            diff = sorted(k for k in same(d) if same(d)[k] != same(loaded[0]).get(k))
            raise SystemExit(f"--merge: {path} was run with other settings than {paths[0]}: {diff}")
        for seed, rows in d["per_seed"].items():
            if int(seed) in res.per_seed:
                raise SystemExit(f"--merge: seed {seed} is in two runs (again in {path})")
            for key, metrics in rows.items():
                res.add(int(seed), key, metrics)
            res.info[int(seed)] = d["info"].get(seed, {})
    res.per_seed = dict(sorted(res.per_seed.items()))
    res.info = dict(sorted(res.info.items()))
    settings = {**loaded[0]["settings"], "seeds": sorted(res.per_seed)}
    return {
        "command": " && ".join([*(d["command"] for d in loaded), command]),
        "merged_from": {p: d["command"] for p, d in zip(paths, loaded)},
        "settings": settings,
        "seconds": sum(d.get("seconds", 0.0) for d in loaded),
        "run_seconds": [d.get("seconds", 0.0) for d in loaded],
    }


# the row names of the JSONs written before the benchmarks computed their shared rows through
# ocdwrap.compare, and the names compare, headroom and every table use now
OLD_ROW_NAMES = {"nn": "nearest", "pseudo": "own_label", "ocd_ensemble": "ocd_k", **LEGACY_ROWS}


def current_names(part: dict[str, Any]) -> dict[str, Any]:
    """A table of a benchmark JSON with its rows under today's names (:data:`OLD_ROW_NAMES`), in
    ``rows`` and in every seed of ``per_seed``; the rendered ``table`` and ``notes`` are kept as
    they were written. A JSON of today's names comes back as it is."""

    def rename(rows: dict[str, Any]) -> dict[str, Any]:
        return {OLD_ROW_NAMES.get(k, k): v for k, v in rows.items()}

    if not any(k in OLD_ROW_NAMES for k in part.get("rows", {})):
        return part
    return {
        **part,
        "rows": rename(part["rows"]),
        "per_seed": {s: rename(r) for s, r in part.get("per_seed", {}).items()},
    }


def parts(d: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(key, table) for each table of a benchmark JSON (one, or one per data set), its rows
    under today's names (:func:`current_names`)."""
    found = list(d["datasets"].items()) if "datasets" in d else [(None, d)]
    return [(k, current_names(p)) for k, p in found]
