"""Figures of one's own model: what did OCD learn, how did fitting go, can the spread be trusted.

matplotlib is an optional extra (``pip install "ocdwrap[plots]"``), imported only when a function
here is called. Figures are built on the Agg canvas directly, so nothing here needs a display or
changes the pyplot backend of the calling program. Every function returns a
:class:`matplotlib.figure.Figure` and, given ``path``, also writes a PNG there.

==============================  =================================================================
:func:`plot_layer_scores`       every candidate layer's selection score, the chosen one marked
:func:`plot_fit_losses`         the denoiser's and the scale model's loss curves (FitReport)
:func:`delta_comparison`        generated vs true-label overfit deltas for a few test inputs
:func:`plot_deltas`             their heat maps side by side, with the cosine similarity
:func:`plot_reliability`        reliability diagram, base vs OCD(K), with the ECE
:func:`plot_uncertainty`        ROC curves of the "wrong prediction" scores, spread vs confidence
==============================  =================================================================

Example:
    >>> from ocdwrap.analysis import plots
    >>> report = ocdwrap.fit(model, store)                                  # doctest: +SKIP
    >>> plots.plot_fit_losses(report, path="figs/fit.png")                  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "DeltaComparison",
    "delta_comparison",
    "plot_deltas",
    "plot_fit_losses",
    "plot_layer_scores",
    "plot_reliability",
    "plot_uncertainty",
]

# one colour per role, the same in every figure
CHOSEN = "#d62728"
OTHER = "#9aa5b1"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'ocdwrap.analysis.plots needs matplotlib: pip install "ocdwrap[plots]" (or pip install matplotlib).'
        ) from e
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


# --- layer selection -------------------------------------------------------------------------------


def _ranking(scores: Any) -> list[tuple[str, float]]:
    if hasattr(scores, "ranking"):  # LayerScores
        return [(str(n), float(s)) for n, s in scores.ranking]
    if isinstance(scores, Mapping):
        return [(str(n), float(s)) for n, s in scores.items()]
    return [(str(n), float(s)) for n, s in scores]


def plot_layer_scores(
    scores: Any,
    *,
    chosen: str | None = None,
    reference: str | None = None,
    reference_label: str = "paper's choice",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Every candidate layer's selection score as a horizontal bar, the chosen layer marked.

    Args:
        scores: a :class:`~ocdwrap.LayerScores`, a ``{name: score}`` mapping, or
            ``[[name, score], ...]`` (e.g. ``model.config.layer_ranking``).
        chosen: the layer to mark (default: ``scores.best``, else the highest score).
        reference: another layer to mark, e.g. the one the paper picks for this model.
        path: write a PNG here.

    Example:
        >>> plot_layer_scores(ocdwrap.select_layer(base, loader, loss_fn),
        ...                   reference="fc2", path="layer_scores.png")  # doctest: +SKIP
    """
    ranking = _ranking(scores)
    if not ranking:
        raise ValueError("plot_layer_scores got no candidate layers.")
    chosen = chosen or getattr(scores, "best", None) or max(ranking, key=lambda r: r[1])[0]
    shapes = {s.name: tuple(s.weight_shape) for s in getattr(scores, "layers", [])}
    names = [n for n, _ in ranking]
    values = [v for _, v in ranking]
    fig = _new_figure(7.0, 1.2 + 0.32 * len(ranking))
    ax = fig.add_subplot()
    y = list(range(len(ranking)))[::-1]  # first row on top
    colors = [CHOSEN if n == chosen else OTHER for n in names]
    bars = ax.barh(y, values, color=colors, height=0.7)
    if reference is not None and reference in names:
        i = names.index(reference)
        bars[i].set_hatch("///")
        bars[i].set_edgecolor("black")
    labels = [f"{n} {'x'.join(map(str, shapes[n]))}" if n in shapes else n for n in names]
    ax.set_yticks(y, labels, fontsize=8)
    for yi, v, n in zip(y, values, names):
        tag = ""
        if n == chosen:
            tag += "  chosen"
        if n == reference:
            tag += f"  ({reference_label})"
        ax.annotate(
            f"{v:.4g}{tag}",
            (v, yi),
            xytext=(3 if v >= 0 else -3, 0),
            textcoords="offset points",
            ha="left" if v >= 0 else "right",
            va="center",
            fontsize=7,
        )
    ax.axvline(0, color="black", lw=0.6)
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = 0.35 * (hi - lo or 1.0)
    ax.set_xlim(lo - (pad if lo < 0 else 0), hi + (pad if hi > 0 else 0))
    ax.set_xlabel("score: sum over calibration samples of the loss entropy across perturbations")
    extra = ""
    if hasattr(scores, "perturbation"):
        extra = f" ({scores.perturbation}, {scores.draws} draws, {scores.samples} samples)"
    ax.set_title(title or f"Layer selection{extra}", fontsize=10)
    return _finish(fig, path)


