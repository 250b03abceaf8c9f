"""Is the spread between OCD's generated networks a useful "this prediction is wrong" signal?

Lutati & Wolf (ICLR 2023) note that different initial noise gives different networks for the
same input, and that the spread between them measures uncertainty. This module measures that
claim against the obvious baseline, the base model's own confidence:

* :func:`auroc`: area under the ROC curve of a score for detecting positives (here: wrong
  predictions), by the rank statistic (Mann-Whitney U, ties counted one half). No sklearn needed.
* :func:`roc_curve`, :func:`reliability_bins`, :func:`expected_calibration_error`.
* :func:`misclassification_report`: for an :class:`~ocdwrap.OCDModel` and a test loader, the AUROC
  of the ensemble spread, of the base model's 1 - max softmax probability, and of the OCD
  ensemble's 1 - max mean probability; the expected calibration error of base and OCD(K); and a
  direct test of whether the spread adds anything once the base confidence is known
  (cross-validated logistic combination, paired bootstrap interval).

Every function takes torch tensors, numpy arrays or lists and returns plain floats or tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ReliabilityBins",
    "UncertaintyReport",
    "auroc",
    "bootstrap_auroc_difference",
    "cross_validated_logistic_scores",
    "expected_calibration_error",
    "misclassification_report",
    "reliability_bins",
    "roc_curve",
    "spearman",
]

ArrayLike = Any  # torch.Tensor | numpy.ndarray | Sequence[float]


def _vec(x: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.reshape(-1).to(device="cpu", dtype=dtype)


def _midranks(s: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``s``, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts  # 0-based first rank of every distinct value
    return (start.double() + (counts.double() + 1) / 2)[inverse]


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for telling ``labels == 1`` from ``labels == 0``.

    The probability that a random positive scores higher than a random negative, ties counting
    one half (the Mann-Whitney U statistic over n_pos * n_neg). 1.0: perfect; 0.5: chance.
    NaN when either class is empty.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
        >>> auroc([1, 1, 1], [0, 1, 1])
        0.5
    """
    s, y = _vec(scores), _vec(labels).bool()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.numel()} vs {y.numel()}.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if not torch.isfinite(s).all():
        raise ValueError("auroc got non-finite scores; replace NaN/inf before scoring.")
    ranks = _midranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1).

    The trapezoid area under (fpr, tpr) equals :func:`auroc`.

    Example:
        >>> fpr, tpr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s, y = _vec(scores), _vec(labels)
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tp, fp = torch.cumsum(y, 0), torch.cumsum(1 - y, 0)
    last_of_value = torch.ones_like(s, dtype=torch.bool)
    last_of_value[:-1] = s[1:] != s[:-1]  # thresholds between distinct values only
    tp, fp = tp[last_of_value], fp[last_of_value]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp / max(float(y.sum()), 1.0)])
    fpr = torch.cat([zero, fp / max(float((1 - y).sum()), 1.0)])
    return fpr, tpr


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of mid-ranks).

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
        1.0
    """
    ra, rb = _midranks(_vec(a)), _midranks(_vec(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


# --- calibration ---------------------------------------------------------------------------------


@dataclass
class ReliabilityBins:
    """Equal-width confidence bins over (0, 1]. Empty bins hold NaN confidence and accuracy.

    Attributes:
        edges: (n_bins + 1,) bin edges.
        confidence: (n_bins,) mean confidence (max probability) of the samples in each bin.
        accuracy: (n_bins,) fraction of those samples predicted correctly.
        count: (n_bins,) number of samples in each bin.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (n_b / N) |accuracy_b - confidence_b|."""
        n = self.count.sum()
        keep = self.count > 0
        gap = (self.accuracy[keep] - self.confidence[keep]).abs()
        return float((self.count[keep] / n * gap).sum()) if n > 0 else float("nan")


def _confidence_correct(probs: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = probs.detach() if isinstance(probs, torch.Tensor) else torch.as_tensor(probs)
    p = p.to(device="cpu", dtype=torch.float64)
    if p.dim() != 2:
        raise ValueError(f"probs must be (N, classes) probabilities; got shape {tuple(p.shape)}.")
    conf, pred = p.max(1)
    correct = (pred == _vec(targets, torch.long)).double()
    return conf, correct


def reliability_bins(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> ReliabilityBins:
    """Bin predictions by confidence (max probability) into ``n_bins`` equal-width bins.

    ``probs``: (N, classes) probabilities (not logits); ``targets``: (N,) class indices.
    Bin k holds confidences in (k / n_bins, (k + 1) / n_bins]; a confidence of 0 goes to bin 0.

    Example:
        >>> b = reliability_bins([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=2)
        >>> b.count.tolist(), b.accuracy.tolist()
        ([0.0, 2.0], [nan, 0.5])
    """
    conf, correct = _confidence_correct(probs, targets)
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    nan = torch.full_like(count, float("nan"))
    safe = count.clamp_min(1)
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        confidence=torch.where(count > 0, conf_sum / safe, nan),
        accuracy=torch.where(count > 0, corr_sum / safe, nan),
        count=count,
    )


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) with ``n_bins`` equal-width bins.

    ``probs``: (N, classes) probabilities; ``targets``: (N,) class indices.

    Example:
        >>> expected_calibration_error([[0.9, 0.1], [0.6, 0.4]], [0, 1], n_bins=2)
        0.25
    """
    return reliability_bins(probs, targets, n_bins).ece


# --- does the spread add anything over the base confidence? -----------------------------------------


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4) -> torch.Tensor:
    """Weights (d + 1,) (the bias last) of a logistic regression with the penalty
    ``l2 * ||w||²`` (:func:`ocdwrap.probe.fit_logistic`, L-BFGS to 200 iterations)."""
    from ..probe import fit_logistic

    W, b = fit_logistic(
        x,
        y,
        l2=2 * l2,
        max_iter=200,
        history_size=100,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
    )
    return torch.cat([W, b.reshape(1)])


