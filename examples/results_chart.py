"""The results chart: each row of a results table as mean ± sd over seeds, the paper's value beside it.

The quickstart draws it for its table (``results.png``, with the paper's Table 1), and the
benchmarks for each of theirs (``python -m benchmarks.figures``). It reads the paper's values as
they are written in the tables (``"0.080 ± 0.009"``, ``"—"`` for none). Needs matplotlib
(``pip install "ocdwrap[plots]"``); the figure is drawn on the Agg canvas, so no display is needed.

Example:
    >>> from examples.results_chart import plot_results
    >>> plot_results(result["rows"], paper=PAPER, path="figs/results.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_results"]

OURS = "#1f77b4"
PAPER = "#d62728"


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig works without pyplot or a display
    return fig


def _finish(fig: Figure, path: str | os.PathLike | None, dpi: int = 110) -> Figure:
    if path is not None:
        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _parse_paper(value: Any) -> tuple[float, float]:
    """(value, error) from 0.08, "0.080 ± 0.009", (0.08, 0.009) or None/'—' (NaN)."""
    if value is None:
        return math.nan, math.nan
    if isinstance(value, (int, float)):
        return float(value), math.nan
    if isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value[0], str):
        return float(value[0]), float(value[1])
    found = _NUMBER.findall(str(value))
    if not found:
        return math.nan, math.nan
    return float(found[0]), float(found[1]) if len(found) > 1 else math.nan


def _row_values(value: Any, metrics: Sequence[str]) -> dict[str, list[float]]:
    """{metric: [one value per seed]} from a number, a mapping, or a list of either."""
    if isinstance(value, (int, float)):
        if len(metrics) != 1:
            raise ValueError(
                f"A row given as a bare number needs exactly one metric; metrics={metrics}."
            )
        return {metrics[0]: [float(value)]}
    if isinstance(value, Mapping):
        out = {}
        for m in metrics:
            v = value.get(m)
            if v is None:
                continue
            out[m] = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]
        return out
    if isinstance(value, (list, tuple)):  # several seeds
        merged: dict[str, list[float]] = {}
        for item in value:
            for m, vs in _row_values(item, metrics).items():
                merged.setdefault(m, []).extend(vs)
        return merged
    raise TypeError(f"Cannot read a result row from {type(value).__name__}: {value!r}")


def _paper_points(
    paper: Mapping[str, Any],
    keys: list[str],
    y: Any,
    metrics: list[str],
    j: int,
    percent: bool,
) -> tuple[list[float], list[float], list[float]]:
    """The paper's values of metric ``metrics[j]``: x, error and y positions, in our units."""
    metric = metrics[j]
    px, pe, py = [], [], []
    for k, yi in zip(keys, y):
        if k not in paper:
            continue
        pv = paper[k]
        if isinstance(pv, Mapping):
            v, e = _parse_paper(pv.get(metric))
        elif isinstance(pv, (tuple, list)) and j < len(pv):
            v, e = _parse_paper(pv[j])
        else:
            v, e = _parse_paper(pv) if len(metrics) == 1 else (math.nan, math.nan)
        if math.isnan(v):
            continue
        if metric == "accuracy" and not percent and v > 1.0:
            v, e = v / 100.0, e / 100.0
        if metric == "accuracy" and percent and v <= 1.0:
            v, e = v * 100.0, e * 100.0
        px.append(v)
        pe.append(0 if math.isnan(e) else e)
        py.append(yi - 0.18)
    return px, pe, py


def plot_results(
    rows: Mapping[str, Any],
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    paper: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    reference: str | None = "base",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per metric: each row's value (mean ± std over seeds), the paper's value beside it.

    Args:
        rows: ``{row: result}``, in display order. A result is ``{"loss": 0.06, "accuracy":
            0.98}`` (one seed), a list of those (several seeds: the point is the mean, the error
            bar one standard deviation), ``{"loss": [0.06, 0.061, ...]}``, or a bare number when
            there is one metric. ``evaluate_ocd`` results fit, and the quickstart's JSON
            ``"rows"`` (``Comparison.to_dict()``'s) with ``metrics=("loss", "metric")``.
        metrics: keys to plot, one panel each. An accuracy given as a fraction is shown in %.
        paper: ``{row: value}`` where the paper reports one: ``{"loss": 0.010, "accuracy": 99.7}``,
            or a tuple in the order of ``metrics``; strings such as ``"0.010 ± 0.006"`` are read,
            ``"—"`` means none.
        labels: display names for the rows (default: the keys).
        reference: a row drawn as a dashed vertical line in every panel (default ``"base"``).
        path: write a PNG here.

    Example:
        >>> plot_results({"base": [{"loss": .068, "accuracy": .979}, {"loss": .070, "accuracy": .978}],
        ...               "ocd": [{"loss": .058, "accuracy": .981}, {"loss": .059, "accuracy": .980}]},
        ...              paper={"base": ("0.080 ± 0.009", "99.2 ± 0.1")}, path="results.png")  # doctest: +SKIP
    """
    import numpy as np

    keys = list(rows)
    if not keys:
        raise ValueError("plot_results got no rows.")
    metrics = list(metrics)
    values = {k: _row_values(rows[k], metrics) for k in keys}
    labels = dict(labels or {})
    paper = dict(paper or {})
    fig = _new_figure(4.4 * len(metrics) + 1.6, 0.9 + 0.42 * len(keys))
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    y = np.arange(len(keys))[::-1]
    any_paper = False
    n_seeds = max((len(v) for r in values.values() for v in r.values()), default=1)
    for j, (ax, metric) in enumerate(zip(axes, metrics)):
        ours = [values[k].get(metric, []) for k in keys]
        percent = metric == "accuracy" and all(v <= 1.0 for vs in ours for v in vs)
        scale = 100.0 if percent else 1.0
        means = np.array([np.mean(vs) * scale if vs else np.nan for vs in ours])
        stds = np.array(
            [np.std(vs, ddof=1) * scale if len(vs) > 1 else np.nan for vs in ours], dtype=float
        )
        ax.errorbar(
            means,
            y,
            xerr=np.where(np.isnan(stds), 0, stds),
            fmt="o",
            color=OURS,
            ecolor=OURS,
            capsize=3,
            label="ocdwrap" + (f" (mean ± std, up to {n_seeds} seeds)" if n_seeds > 1 else ""),
        )
        for yi, m, s in zip(y, means, stds):
            if not np.isnan(m):
                txt = f"{m:.4g}" + (f" ± {s:.2g}" if not np.isnan(s) else "")
                ax.annotate(
                    txt, (m, yi), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7
                )
        px, pe, py = _paper_points(paper, keys, y, metrics, j, percent)
        if px:
            any_paper = True
            ax.errorbar(
                px,
                py,
                xerr=pe,
                fmt="D",
                mfc="none",
                color=PAPER,
                capsize=2,
                ms=5,
                label="paper (Lutati & Wolf, 2023)",
            )
        if reference in keys:
            ref = means[keys.index(reference)]
            if not np.isnan(ref):
                ax.axvline(ref, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(f"{metric}{' (%)' if percent else ''}")
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(keys) - 0.4)
    axes[0].set_yticks(y, [labels.get(k, k) for k in keys], fontsize=8)
    handles, leg_labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            leg_labels,
            loc="outside lower center",
            ncol=2 if any_paper else 1,
            fontsize=8,
            frameon=False,
        )
    fig.suptitle(title or "Results", fontsize=11)
    return _finish(fig, path)