# --- fitting ---------------------------------------------------------------------------------------


def _moving_average(values: Sequence[float], window: int) -> tuple[Any, Any]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    window = max(1, min(window, len(v) // 5))  # short runs: still a visible smoothed line
    kernel = np.ones(window) / window
    smooth = np.convolve(v, kernel, mode="valid")
    x = np.arange(window - 1, len(v)) + 1
    return x, smooth


def _curves(report: Any, key: str) -> list[float]:
    if isinstance(report, Mapping):
        return list(report.get(key, []))
    return list(getattr(report, key, []) or [])


def plot_fit_losses(
    reports: Any,
    *,
    smooth: int = 50,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """The denoiser's loss and the scale model's loss against the training step.

    Args:
        reports: a :class:`~ocdwrap.FitReport` (or its ``to_dict()``), or ``{label: report}``
            to overlay several fits (e.g. diffusion and the regression ablation).
        smooth: moving-average window drawn over the raw (faint) curve.
        path: write a PNG here.

    Example:
        >>> plot_fit_losses({"rank-1 diffusion": rep, "regressor": rep_reg}, path="fit.png")  # doctest: +SKIP
    """
    if not isinstance(reports, Mapping) or "losses" in reports:
        reports = {"": reports}
    fig = _new_figure(10.0, 3.6)
    ax_d, ax_s = fig.subplots(1, 2)
    for i, (label, rep) in enumerate(reports.items()):
        color = PALETTE[i % len(PALETTE)]
        for ax, key in ((ax_d, "losses"), (ax_s, "scale_losses")):
            values = _curves(rep, key)
            if not values:
                continue
            steps = range(1, len(values) + 1)
            ax.plot(steps, values, color=color, alpha=0.2, lw=0.6)
            x, y = _moving_average(values, smooth)
            ax.plot(x, y, color=color, lw=1.6, label=label or None)
    ax_d.set_yscale("log")
    ax_d.set_xlabel("step")
    ax_d.set_ylabel("loss (log scale)")
    ax_d.set_title("generator: ε-prediction MSE (or regression MSE)", fontsize=10)
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("10·log10(relative squared error) [dB]")
    ax_s.set_title("scale model ρ(I(x)): relative loss", fontsize=10)
    for ax in (ax_d, ax_s):
        ax.grid(alpha=0.3)
        if any(reports):
            ax.legend(fontsize=8)
    fig.suptitle(title or f"fit(): raw (faint) and {smooth}-step moving average", fontsize=11)
    return _finish(fig, path)


# --- deltas ----------------------------------------------------------------------------------------


@dataclass
class DeltaComparison:
    """Generated vs true-label overfit deltas for a few inputs.

    Attributes:
        generated: (B, out, in') one draw of rho(I(x)) * delta_hat per input (Conv2d weights
            flattened to (out, in * kh * kw)).
        overfit: (B, out, in') the delta from overfitting the layer on the input with its true
            label (the upper bound's delta).
        cosine: (B,) cosine similarity of the two, flattened.
        targets: (B,) the true labels (when they are class indices), else None.
    """

    generated: torch.Tensor
    overfit: torch.Tensor
    cosine: torch.Tensor
    targets: torch.Tensor | None = None


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(delta.shape[0], delta.shape[1], -1).float().cpu()


@torch.no_grad()
def delta_comparison(
    model: Any,
    inputs: Any,
    target: Any,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    rng: torch.Generator | None = None,
) -> DeltaComparison:
    """For each input of one batch: a generated delta and the true-label overfit delta.

    The overfit delta is what :func:`ocdwrap.overfit_batch` gives (the same optimizer, steps and
    learning rate as the collection), so a cosine of 1 means the generator reproduced exactly
    what overfitting on the answer would have done.

    Example:
        >>> cmp = delta_comparison(model, x_test[:4], y_test[:4], nn.CrossEntropyLoss(reduction="none"))  # doctest: +SKIP
        >>> cmp.cosine                                                                              # doctest: +SKIP
    """
    from ..batches import to_device
    from ..overfit import overfit_batch

    inputs, target = to_device(inputs, model.device), to_device(target, model.device)
    res = overfit_batch(model, inputs, target, loss_fn)
    args = (inputs,) if not isinstance(inputs, Mapping) else ()
    kwargs = dict(inputs) if isinstance(inputs, Mapping) else {}
    cond, _ = model.conditioning(*args, **kwargs)
    spec = model.generate(cond, num_draws=1, rng=rng)
    gen = spec.full(model.weight_shape)
    gen, over = _as_matrix(gen), _as_matrix(res.delta)
    cos = torch.nn.functional.cosine_similarity(gen.flatten(1), over.flatten(1), dim=1)
    tgt = target.cpu() if isinstance(target, torch.Tensor) and target.dim() == 1 else None
    return DeltaComparison(gen, over, cos, tgt)


def plot_deltas(
    comparison: DeltaComparison,
    *,
    images: torch.Tensor | None = None,
    max_samples: int = 4,
    layer: str | None = None,
    shared_scale: bool = False,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Heat maps: each row one test input, its generated delta next to its true-label overfit delta.

    Each map has its own symmetric colour scale (so the patterns show even when the sizes
    differ) and its Frobenius norm in the title; ``shared_scale=True`` gives both maps of a row
    one scale instead. The titles give the pair's cosine similarity.

    Args:
        comparison: from :func:`delta_comparison`.
        images: (B, H, W) or (B, 1, H, W) inputs to show in a first column (optional).
        max_samples: rows to draw.
        layer: the layer's name, for the axis labels.
        shared_scale: one colour scale for both maps of a row.
        path: write a PNG here.

    Example:
        >>> plot_deltas(delta_comparison(model, x[:4], y[:4], ce), images=x[:4], path="deltas.png")  # doctest: +SKIP
    """
    import numpy as np

    n = min(max_samples, comparison.generated.shape[0])
    if n == 0:
        raise ValueError("plot_deltas got an empty comparison.")
    has_img = images is not None
    ncols = 3 if has_img else 2
    out_dim, in_dim = comparison.generated.shape[1:]
    cell_w = 3.4 * min(2.0, max(0.6, in_dim / max(out_dim, 1)))
    width = (1.6 if has_img else 0.0) + 2 * cell_w + 0.8
    fig = _new_figure(width, 2.6 * n + 0.4)
    widths = ([0.45] if has_img else []) + [1.0, 1.0]
    axes = fig.subplots(n, ncols, squeeze=False, gridspec_kw={"width_ratios": widths})

    def limit(*mats: Any) -> float:
        v = float(np.percentile(np.abs(np.concatenate([m.ravel() for m in mats])), 99.5))
        return v or 1e-12

    for r in range(n):
        gen = comparison.generated[r].numpy()
        over = comparison.overfit[r].numpy()
        label = f"label {int(comparison.targets[r])}" if comparison.targets is not None else ""
        c = 0
        if has_img:
            img = images[r].detach().cpu().float()
            img = img.squeeze(0) if img.dim() == 3 and img.shape[0] == 1 else img
            if img.dim() == 3:  # (C, H, W) colour
                img = img.permute(1, 2, 0)
                img = (img - img.min()) / (img.max() - img.min() + 1e-12)
            axes[r, 0].imshow(img.numpy(), cmap="gray", interpolation="nearest")
            axes[r, 0].set_title(f"input #{r}" + (f", {label}" if label else ""), fontsize=8)
            axes[r, 0].axis("off")
            c = 1
        cos = float(comparison.cosine[r])
        both = limit(gen, over)
        for j, (mat, name) in enumerate(
            ((gen, "generated (one draw)"), (over, "overfit with the true label"))
        ):
            ax = axes[r, c + j]
            vmax = both if shared_scale else limit(mat)
            im = ax.imshow(
                mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest"
            )
            norm = float(np.linalg.norm(mat))
            ax.set_title(
                f"{name}, ‖ΔW‖ = {norm:.3g}\ncos = {cos:.3f}"
                + (f", {label}" if label and not has_img else ""),
                fontsize=8,
            )
            ax.set_xlabel(f"{layer + ' ' if layer else ''}input dim", fontsize=7)
            ax.set_ylabel("output dim", fontsize=7)
            ax.tick_params(labelsize=6)
            if not shared_scale or j == 1:
                targets = ax if not shared_scale else axes[r, c : c + 2].tolist()
                cb = fig.colorbar(im, ax=targets, shrink=0.85, pad=0.01)
                cb.ax.tick_params(labelsize=6)
    mean_cos = float(comparison.cosine[:n].mean())
    fig.suptitle(
        title or f"ΔW for {n} test inputs: generated vs overfit (mean cosine {mean_cos:.3f})",
        fontsize=10,
    )
    return _finish(fig, path, dpi=90)


# --- uncertainty -----------------------------------------------------------------------------------


def _curves_from(curves: Any) -> dict[str, tuple[Any, Any]]:
    if hasattr(curves, "base_probs"):  # UncertaintyReport
        return {
            "base": (curves.base_probs, curves.targets),
            f"OCD({curves.num_draws})": (curves.ocd_probs, curves.targets),
        }
    return dict(curves)


def plot_reliability(
    curves: Any,
    *,
    n_bins: int = 15,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, the ECE in the legend.

    The lower panel counts the samples per confidence bin (log scale): on an accurate model
    almost all of them sit in the last bin, and the ECE weighs bins by these counts.

    Args:
        curves: an :class:`~ocdwrap.analysis.uncertainty.UncertaintyReport` (base vs OCD(K)) or
            ``{label: (probs (N, C), targets (N,))}``.
        n_bins: equal-width confidence bins.
        path: write a PNG here.

    Example:
        >>> plot_reliability(misclassification_report(model, test_loader), path="rel.png")  # doctest: +SKIP
    """
    from .uncertainty import reliability_bins

    curves = _curves_from(curves)
    fig = _new_figure(5.6, 5.6)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="perfect calibration")
    width = 1.0 / n_bins
    k = len(curves)
    for i, (label, (probs, targets)) in enumerate(curves.items()):
        b = reliability_bins(probs, targets, n_bins)
        color = PALETTE[i % len(PALETTE)]
        keep = (b.count > 0).numpy()
        conf, acc = b.confidence.numpy()[keep], b.accuracy.numpy()[keep]
        ax.plot(conf, acc, "o-", color=color, ms=4, label=f"{label}: ECE {b.ece:.4f}")
        left = b.edges[:-1].numpy() + width * (0.1 + 0.8 * i / k)
        ax_n.bar(left, b.count.numpy(), width=0.8 * width / k, align="edge", color=color)
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.set_yscale("log")
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("samples")
    ax.set_title(title or f"Reliability ({n_bins} equal-width bins)", fontsize=10)
    return _finish(fig, path)


def plot_uncertainty(
    report: Any,
    *,
    target: str = "ocd",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Left: ROC curves of each "this prediction is wrong" score. Right: spread vs base confidence.

    The scatter answers "does the spread know anything the confidence does not": if the wrong
    predictions (red) separate from the right ones (grey) along the spread axis *at a fixed*
    1 - MSP, it does; if the cloud is a thin diagonal band, the spread restates the confidence.

    Args:
        report: an :class:`~ocdwrap.analysis.uncertainty.UncertaintyReport`.
        target: whose errors are to be detected, ``"ocd"`` (OCD(K)'s) or ``"base"``.
        path: write a PNG here.

    Example:
        >>> plot_uncertainty(misclassification_report(model, test_loader), path="unc.png")  # doctest: +SKIP
    """
    import numpy as np

    from .uncertainty import SCORE_NAMES, auroc, roc_curve

    wrong = report.wrong(target)
    scores = report.scores()
    fig = _new_figure(10.5, 4.4)
    ax_roc, ax_sc = fig.subplots(1, 2)
    ax_roc.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":")
    for i, (key, s) in enumerate(scores.items()):
        fpr, tpr = roc_curve(s, wrong)
        ax_roc.plot(
            fpr.numpy(),
            tpr.numpy(),
            color=PALETTE[i],
            lw=1.5,
            label=f"{SCORE_NAMES[key]}: AUROC {auroc(s, wrong):.3f}",
        )
    name = f"OCD({report.num_draws})" if target == "ocd" else "base"
    ax_roc.set_xlabel("false positive rate (right predictions flagged)")
    ax_roc.set_ylabel("true positive rate (wrong predictions caught)")
    ax_roc.set_title(f"detecting the {int(wrong.sum())} wrong {name} predictions", fontsize=10)
    ax_roc.legend(fontsize=7, loc="lower right")
    ax_roc.grid(alpha=0.3)

    msp = np.log10(np.clip(scores["base_msp"].numpy(), 1e-12, None))
    spr = np.log10(np.clip(scores["spread"].numpy(), 1e-12, None))
    w = wrong.numpy()
    ax_sc.scatter(
        msp[~w], spr[~w], s=3, color=OTHER, alpha=0.35, lw=0, label="right", rasterized=True
    )
    ax_sc.scatter(msp[w], spr[w], s=12, color=CHOSEN, marker="x", lw=0.8, label="wrong")
    rho = report.spearman_spread_vs_base_msp
    ax_sc.set_xlabel("log10(1 - base max softmax probability)")
    ax_sc.set_ylabel("log10(spread between draws)")
    ax_sc.set_title(f"spread vs base confidence (Spearman {rho:.2f})", fontsize=10)
    ax_sc.legend(fontsize=8, markerscale=2)
    ax_sc.grid(alpha=0.3)
    fig.suptitle(title or f"Uncertainty on {report.n} test samples", fontsize=11)
    return _finish(fig, path)