def cross_validated_logistic_scores(
    features: ArrayLike, labels: ArrayLike, *, folds: int = 5, seed: int = 0
) -> torch.Tensor:
    """Out-of-fold scores of a logistic regression of ``labels`` on ``features`` (N, d).

    Each sample is scored by a model fitted on the other folds (features standardised on the
    training folds), so the AUROC of the result is an honest estimate for the combination.

    Example:
        >>> x = torch.linspace(-1, 1, 40).unsqueeze(1)
        >>> s = cross_validated_logistic_scores(x, (x[:, 0] > 0).double(), folds=4)
        >>> auroc(s, x[:, 0] > 0) > 0.95
        True
    """
    x = features.detach() if isinstance(features, torch.Tensor) else torch.as_tensor(features)
    x = x.to(device="cpu", dtype=torch.float64)
    x = x.unsqueeze(1) if x.dim() == 1 else x
    y = _vec(labels)
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.float64)
    for k in range(folds):
        test = perm[k::folds]
        train_mask = torch.ones(n, dtype=torch.bool)
        train_mask[test] = False
        xt, yt = x[train_mask], y[train_mask]
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-12)
        w = _fit_logistic((xt - mu) / sd, yt)
        xs = (x[test] - mu) / sd
        out[test] = xs @ w[:-1] + w[-1]
    return out


