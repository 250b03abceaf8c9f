"""What :func:`ocdwrap.compare` returns: the rows, the paired bootstrap, the table and verdict."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["Comparison", "Metric", "Row", "paired_share", "share_difference"]

# rows that use the eval samples' labels (the bound); every other row could be deployed
USES_EVAL_LABELS = ("overfit",)
OCD_ROWS = ("ocd", "ocd_k")


@dataclass
class Metric:
    """An extra score of every row: ``fn(pred, target)``.

    ``per="sample"``: ``fn`` returns one value per sample (N,), averaged. ``per="group"``:
    ``group_fn(inputs, target)`` gives each sample of a batch a group id (e.g. a query); ``fn``
    gets each group's predictions and targets and returns one number, averaged over groups
    (e.g. NDCG@10 per query). ``higher_is_better`` orders the rows.

    Example:
        >>> top2 = Metric(lambda p, y: (p.topk(2, -1).indices == y[:, None]).any(1).float(), True)
    """

    fn: Callable[[torch.Tensor, torch.Tensor], Any]
    higher_is_better: bool
    per: str = "sample"
    group_fn: Callable[[Any, Any], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.per not in ("sample", "group"):
            raise ConfigError(f"Metric(per={self.per!r}); choose 'sample' or 'group'.")
        if self.per == "group" and self.group_fn is None:
            raise ConfigError("Metric(per='group') needs group_fn=(inputs, target) -> group ids.")


@dataclass
class Row:
    """One row of a :class:`Comparison`.

    ``share`` is the % of the base -> bound gap in loss the row closes ((base loss - row loss) /
    (base loss - bound loss); 100 is the bound, negative is worse than the base), with a 95 %
    paired bootstrap interval ``[share_low, share_high]`` over the eval samples; ``metric`` the
    task metric (accuracy for classification, RMSE for regression) and ``share_metric`` its
    share of the same gap; ``build_seconds`` what building the row cost (collection + fit for a
    generator); ``predict_time`` the prediction time per sample relative to the base model's.
    A row that could not be computed has ``skipped`` set to the reason.
    """

    name: str
    description: str = ""
    loss: float | None = None
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    share: float | None = None
    share_low: float | None = None
    share_high: float | None = None
    share_metric: float | None = None
    build_seconds: float | None = None
    predict_time: float | None = None
    uses_eval_labels: bool = False
    skipped: str | None = None
    note: str = ""
    source: str = ""  # what computed it (for a user generator: its type), checked on resume

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Row:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _resamples(n: int, resamples: int, seed: int) -> torch.Tensor:
    """The same bootstrap indices (resamples, n) for every row of a comparison: paired."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=g)


def _shares(base: torch.Tensor, bound: torch.Tensor, row: torch.Tensor, idx) -> torch.Tensor:
    b, o, r = (t.double()[idx].mean(-1) for t in (base, bound, row))
    gap = b - o
    ok = gap > 1e-12 * b.abs().clamp_min(1.0)
    return torch.where(ok, 100.0 * (b - r) / torch.where(ok, gap, 1.0), math.nan)


def _interval(values: torch.Tensor, level: float = 0.95) -> tuple[float | None, float | None]:
    values = values[~values.isnan()]
    if values.numel() == 0:
        return None, None
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=values.dtype)
    lo, hi = torch.quantile(values, q).tolist()
    return lo + 0.0, hi + 0.0


def paired_share(
    base: torch.Tensor,
    bound: torch.Tensor,
    row: torch.Tensor,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float | None, float | None, float | None]:
    """The row's share of the base -> bound gap in %, and its 95 % paired bootstrap interval.

    ``base``, ``bound``, ``row``: per-sample losses (N,) on the same samples. Each resample
    draws N samples with replacement (the same draws for every row, from ``seed``) and computes
    the share on them; the interval is the 2.5th and 97.5th percentiles. None where the bound
    does not beat the base.
    """
    whole = _shares(base, bound, row, torch.arange(base.shape[0]))
    point = None if bool(whole.isnan()) else float(whole) + 0.0
    if point is None:
        return None, None, None
    lo, hi = _interval(_bootstrap(base, bound, [row], resamples, seed)[0])
    return point, lo, hi


