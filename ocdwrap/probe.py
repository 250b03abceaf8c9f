"""The probe of the label: what the conditioning I(x) predicts about a sample's label.

OCD's generator sees only I(x) = (layer input, layer output, model output), pooled per sample.
A label-free generator can only gain where I(x) predicts the label better than the base's own
output does; a probe fitted on I(x) measures that. On the base pass over a labelled loader
(:func:`ocdwrap.evaluation.read_labelled`: conditioning, base prediction, per-sample loss) this
module fits the probe: a multinomial logistic regression on top of the base's logits
(classification) or a ridge regression of the base's residual (regression), on the
standardised I(x) and random Fourier
features of it, its L2 strength chosen by cross-validated loss among a small grid and
"infinite" (the base itself). ``ocdwrap.headroom`` and ``ocdwrap.compare`` both use it, and
the probe's targets to overfit towards (its label distribution, its expected delta over labels);
docs/headroom.md ("The probe") explains the choices.

:func:`fit_logistic` is the one L-BFGS logistic regression of the library (also used by
``ocdwrap.analysis.uncertainty``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .capture import Conditioning
from .errors import ProbeFitError
from .evaluation import LabelledSplit
from .overfit import overfit_batch

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
ProbeFn = Callable[[Conditioning, torch.Tensor], torch.Tensor]

__all__ = [
    "fit_logistic",
    "fit_probe",
    "probe_quality",
    "probe_step",
    "soft_cross_entropy",
    "user_probe",
]

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --- the soft cross-entropy ------------------------------------------------------------------------


class _SoftCE(torch.autograd.Function):
    """-sum q log softmax(z), with the gradient written as softmax(z) - q.

    q is taken as a distribution (rows summing to 1). Autograd's log_softmax backward computes
    ``softmax * sum(q) - q``, which leaves rounding noise when q == softmax(z) (sum(q) is 1 only
    up to rounding); Adam divides by the gradient's own size, so that noise would become a step.
    Written this way the gradient is exactly zero when q equals the model's softmax bit for bit.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z, q)
        return -(q * torch.log_softmax(z, dim=-1)).sum(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, q = ctx.saved_tensors
        return grad.unsqueeze(-1) * (torch.softmax(z, dim=-1) - q), None


def soft_cross_entropy(pred: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of logits ``pred`` (B, C) towards distributions ``q`` (B, C)."""
    return _SoftCE.apply(pred.float(), q.float())


# --- the probe -------------------------------------------------------------------------------------


def _standardizer(phi: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = phi.mean(0), phi.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return lambda x: (x - mean) / std


RANDOM_FEATURES = 256  # random Fourier features appended to the standardised conditioning


def _lift(x: torch.Tensor) -> torch.Tensor:
    """Standardised features (N, d) and random Fourier features of them (N, d + D), so the
    (linear) probes can also fit smooth non-linear functions of I(x): the residual of a linear
    base is uncorrelated with any linear function of its own input, so a linear probe could never
    see it. An RBF kernel of width sqrt(d) (the typical distance of standardised vectors); the
    projection is fixed (seed 0), the same for every fold and split."""
    W, b = _projection(x.shape[1], x.dtype)
    rff = math.sqrt(2.0) * torch.cos(x @ W.to(x.device) + b.to(x.device))  # unit variance each
    return torch.cat([x, rff], dim=1)


@functools.lru_cache(maxsize=8)
def _projection(d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random projection of :func:`_lift` for width ``d``, built once (read-only)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(d, RANDOM_FEATURES, generator=gen, dtype=dtype) / math.sqrt(d)
    b = torch.rand(RANDOM_FEATURES, generator=gen, dtype=dtype) * (2 * math.pi)
    return W, b


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    l2: float,
    offset: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 50,
    history_size: int = 20,
    tolerance_grad: float = 1e-5,
    tolerance_change: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic regression fitted by L-BFGS (strong Wolfe line search): the weights (W, b).

    Integer labels ``y`` (N,): multinomial, logits ``offset + x @ W + b`` with W (d, C), b (C,)
    (C from ``offset``, else ``y.max() + 1``). Float labels in [0, 1] (N,): binary, logit
    ``offset + x @ W + b`` with W (d,), b a scalar. The loss is the mean cross-entropy plus
    ``0.5 * l2 * ||W||²`` (the bias is not penalised); ``init`` warm-starts (W, b).

    Example:
        >>> W, b = fit_logistic(x, (x[:, 0] > 0).double(), l2=1e-4)
    """
    binary = y.is_floating_point()
    if init is None:
        C = offset.shape[1] if offset is not None else int(y.max()) + 1
        init = (
            (x.new_zeros(x.shape[1]), x.new_zeros(()))
            if binary
            else (x.new_zeros(x.shape[1], C), x.new_zeros(C))
        )
    W, b = (t.clone().requires_grad_(True) for t in init)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=history_size,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ W + b if offset is None else offset + x @ W + b
        fit = F.binary_cross_entropy_with_logits(z, y) if binary else F.cross_entropy(z, y)
        loss = fit + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _fit_logistic(phi: torch.Tensor, z: torch.Tensor, y: torch.Tensor, l2: float, init=None):
    """Logits z + standardised(phi) W + b, W with an L2 penalty (:func:`fit_logistic`).

    Returns the predictor (phi, z) -> label distribution and (W, b), a warm start for the next
    strength (the cross-fit goes from strong to weak penalties, each a few L-BFGS steps on).
    """
    scale = _standardizer(phi)
    x = _lift(scale(phi))
    W, b = fit_logistic(x, y, l2=l2, offset=z, init=init)
    return (lambda phi_, z_: torch.softmax(z_ + _lift(scale(phi_)) @ W + b, dim=-1)), (W, b)


def _fit_ridge(phi: torch.Tensor, z: torch.Tensor, y: torch.Tensor, l2: float, init=None):
    """The target as z + standardised(phi) w + b: a ridge regression of the base's residual."""
    scale = _standardizer(phi)
    x = _lift(scale(phi)).double()
    r = (y - z).double()
    b = r.mean(0)
    xc = x - x.mean(0)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(xc.T @ xc + l2 * x.shape[0] * eye, xc.T @ (r - b))
    w, b = w.float(), (b - x.mean(0) @ w).float()
    return (lambda phi_, z_: z_ + _lift(scale(phi_)) @ w + b), None


def _probe_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.nll_loss(out.clamp_min(1e-12).log(), y, reduction="none")
    return ((out - y) ** 2).mean(1)


def _base_prediction(task: str, z: torch.Tensor) -> torch.Tensor:
    """The probe that learns nothing: the base's own softmax (or prediction)."""
    return torch.softmax(z, dim=-1) if task == "classification" else z.clone()


def _crossfit(task, phi, z, y, folds, seed, l2s=L2_GRID):
    """Out-of-fold predictions for each L2 strength; the strength with the lowest loss wins.

    Infinite strength is a candidate too: the base's own prediction. When no fitted probe
    predicts the held-out labels better than the base does, the probe *is* the base (and its
    row equals the base row: zero gradient).
    """
    N = phi.shape[0]
    gen = torch.Generator().manual_seed(seed)
    fold = (torch.randperm(N, generator=gen) % folds).to(phi.device)
    fit = _fit_logistic if task == "classification" else _fit_ridge
    l2s = sorted(l2s, reverse=True)
    oof = {l2: torch.empty_like(z) for l2 in l2s}
    for f in range(folds):
        test, init = fold == f, None
        for l2 in l2s:
            predict, init = fit(phi[~test], z[~test], y[~test], l2, init)
            oof[l2][test] = predict(phi[test], z[test])
    oof[math.inf] = _base_prediction(task, z)
    loss = {l2: float(_probe_loss(task, out, y).mean()) for l2, out in oof.items()}
    best = min(oof, key=lambda l2: loss[l2])
    return oof[best], best


def probe_arrays(
    split: LabelledSplit, task: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, base output, labels) as the probe sees them: (N, d), (N, k), (N,) or (N, k)."""
    N = split.pred.shape[0]
    z = split.pred.reshape(N, -1).float()
    if task == "classification":
        return split.features, z, split.target.long()
    y = split.target.reshape(N, -1).float()
    if y.shape != z.shape:
        raise ProbeFitError(
            f"The regression probe predicts the target from the base's prediction; the labels have "
            f"{y.shape[1]} values per sample but the prediction {z.shape[1]}. Yield targets shaped "
            "like the model's output, or pass probe= a function that predicts them."
        )
    return split.features, z, y


def _check_fittable(task: str, y: torch.Tensor, folds: int, role: str) -> None:
    if folds < 2:
        raise ProbeFitError(f"folds={folds}; cross-fitting needs folds >= 2 (default 5).")
    if y.shape[0] < 2 * folds:
        raise ProbeFitError(
            f"The probe is fitted with {folds}-fold cross-validation on the {role} samples, but there "
            f"are only {y.shape[0]}; use at least {2 * folds} samples (raise max_samples) or lower folds."
        )
    if task == "classification" and y.unique().numel() < 2:
        raise ProbeFitError(
            f"Every {role} sample has the label {int(y[0])}: a probe of the label needs at least two "
            "classes. Use a held-out loader with samples of several classes (not one sorted by label "
            "and cut by max_samples), or pass train_loader= with the training split."
        )


def fit_probe(
    task: str,
    held: LabelledSplit,
    train: LabelledSplit | None,
    folds: int,
    seed: int,
    *,
    train_name: str = "train_loader",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The probe's output on the held-out samples (label distributions (N, C), or predicted
    targets (N, k)) and what to report about it.

    Fitted on ``train`` (its L2 strength chosen by ``folds``-fold cross-validation there) when
    given, else cross-fitted on ``held`` itself (each fold's output from a probe fitted on the
    other folds). ``train_name`` names the training samples in the report and in errors.
    """
    phi, z, y = probe_arrays(held, task)
    kind = (
        f"logistic regression on the base logits + I(x) ({phi.shape[1]} features and "
        f"{RANDOM_FEATURES} random Fourier features of them)"
        if task == "classification"
        else f"ridge regression of the base's residual on I(x) ({phi.shape[1]} features and "
        f"{RANDOM_FEATURES} random Fourier features of them)"
    )
    if train is None:
        _check_fittable(task, y, folds, "held-out")
        out, l2 = _crossfit(task, phi, z, y, folds, seed)
        source = f"cross-fitted ({folds} folds) on the held-out samples themselves"
        ref = (y, out)
    else:
        tphi, tz, ty = probe_arrays(train, task)
        _check_fittable(task, ty, folds, train_name)
        train_oof, l2 = _crossfit(task, tphi, tz, ty, folds, seed)
        ref = (ty, train_oof)
        fit = _fit_logistic if task == "classification" else _fit_ridge
        out = _base_prediction(task, z) if l2 == math.inf else fit(tphi, tz, ty, l2)[0](phi, z)
        source = f"fitted on {train_name}'s conditioning ({ty.shape[0]:,} samples)"
    if l2 == math.inf:
        source += "; no fitted probe predicted the labels better than the base, so it is the base"
    info = {"kind": kind, "source": source, "l2": None if l2 == math.inf else l2, "folds": folds}
    if task == "regression":  # out-of-fold residual spread, for the regression mixture
        info["residual_std"] = ((ref[0] - ref[1]) ** 2).mean(0).sqrt()  # a tensor until reported
    return out, info


def probe_quality(task: str, out: torch.Tensor, held: LabelledSplit) -> tuple[float, float | None]:
    """The probe's own loss (cross-entropy of q, or MSE) and accuracy against the true labels."""
    if task == "classification":
        y = held.target.long()
        return float(_probe_loss(task, out, y).mean()), float((out.argmax(-1) == y).float().mean())
    y = held.target.reshape(out.shape[0], -1).float()
    return float(_probe_loss(task, out.reshape(y.shape), y).mean()), None


def user_probe(probe: ProbeFn, held: LabelledSplit, task: str) -> torch.Tensor:
    """A caller's ``probe(cond, base_prediction)`` on the held-out samples, checked."""
    N = held.pred.shape[0]
    out = probe(held.cond, held.pred)
    if not isinstance(out, torch.Tensor) or out.shape[0] != N:
        raise ProbeFitError(
            f"probe(cond, base_prediction) must return a tensor with one row per held-out sample "
            f"({N}); got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}."
        )
    out = out.detach().float().reshape(N, -1).to(held.pred.device)
    if task == "classification":
        ok = out.shape[1] == held.pred.shape[1] and bool((out >= 0).all())
        if not ok or not torch.allclose(out.sum(1), torch.ones(N, device=out.device), atol=1e-3):
            raise ProbeFitError(
                f"For classification probe(...) must return label distributions (N, "
                f"{held.pred.shape[1]}) with non-negative rows summing to 1 (e.g. logits.softmax(-1))."
            )
    return out


# --- the probe as a target to overfit towards ------------------------------------------------------


def probe_step(
    held: LabelledSplit,
    train: LabelledSplit | None,
    task: str,
    *,
    probe: ProbeFn | None = None,
    folds: int = 5,
    seed: int = 0,
    mixture: int = 0,
    train_name: str = "train_loader",
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """The probe's output on ``held`` (a caller's ``probe``, or one fitted on ``train`` or
    cross-fitted on ``held``), what to report about it, and for regression the probe's residual
    spread per output (the regression mixture's sigma)."""
    if probe is not None:
        probe_out, info = user_probe(probe, held, task), {"kind": "user-supplied probe="}
        info["source"] = "given by the caller"
    else:
        probe_out, info = fit_probe(task, held, train, folds, seed, train_name=train_name)
    info["loss"], info["accuracy"] = probe_quality(task, probe_out, held)
    if task == "classification":
        info["mixture_classes"] = mixture
        return probe_out, info, None
    # the probe's residual spread: out of fold, or (a given probe) on the held-out
    if "residual_std" not in info:
        _, _, y = probe_arrays(held, task)
        info["residual_std"] = ((y - probe_out) ** 2).mean(0).sqrt()
    sigma = torch.as_tensor(info.pop("residual_std")).float()
    if sigma.numel() <= RESIDUAL_LIST_MAX:
        info["residual_std"] = sigma.tolist()
    else:  # a wide output (a waveform, an image): a summary, not one value per element
        info["residual_std_summary"] = {
            "outputs": sigma.numel(),
            "mean": float(sigma.mean()),
            "min": float(sigma.min()),
            "max": float(sigma.max()),
        }
    info["mixture_points"] = REGRESSION_POINTS if mixture > 0 else 0
    return probe_out, info, sigma


def label_mixture(model, inputs, loss_fn, q: torch.Tensor, k: int) -> torch.Tensor:
    """sum_y q(y) delta_y over each sample's k most likely labels (renormalised)."""
    qk, labels = q.topk(min(k, q.shape[1]), dim=1)
    qk = qk / qk.sum(1, keepdim=True).clamp_min(1e-12)
    mix = None
    for j in range(qk.shape[1]):
        d = overfit_batch(model, inputs, labels[:, j], loss_fn, loss_after=False).delta
        w = qk[:, j].view(-1, *([1] * (d.dim() - 1)))
        mix = d.mul_(w) if mix is None else mix.add_(d.mul_(w))
    return mix


REGRESSION_POINTS = 8  # quantile points of the regression probe_mixture
# a report lists the probe's residual spread per output up to this many outputs, else a summary
RESIDUAL_LIST_MAX = 64


def gaussian_mixture(model, inputs, target, loss_fn, mean, sigma, k: int) -> torch.Tensor:
    """E over y ~ N(mean, sigma²) of delta_y, averaged over ``k`` equally likely quantiles of y.

    The regression analogue of the label mixture: where the probe is unsure (sigma large next to
    |mean - base|) the deltas towards targets on either side of the base cancel, so the mixed
    step is small, as a generator trained with MSE on the deltas would make it. Quantile points,
    not Gauss-Hermite: Adam's delta is close to a step function of the target (its sign), which
    a few Gauss-Hermite points (one of them with half the weight at the mean) average badly.
    """
    nodes = torch.special.ndtri((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    mix = None
    for t, w in zip(nodes.tolist(), [1.0 / k] * k):
        y = (mean + t * sigma.to(mean)).reshape(target.shape).to(target.dtype)  # (B, ...)
        d = overfit_batch(model, inputs, y, loss_fn, loss_after=False).delta.mul_(w)
        mix = d if mix is None else mix.add_(d)
    return mix