def bootstrap_auroc_difference(
    score_a: ArrayLike,
    score_b: ArrayLike,
    labels: ArrayLike,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) on the same samples, with a paired percentile bootstrap interval.

    Returns ``(difference, low, high)``. An interval that excludes 0 is evidence that one score
    separates the labels better than the other on data like this.

    Example:
        >>> d, lo, hi = bootstrap_auroc_difference([0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 1, 1])
        >>> d, lo, hi
        (0.0, 0.0, 0.0)
    """
    a, b, y = _vec(score_a), _vec(score_b), _vec(labels).bool()
    diff = auroc(a, y) - auroc(b, y)
    g = torch.Generator().manual_seed(seed)
    n = y.numel()
    diffs = []
    for _ in range(resamples):
        i = torch.randint(0, n, (n,), generator=g)
        d = auroc(a[i], y[i]) - auroc(b[i], y[i])
        if not math.isnan(d):
            diffs.append(d)
    if not diffs:
        return diff, float("nan"), float("nan")
    q = torch.tensor(diffs, dtype=torch.float64)
    lo = float(torch.quantile(q, (1 - level) / 2))
    hi = float(torch.quantile(q, 1 - (1 - level) / 2))
    return diff, lo, hi


# --- the report on an OCD model -----------------------------------------------------------------


SCORE_NAMES = {
    "spread": "OCD ensemble spread (std between draws)",
    "base_msp": "base 1 - max softmax probability",
    "ocd_mean_prob": "OCD 1 - max mean probability",
}


@dataclass
class UncertaintyReport:
    """What :func:`misclassification_report` measured.

    Attributes:
        n: test samples.
        num_draws: ensemble size K of OCD(K).
        accuracy: ``{"base": ..., "ocd": ...}`` (OCD is OCD(K)).
        errors: number of misclassified samples, same keys.
        auroc: ``{target: {score: AUROC}}``; target "ocd_wrong" (the OCD(K) prediction is
            wrong) or "base_wrong"; score "spread", "base_msp" (1 - MSP), "ocd_mean_prob".
        ece: expected calibration error ``{"base": ..., "ocd": ...}`` with ``n_bins`` bins.
        spearman_spread_vs_base_msp: rank correlation of the spread with 1 - MSP.
        added_value: ``{target: {...}}`` cross-validated AUROC of a logistic model on
            log(1 - MSP) alone and on log(1 - MSP) + log(spread), and the paired bootstrap
            difference (combined - MSP alone) with its 95 % interval.
        base_probs, ocd_probs: (N, C) probabilities; targets: (N,); spread: (N,).
    """

    n: int
    num_draws: int
    n_bins: int
    accuracy: dict[str, float]
    errors: dict[str, int]
    auroc: dict[str, dict[str, float]]
    ece: dict[str, float]
    spearman_spread_vs_base_msp: float
    added_value: dict[str, dict[str, float]]
    base_probs: torch.Tensor = field(repr=False)
    ocd_probs: torch.Tensor = field(repr=False)
    targets: torch.Tensor = field(repr=False)
    spread: torch.Tensor = field(repr=False)

    def scores(self) -> dict[str, torch.Tensor]:
        """Each "this prediction is wrong" score, (N,) each, higher meaning more likely wrong."""
        return {
            "spread": self.spread.double(),
            "base_msp": 1 - self.base_probs.max(1).values.double(),
            "ocd_mean_prob": 1 - self.ocd_probs.max(1).values.double(),
        }

    def wrong(self, which: str = "ocd") -> torch.Tensor:
        """(N,) bool: the ``"ocd"`` or ``"base"`` prediction is wrong."""
        probs = self.ocd_probs if which == "ocd" else self.base_probs
        return probs.argmax(1) != self.targets

    @property
    def spread_adds_information(self) -> bool:
        """True when, for the OCD(K) prediction, adding the spread to the base confidence raises
        the cross-validated AUROC with a 95 % bootstrap interval above zero."""
        return self.added_value["ocd_wrong"]["difference_low"] > 0

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-friendly (no per-sample tensors)."""
        return {
            "n": self.n,
            "num_draws": self.num_draws,
            "n_bins": self.n_bins,
            "accuracy": self.accuracy,
            "errors": self.errors,
            "auroc": self.auroc,
            "ece": self.ece,
            "spearman_spread_vs_base_msp": self.spearman_spread_vs_base_msp,
            "added_value": self.added_value,
            "spread_adds_information": self.spread_adds_information,
        }

    def table(self) -> str:
        """A Markdown table of the AUROCs and the ECEs."""
        lines = [
            "| score for 'this prediction is wrong' | AUROC, OCD(K) wrong | AUROC, base wrong |",
            "| --- | --- | --- |",
        ]
        for key, label in SCORE_NAMES.items():
            a, b = self.auroc["ocd_wrong"][key], self.auroc["base_wrong"][key]
            lines.append(f"| {label} | {a:.4f} | {b:.4f} |")
        for target in ("ocd_wrong", "base_wrong"):
            v = self.added_value[target]
            lines.append(
                f"| logistic(1 - MSP) / + spread, cross-validated, {target} | "
                f"{v['auroc_msp']:.4f} / {v['auroc_msp_plus_spread']:.4f} | "
                f"difference {v['difference']:+.4f} [{v['difference_low']:+.4f}, {v['difference_high']:+.4f}] |"
            )
        lines += [
            "",
            f"accuracy: base {100 * self.accuracy['base']:.2f} % ({self.errors['base']} errors), "
            f"OCD({self.num_draws}) {100 * self.accuracy['ocd']:.2f} % ({self.errors['ocd']} errors), "
            f"n = {self.n}",
            f"ECE ({self.n_bins} bins): base {self.ece['base']:.4f}, OCD({self.num_draws}) {self.ece['ocd']:.4f}",
            f"Spearman(spread, 1 - MSP) = {self.spearman_spread_vs_base_msp:.3f}",
        ]
        return "\n".join(lines)