def _bootstrap(base, bound, rows: list[torch.Tensor], resamples: int, seed: int):
    """Each row's share on each resample, (len(rows), resamples), in chunks of resamples."""
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    n, done, chunk = base.shape[0], 0, max(1, 2_000_000 // max(base.shape[0], 1))
    idx_all = _resamples(n, resamples, seed)
    while done < resamples:
        idx = idx_all[done : done + chunk]
        for k, r in enumerate(rows):
            out[k].append(_shares(base, bound, r, idx))
        done += idx.shape[0]
    return [torch.cat(parts) for parts in out]


def share_difference(
    base: torch.Tensor,
    bound: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float | None, float | None, float | None]:
    """share(a) - share(b) in points of the gap, with its 95 % paired bootstrap interval."""
    n = base.shape[0]
    whole = _shares(base, bound, a, torch.arange(n)) - _shares(base, bound, b, torch.arange(n))
    if bool(whole.isnan()):
        return None, None, None
    sa, sb = _bootstrap(base, bound, [a, b], resamples, seed)
    lo, hi = _interval(sa - sb)
    return float(whole) + 0.0, lo, hi


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


@dataclass
class Comparison:
    """What :func:`ocdwrap.compare` measured. ``print(comparison)`` shows the table and the
    verdict; ``to_dict()`` gives plain numbers (JSON-ready; :meth:`from_dict` reads them back);
    ``plot(path)`` draws each row's share of the gap with its interval."""

    task: str
    n: int
    layer: str
    metric: str  # "accuracy" or "rmse"
    rows: list[Row] = field(default_factory=list)
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # the extra metrics
    ceiling: float | None = None  # the headroom probe's ceiling (best of own_label and probe)
    verdict: str = ""
    best: str | None = None  # the best row that uses no eval label
    resamples: int = 1000
    identity: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"No row {name!r}; rows: {[r.name for r in self.rows]}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = {
            r.name: {k: v for k, v in r.to_dict().items() if k != "name"} for r in self.rows
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Comparison:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        rows = [Row.from_dict({"name": k, **v}) for k, v in d.pop("rows", {}).items()]
        return cls(**d, rows=rows)

    def __str__(self) -> str:
        metric = "acc %" if self.metric == "accuracy" else "RMSE"
        extra = list(self.higher_is_better)
        lines = [
            f"compare on layer {self.layer}: {self.n:,} labelled eval samples ({self.task})",
            "",
            f"| row | loss | {metric} | "
            + "".join(f"{m} | " for m in extra)
            + "share of gap % [95 % CI] | build s | predict time (x base) |",
            "| --- | ---: | ---: | " + "---: | " * len(extra) + "---: | ---: | ---: |",
        ]
        for r in self.rows:
            if r.skipped:
                lines.append(f"| {r.name} | skipped: {r.skipped} |")
                continue
            m = 100 * r.metric if self.metric == "accuracy" and r.metric is not None else r.metric
            ci = "" if r.share_low is None else f" [{r.share_low:.1f}, {r.share_high:.1f}]"
            lines.append(
                f"| {r.name} | {_fmt(r.loss, '.4f')} | {_fmt(m, '.2f' if metric != 'RMSE' else '.4f')} | "
                + "".join(f"{_fmt(r.metrics.get(k), '.4f')} | " for k in extra)
                + f"{_fmt(r.share, '.1f')}{ci} | {_fmt(r.build_seconds, '.1f')} | "
                f"{_fmt(r.predict_time, '.2f')} |"
            )
        lines.append("")
        lines += [f"{r.name}: {r.description}" for r in self.rows if r.description]
        lines += [f"{r.name}: {r.note}" for r in self.rows if r.note]
        lines.append(f"verdict: {self.verdict}")
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> str:
        """Each row's share of the gap as a bar with its 95 % interval, the bound at 100 %, the
        headroom ceiling as a dashed line when known; saved to ``path`` (needs matplotlib: the
        ``[plots]`` extra)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Comparison.plot needs matplotlib: pip install 'ocdwrap[plots]'."
            ) from e
        rows = [r for r in self.rows if r.share is not None and not r.skipped]
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * max(len(rows), 1), 3.6))
        x = list(range(len(rows)))
        low = [r.share - (r.share_low if r.share_low is not None else r.share) for r in rows]
        high = [(r.share_high if r.share_high is not None else r.share) - r.share for r in rows]
        colours = ["#999999" if r.uses_eval_labels else "#4477aa" for r in rows]
        for i in (k for k, r in enumerate(rows) if r.name in OCD_ROWS):
            colours[i] = "#cc6677"
        ax.bar(x, [r.share for r in rows], yerr=[low, high], color=colours, capsize=3)
        ax.axhline(0.0, color="black", linewidth=0.8)
        if self.ceiling is not None:
            ax.axhline(self.ceiling, color="#117733", linestyle="--", label="headroom ceiling")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(x, [r.name for r in rows], rotation=30, ha="right")
        ax.set_ylabel("% of the base -> bound gap (loss)")
        ax.set_title(f"{self.layer}: {self.n:,} eval samples", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
        plt.close(fig)
        return os.fspath(path)


def verdict(
    rows: list[Row], losses: Mapping[str, torch.Tensor], *, resamples: int, seed: int
) -> tuple[str | None, str]:
    """The best row that uses no eval label (by share of the gap), and where OCD stands against
    it: the difference of their shares with its paired bootstrap interval."""
    done = {r.name: r for r in rows if not r.skipped and r.loss is not None}
    base, bound = done.get("base"), done.get("overfit")
    if base is None or bound is None:
        return None, "incomplete: the base and overfit rows frame every share."
    if base.loss - bound.loss <= 1e-12 * max(1.0, abs(base.loss)):
        return None, (
            f"overfitting the layer on the eval labels does not lower the loss (base "
            f"{base.loss:.4g}, bound {bound.loss:.4g}): there is no gap for a generator to close. "
            "Try a larger overfit_lr or overfit_steps, or another layer."
        )
    free = [r for r in done.values() if not r.uses_eval_labels and r.name != "base"]
    free = [r for r in free if r.share is not None]
    if not free:
        return None, "no row without eval labels was computed."
    best = max(free, key=lambda r: r.share)
    text = f"the best row without eval labels is {best.name}: {_with_ci(best)} of the gap"
    ocd = [r for r in free if r.name in OCD_ROWS]
    if not ocd:
        return best.name, text + "."
    top = max(ocd, key=lambda r: r.share)
    if top.name == best.name:
        others = [r for r in free if r.name not in OCD_ROWS]
        if not others:
            return best.name, text + "."
        second = max(others, key=lambda r: r.share)
        d, lo, hi = share_difference(
            losses["base"], losses["overfit"], losses[best.name], losses[second.name],
            resamples=resamples, seed=seed,
        )  # fmt: skip
        return best.name, text + (
            f"; OCD is the best, {_points(d, lo, hi)} above the next, {second.name} "
            f"({_with_ci(second)})."
        )
    d, lo, hi = share_difference(
        losses["base"], losses["overfit"], losses[best.name], losses[top.name],
        resamples=resamples, seed=seed,
    )  # fmt: skip
    return best.name, text + (
        f"; OCD ({top.name}) takes {_with_ci(top)}, {_points(d, lo, hi)} less."
    )


def _with_ci(r: Row) -> str:
    ci = "" if r.share_low is None else f" [{r.share_low:.1f}, {r.share_high:.1f}]"
    return f"{r.share:.1f} %{ci}"


def _points(d: float | None, lo: float | None, hi: float | None) -> str:
    if d is None:
        return "an undefined number of points"
    ci = "" if lo is None else f" [{lo:.1f}, {hi:.1f}]"
    return f"{d:.1f} points{ci}"