def _added_value(
    msp: torch.Tensor, spread: torch.Tensor, wrong: torch.Tensor, *, seed: int, resamples: int
) -> dict[str, float]:
    f_msp = torch.log(msp.clamp_min(1e-12)).unsqueeze(1)
    f_both = torch.cat([f_msp, torch.log(spread.clamp_min(1e-12)).unsqueeze(1)], 1)
    s_msp = cross_validated_logistic_scores(f_msp, wrong, seed=seed)
    s_both = cross_validated_logistic_scores(f_both, wrong, seed=seed)
    diff, lo, hi = bootstrap_auroc_difference(s_both, s_msp, wrong, resamples=resamples, seed=seed)
    return {
        "auroc_msp": auroc(s_msp, wrong),
        "auroc_msp_plus_spread": auroc(s_both, wrong),
        "difference": diff,
        "difference_low": lo,
        "difference_high": hi,
    }


def misclassification_report(
    model: Any,
    data: Iterable,
    *,
    num_draws: int = 5,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    n_bins: int = 15,
    resamples: int = 1000,
) -> UncertaintyReport:
    """Measure OCD's spread as a detector of wrong predictions, next to the base confidence.

    Runs the base model and OCD(``num_draws``) once over ``data`` (a classification loader of
    ``(inputs, target)`` batches) and scores "this prediction is wrong" three ways: the spread
    between the K generated networks (:attr:`EnsembleOutput.uncertainty`), the base model's
    1 - max softmax probability, and 1 - the OCD ensemble's max mean probability. Each is scored
    against both the OCD(K) prediction's errors and the base prediction's errors.

    Example:
        >>> rep = misclassification_report(model, test_loader, num_draws=5)  # doctest: +SKIP
        >>> print(rep.table())                                                # doctest: +SKIP
    """
    from ..evaluation import evaluate_ocd

    loss_fn = loss_fn or torch.nn.CrossEntropyLoss(reduction="none")
    base = evaluate_ocd(model, data, loss_fn, mode="base", return_predictions=True)
    ocd = evaluate_ocd(
        model, data, loss_fn, num_draws=num_draws, seed=seed, return_predictions=True
    )
    targets = base["targets"].long()
    if not torch.equal(targets, ocd["targets"].long()):
        raise ValueError("The loader gave different samples on two passes; do not shuffle it.")
    # base predictions are logits; OCD(K)'s are log mean probabilities: softmax gives both
    base_probs = base["predictions"].double().softmax(1)
    ocd_probs = ocd["predictions"].double().softmax(1)
    spread = ocd["spread"].double()
    rep = UncertaintyReport(
        n=int(targets.numel()),
        num_draws=num_draws,
        n_bins=n_bins,
        accuracy={},
        errors={},
        auroc={},
        ece={},
        spearman_spread_vs_base_msp=float("nan"),
        added_value={},
        base_probs=base_probs,
        ocd_probs=ocd_probs,
        targets=targets,
        spread=spread,
    )
    scores = rep.scores()
    for which in ("base", "ocd"):
        wrong = rep.wrong(which)
        probs = base_probs if which == "base" else ocd_probs
        rep.errors[which] = int(wrong.sum())
        rep.accuracy[which] = 1 - rep.errors[which] / rep.n
        rep.ece[which] = expected_calibration_error(probs, targets, n_bins)
        rep.auroc[f"{which}_wrong"] = {k: auroc(s, wrong) for k, s in scores.items()}
        rep.added_value[f"{which}_wrong"] = _added_value(
            scores["base_msp"], spread, wrong, seed=seed, resamples=resamples
        )
    rep.spearman_spread_vs_base_msp = spearman(spread, scores["base_msp"])
    return rep
