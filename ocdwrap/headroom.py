"""``headroom()``: can OCD help this model? An answer before any collection or fit.

OCD learns to predict, from the input alone, the weight change that overfitting one layer on the
sample's *label* gives. On a labelled held-out split this module measures, with the model's own
per-sample overfit (optimizer, learning rate, steps, layer), what such a label-free generator can
hope for:

* ``base``: the base model;
* ``overfit_on_test``: the layer overfitted towards the true label (the upper bound OCD aims at);
* ``own_label``: towards the base's own prediction (self-training; needs no label). For
  classification the label is the base's argmax. For regression the target is the base's own
  prediction, where the loss (MSE, L1, ...) is at its minimum: the gradient is zero, the delta is
  zero and the row equals the base, so it is reported without being computed;
* ``probe``: towards the label distribution q of a probe fitted on the conditioning
  I(x) = (layer input, layer output, model output), the very information OCD's generator sees.
  Classification: a multinomial logistic regression whose logits are the base's logits plus a
  linear function of the standardised I(x), the layer overfitted with the soft cross-entropy
  towards q. Regression: a ridge regression of the base's residual on I(x), the layer overfitted
  with ``loss_fn`` towards its prediction. The L2 strength is chosen by cross-validated loss among
  a small grid and "infinite", i.e. the base's own prediction: when no fitted probe predicts the
  labels better than the base, the probe is the base and its row equals the base row. The probe
  is fitted on ``train_loader``'s conditioning when given, otherwise cross-fitted (k folds) on the
  held-out samples themselves; the report says which;
* ``probe_mixture``: sum over labels y of q(y) times the delta for label y (regression: the
  expectation over y ~ N(probe's prediction, its out-of-fold residual spread), eight
  quantile points); the delta a generator trained with MSE on the deltas would aim at
  (one overfit per label, over the ``mixture_classes`` most likely labels, renormalised).
  Adam's steps are not linear in the gradient, so this differs from overfitting towards q, and it
  can move the weights even where q is the base's own softmax. Both rows are always reported:
  the table keeps one shape for every model, and which of the two is better is itself worth
  seeing; the verdict uses the best label-free row.

Why the base's own softmax is no oracle: the gradient of the cross-entropy towards a soft target q
with respect to the logits is p - q, p the model's softmax. Overfitting towards the base's own
soft prediction (q = p) has zero gradient and changes nothing. So all the room a label-free
generator has comes from predicting the label *better* than the base does from the same
information, which is what the probe measures: on a converged, calibrated base it finds little,
on an underfitting or miscalibrated base a lot (docs/headroom.md: a digits MLP, 93 % of the gap
after one epoch of training, 0 % after forty).

Also reported: the cosine between each label-free row's delta and the true-label delta, split by
samples the base gets right and wrong (regression: per-sample base loss at most / above the
median), and the share of the base -> upper-bound gap each row captures. docs/headroom.md
explains how to read the report.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batches import (
    batch_size,
    call_model,
    index_batch,
    per_sample_loss,
    read_output,
    split_batch,
    to_device,
)
from .capture import Conditioning
from .deltas import FullDelta
from .errors import (
    BatchFormatError,
    EmptyDataError,
    LabelMismatchError,
    NonFiniteError,
    NotWrappedError,
    OCDError,
    ProbeFitError,
)
from .model import OCDModel
from .overfit import overfit_batch

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
ProbeFn = Callable[[Conditioning, torch.Tensor], torch.Tensor]

__all__ = [
    "HeadroomReport",
    "HeadroomRow",
    "LabelMismatchError",
    "NotWrappedError",
    "ProbeFitError",
    "headroom",
    "soft_cross_entropy",
]

ROWS = ("base", "overfit_on_test", "own_label", "probe", "probe_mixture")
LABEL_FREE = ("own_label", "probe", "probe_mixture")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --- the report ------------------------------------------------------------------------------------


@dataclass
class HeadroomRow:
    """One row: mean loss (true labels), accuracy, share of the gap, cosine with the true delta."""

    name: str
    loss: float
    accuracy: float | None = None
    share_loss: float | None = None  # % of (base loss - bound loss) this row removes
    share_accuracy: float | None = None
    cosine: float | None = None  # mean cosine between this row's delta and the true-label delta
    cosine_base_correct: float | None = None
    cosine_base_wrong: float | None = None
    note: str = ""


@dataclass
class HeadroomReport:
    """What :func:`headroom` measured. ``print(report)`` shows a table; ``to_dict()`` numbers."""

    task: str
    n: int
    layer: str
    overfit: dict[str, Any]
    probe: dict[str, Any]
    split: str
    n_base_correct: int
    n_base_wrong: int
    rows: list[HeadroomRow] = field(default_factory=list)
    ceiling: float | None = None  # the best label-free share of the loss gap, in %
    verdict: str = ""
    seconds: float = 0.0

    def row(self, name: str) -> HeadroomRow:
        """The row called ``name`` (one of base, overfit_on_test, own_label, probe, probe_mixture)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"No row {name!r}; rows: {[r.name for r in self.rows]}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings (JSON-ready); :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["rows"] = {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in d["rows"]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadroomReport:
        d = dict(d)
        rows = [HeadroomRow(name=k, **v) for k, v in d.pop("rows").items()]
        return cls(**d, rows=rows)

    def __str__(self) -> str:
        o = self.overfit
        lines = [
            f"headroom of layer {self.layer} ({o['optimizer']} lr {o['lr']:g} x {o['steps']}) "
            f"on {self.n:,} held-out samples ({self.task})",
            "",
            "| row | loss | acc % | share of gap (loss) | share of gap (acc) | cos | cos, base "
            "right | cos, base wrong |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]

        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        for r in self.rows:
            acc = None if r.accuracy is None else 100 * r.accuracy
            lines.append(
                f"| {r.name} | {r.loss:.4f} | {f(acc, '.2f')} | {f(r.share_loss, '.1f')} | "
                f"{f(r.share_accuracy, '.1f')} | {f(r.cosine, '.2f')} | "
                f"{f(r.cosine_base_correct, '.2f')} | {f(r.cosine_base_wrong, '.2f')} |"
            )
        lines.append("")
        lines += [f"{r.name}: {r.note}" for r in self.rows if r.note]
        p = self.probe
        own = f"its own loss {p['loss']:.4f}" + (
            f", accuracy {100 * p['accuracy']:.2f} %" if p.get("accuracy") is not None else ""
        )
        lines.append(f"probe: {p['kind']}, {p['source']}; {own}")
        lines.append(
            f"right / wrong: {self.split} ({self.n_base_correct:,} / {self.n_base_wrong:,})"
        )
        lines.append(f"verdict: {self.verdict}")
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)


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


# --- reading the data: one base pass per batch -----------------------------------------------------


@dataclass
class _Split:
    """The base pass over a loader: batches, conditioning features, base predictions, targets."""

    batches: list[tuple[Any, Any]]
    cond: Conditioning
    pred: torch.Tensor  # (N, ...) base prediction
    target: torch.Tensor  # (N, ...) labels
    loss: torch.Tensor  # (N,) base per-sample loss

    @property
    def features(self) -> torch.Tensor:
        return torch.cat([self.cond.layer_input, self.cond.layer_output, self.cond.model_output], 1)


def _sample_losses(loss_fn: LossFn, pred: torch.Tensor, target: Any, n: int) -> torch.Tensor:
    losses = per_sample_loss(loss_fn, pred, target, n)
    if losses.dim() == 0:  # a summed loss: one call per sample
        losses = torch.stack(
            [
                per_sample_loss(loss_fn, pred[i : i + 1], index_batch(target, slice(i, i + 1)), 1)
                for i in range(n)
            ]
        ).reshape(n)
    return losses.detach().float()


def _check_labels(pred: torch.Tensor, target: Any, task: str, loss_fn: LossFn, role: str) -> None:
    """Raise :class:`LabelMismatchError` when ``target`` cannot be this task's labels."""
    if not isinstance(target, torch.Tensor):
        raise LabelMismatchError(
            f"The {role} loader's labels are a {type(target).__name__}, not a tensor; yield "
            "(inputs, target) with a target tensor (class indices or regression targets)."
        )
    if task != "classification":
        return
    C = pred.shape[-1]
    if target.is_floating_point() or target.shape != pred.shape[:1]:
        raise LabelMismatchError(
            f"task='classification' needs one integer class index per sample, shape ({pred.shape[0]},); "
            f"the {role} loader's labels are {target.dtype} of shape {tuple(target.shape)}. Yield "
            "class indices (e.g. y.long()), or pass task='regression' for real-valued targets."
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= C):
        raise LabelMismatchError(
            f"The {role} loader has labels in [{int(target.min())}, {int(target.max())}] but the "
            f"model predicts {C} classes (labels 0..{C - 1}). Map the labels to 0..{C - 1} or use a "
            "model head with as many outputs as classes."
        )


def _base_pass(model: OCDModel, inputs: Any, target: Any, loss_fn: LossFn, task: str, role: str):
    with torch.no_grad():
        kwargs = inputs if isinstance(inputs, Mapping) else {}
        cond, out = model._conditioning(
            (inputs,), kwargs, lambda: call_model(model.base_model, inputs)
        )
        pred = read_output(out).detach().float()
    if task == "auto":
        is_cls = pred.dim() == 2 and pred.shape[1] > 1 and pred.is_floating_point()
        is_cls = is_cls and isinstance(target, torch.Tensor) and not target.is_floating_point()
        task = "classification" if is_cls else "regression"
    _check_labels(pred, target, task, loss_fn, role)
    try:
        with torch.no_grad():
            losses = _sample_losses(loss_fn, pred, target, pred.shape[0])
    except OCDError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        raise LabelMismatchError(
            f"loss_fn could not score the {role} loader's labels ({target.dtype}, shape "
            f"{tuple(target.shape)}) against predictions of shape {tuple(pred.shape)}: {e}. Yield "
            "the labels this loss expects (class indices for cross-entropy, float targets shaped "
            "like the prediction for MSE), or pass the loss that fits your labels."
        ) from e
    return cond, pred, losses, task


def _read(model, loader, loss_fn, max_samples, task, role) -> tuple[_Split, str]:
    batches, conds, preds, targets, losses = [], [], [], [], []
    n = 0
    for batch in loader:
        if max_samples is not None and n >= max_samples:
            break  # max_samples <= 0
        try:
            inputs, target = split_batch(batch)
        except BatchFormatError as e:
            raise BatchFormatError(
                f"headroom needs a labelled {role} loader (the upper bound and the probe use the "
                f"labels): {e}"
            ) from e
        inputs, target = to_device(inputs, model.device), to_device(target, model.device)
        B = batch_size(inputs)
        if max_samples is not None and n + B > max_samples:
            keep = slice(0, max_samples - n)
            inputs, target, B = index_batch(inputs, keep), index_batch(target, keep), keep.stop
        if B == 0:
            continue
        cond, pred, loss, task = _base_pass(model, inputs, target, loss_fn, task, role)
        batches.append((inputs, target))
        conds.append(cond)
        preds.append(pred)
        targets.append(target.detach())
        losses.append(loss)
        n += B
        if max_samples is not None and n >= max_samples:
            break
    if not batches:
        raise EmptyDataError(f"headroom got a {role} loader that yielded no samples.")
    cond = Conditioning(
        *(
            torch.cat([getattr(c, k) for c in conds])
            for k in ("layer_input", "layer_output", "model_output")
        )
    )
    split = _Split(batches, cond, torch.cat(preds), torch.cat(targets), torch.cat(losses))
    return split, task


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


def _fit_logistic(phi: torch.Tensor, z: torch.Tensor, y: torch.Tensor, l2: float, init=None):
    """Logits z + standardised(phi) W + b, W with an L2 penalty, fitted by L-BFGS.

    Returns the predictor (phi, z) -> label distribution and (W, b), a warm start for the next
    strength (the cross-fit goes from strong to weak penalties, each a few L-BFGS steps on).
    """
    scale = _standardizer(phi)
    x = _lift(scale(phi))
    if init is None:
        init = (x.new_zeros(x.shape[1], z.shape[1]), x.new_zeros(z.shape[1]))
    W, b = (t.clone().requires_grad_(True) for t in init)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=50,
        history_size=20,
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z + x @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
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


def _probe_arrays(split: _Split, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _fit_probe(task, held: _Split, train: _Split | None, folds: int, seed: int):
    """The probe's output on the held-out samples, and what to report about it."""
    phi, z, y = _probe_arrays(held, task)
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
        tphi, tz, ty = _probe_arrays(train, task)
        _check_fittable(task, ty, folds, "train_loader")
        train_oof, l2 = _crossfit(task, tphi, tz, ty, folds, seed)
        ref = (ty, train_oof)
        fit = _fit_logistic if task == "classification" else _fit_ridge
        out = _base_prediction(task, z) if l2 == math.inf else fit(tphi, tz, ty, l2)[0](phi, z)
        source = f"fitted on train_loader's conditioning ({ty.shape[0]:,} samples)"
    if l2 == math.inf:
        source += "; no fitted probe predicted the labels better than the base, so it is the base"
    info = {"kind": kind, "source": source, "l2": None if l2 == math.inf else l2, "folds": folds}
    if task == "regression":  # out-of-fold residual spread, for the regression mixture
        info["residual_std"] = ((ref[0] - ref[1]) ** 2).mean(0).sqrt()  # a tensor until reported
    return out, info


def _probe_quality(task: str, out: torch.Tensor, held: _Split) -> tuple[float, float | None]:
    """The probe's own loss (cross-entropy of q, or MSE) and accuracy against the true labels."""
    if task == "classification":
        y = held.target.long()
        return float(_probe_loss(task, out, y).mean()), float((out.argmax(-1) == y).float().mean())
    y = held.target.reshape(out.shape[0], -1).float()
    return float(_probe_loss(task, out.reshape(y.shape), y).mean()), None


def _user_probe(probe: ProbeFn, held: _Split, task: str) -> torch.Tensor:
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


# --- the rows: every sample of a batch overfitted towards each target --------------------------------


def _mixture(model, inputs, loss_fn, q: torch.Tensor, k: int) -> torch.Tensor:
    """sum_y q(y) delta_y over each sample's k most likely labels (renormalised)."""
    qk, labels = q.topk(min(k, q.shape[1]), dim=1)
    qk = qk / qk.sum(1, keepdim=True).clamp_min(1e-12)
    mix = None
    for j in range(qk.shape[1]):
        d = overfit_batch(model, inputs, labels[:, j], loss_fn).delta
        w = qk[:, j].view(-1, *([1] * (d.dim() - 1)))
        mix = d.mul_(w) if mix is None else mix.add_(d.mul_(w))
    return mix


REGRESSION_POINTS = 8  # quantile points of the regression probe_mixture
# a report lists the probe's residual spread per output up to this many outputs, else a summary
RESIDUAL_LIST_MAX = 64


def _gaussian_mixture(model, inputs, target, loss_fn, mean, sigma, k: int) -> torch.Tensor:
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
        d = overfit_batch(model, inputs, y, loss_fn).delta.mul_(w)
        mix = d if mix is None else mix.add_(d)
    return mix


def _row_deltas(model, inputs, target, loss_fn, task, base_pred, probe_out, mix_k, sigma=None):
    """The true-label delta and each label-free row's delta for one batch."""
    true = overfit_batch(model, inputs, target, loss_fn)
    if not bool(true.finite.all()):
        bad = (~true.finite).nonzero().flatten().tolist()[:10]
        raise NonFiniteError(
            f"NaN/Inf in the overfit of samples {bad} (batch positions); fix the data, or lower "
            "the model's overfit_lr."
        )
    deltas = {"overfit_on_test": true.delta}
    if task == "classification":
        own = base_pred.argmax(-1)
        deltas["own_label"] = overfit_batch(model, inputs, own, loss_fn).delta
        deltas["probe"] = overfit_batch(model, inputs, probe_out, soft_cross_entropy).delta
        if mix_k > 0:
            deltas["probe_mixture"] = _mixture(model, inputs, loss_fn, probe_out, mix_k)
    else:
        yhat = probe_out.reshape(target.shape).to(target.dtype)
        deltas["probe"] = overfit_batch(model, inputs, yhat, loss_fn).delta
        if mix_k > 0 and sigma is not None:
            deltas["probe_mixture"] = _gaussian_mixture(
                model, inputs, target, loss_fn, probe_out, sigma, mix_k
            )
    return deltas


def _score_batch(model, inputs, target, loss_fn, task, base_pred, probe_out, mix_k, sigma=None):
    """Per-sample loss, correctness and cosine with the true delta, for every row's delta."""
    deltas = _row_deltas(model, inputs, target, loss_fn, task, base_pred, probe_out, mix_k, sigma)
    B = base_pred.shape[0]
    true = deltas["overfit_on_test"].reshape(B, -1)
    out = {}
    for name, delta in deltas.items():
        with torch.no_grad(), model.use_deltas(FullDelta(delta)):
            pred = read_output(call_model(model, inputs)).float()
            losses = _sample_losses(loss_fn, pred, target, B)
        cos = F.cosine_similarity(delta.reshape(B, -1), true, dim=1, eps=1e-30)
        correct = pred.argmax(-1) == target if task == "classification" else None
        out[name] = {"loss": losses, "cos": cos, "correct": correct}
    return out


def _share(base: float | None, bound: float | None, row: float | None, sign: int) -> float | None:
    if base is None or bound is None or row is None:
        return None
    gap = sign * (base - bound)
    if not gap > 1e-12 * max(1.0, abs(base)):
        return None
    return 100.0 * sign * (base - row) / gap + 0.0  # + 0.0: no -0.0


_NOTES = {
    "probe_mixture": "the probe's expected delta: sum over labels y of q(y) x the delta for y "
    "(regression: over y ~ N(probe, its residual spread), 8 quantiles)",
}


def _rows(held: _Split, task: str, scored: dict[str, dict], right: torch.Tensor):
    """The report's rows from the per-sample numbers."""
    acc = (lambda c: float(c.float().mean())) if task == "classification" else (lambda c: None)
    base_correct = held.pred.argmax(-1) == held.target if task == "classification" else None
    base = HeadroomRow("base", float(held.loss.mean()), acc(base_correct))
    bound_scores = scored["overfit_on_test"]
    bound = HeadroomRow(
        "overfit_on_test", float(bound_scores["loss"].mean()), acc(bound_scores["correct"])
    )
    rows = [base]
    for name in ROWS[1:]:
        if name == "own_label" and task != "classification":
            rows.append(
                HeadroomRow(
                    name,
                    base.loss,
                    share_loss=0.0,
                    note="= base: the base's own prediction as the target has zero gradient "
                    "(the loss is at its minimum), so the delta is zero",
                )
            )
            continue
        if name not in scored:
            continue
        s = scored[name]
        cos = s["cos"]
        row = bound if name == "overfit_on_test" else HeadroomRow(name, float(s["loss"].mean()))
        row.note = _NOTES.get(name, "")
        row.accuracy = acc(s["correct"])
        row.share_loss = _share(base.loss, bound.loss, row.loss, 1)
        row.share_accuracy = _share(base.accuracy, bound.accuracy, row.accuracy, -1)
        row.cosine = float(cos.mean())
        row.cosine_base_correct = float(cos[right].mean()) if bool(right.any()) else None
        row.cosine_base_wrong = float(cos[~right].mean()) if bool((~right).any()) else None
        rows.append(row)
    return rows


def _verdict(rows: list[HeadroomRow]) -> tuple[float | None, str]:
    base, bound = rows[0], rows[1]
    if base.loss - bound.loss <= 1e-12 * max(1.0, abs(base.loss)):
        return None, (
            f"overfitting this layer on the true labels does not lower the loss on these samples "
            f"(base {base.loss:.4g}, bound {bound.loss:.4g}): there is no gain for OCD to capture. "
            "Try a larger overfit_lr or overfit_steps, or another layer."
        )
    free = [r for r in rows if r.name in LABEL_FREE and r.share_loss is not None]
    best = max(free, key=lambda r: r.share_loss)
    ceiling = min(100.0, max(0.0, best.share_loss))
    return ceiling, (
        f"a label-free generator can be expected to capture at most about {ceiling:.0f} % of the "
        f"attainable gain on this model and layer (loss {base.loss:.4g} -> {bound.loss:.4g} with "
        f"the true label; best label-free row: {best.name}, {best.share_loss:.1f} %)"
    )


# --- the entry point -------------------------------------------------------------------------------


def _require_wrapped(model: Any) -> OCDModel:
    if isinstance(model, OCDModel):
        return model
    raise NotWrappedError(
        f"headroom needs a wrapped model (an ocdwrap.OCDModel), got a {type(model).__name__}: the "
        "report overfits the target layer the wrapper names, with its config. Wrap it first: "
        "model = ocdwrap.wrap(base, layer='fc2', config=ocdwrap.OCDConfig(...)) "
        "(or layer='auto' with calibration=loader, loss_fn=loss)."
    )


def headroom(
    model: OCDModel,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    max_samples: int | None = None,
    train_loader: Iterable | None = None,
    max_train_samples: int | None = None,
    task: str = "auto",
    probe: ProbeFn | None = None,
    folds: int = 5,
    mixture_classes: int = 10,
    seed: int = 0,
) -> HeadroomReport:
    """Can OCD help this model? Base, upper bound and label-free rows on a labelled held-out split.

    Needs no collection and no fit: every sample of ``loader`` is overfitted (vectorized, as in
    ``collect``) with the model's configured per-sample overfit towards the true label, the base's
    own label and a probe's predicted label distribution. See the module docstring for the rows
    and docs/headroom.md for how to read them.

    Args:
        model: a wrapped model (:func:`ocdwrap.wrap`); its ``config`` gives the overfit.
        loader: the labelled held-out split, batches as everywhere in ocdwrap. The samples used are
            held in memory (the probe needs all of them before the overfits).
        loss_fn: per-sample loss (B,) or its sum, the loss the base was trained with.
        max_samples, max_train_samples: use at most this many held-out / training samples.
        train_loader: fit the probe on the training split's conditioning; without it the probe is
            cross-fitted (``folds`` folds) on the held-out samples.
        task: 'classification', 'regression' or 'auto' (classification for (B, C) outputs with
            integer labels).
        probe: replaces the fitted probe: ``probe(cond, base_prediction)`` on all held-out samples
            returns label distributions (N, C) for classification, predicted targets otherwise.
        mixture_classes: the probe_mixture row mixes the deltas of each sample's this many most
            likely labels (one overfit each); 0 skips the row.

    Example:
        >>> report = ocdwrap.headroom(model, val_loader, nn.CrossEntropyLoss(reduction="none"))
        >>> print(report)            # the table and the verdict
        >>> report.to_dict()["ceiling"]
        3.1
    """
    model = _require_wrapped(model)
    if task not in ("auto", "classification", "regression"):
        raise ValueError(f"task={task!r}; choose 'auto', 'classification' or 'regression'.")
    start = time.perf_counter()
    was_training = model.base_model.training
    model.base_model.eval()
    try:
        held, task = _read(model, loader, loss_fn, max_samples, task, "held-out")
        train = None
        if train_loader is not None and probe is None:
            train, _ = _read(model, train_loader, loss_fn, max_train_samples, task, "train_loader")
        if probe is not None:
            probe_out, info = _user_probe(probe, held, task), {"kind": "user-supplied probe="}
            info["source"] = "given by the caller"
        else:
            probe_out, info = _fit_probe(task, held, train, folds, seed)
        info["loss"], info["accuracy"] = _probe_quality(task, probe_out, held)
        sigma = None
        if task == "classification":
            info["mixture_classes"] = mixture_classes
        else:  # the probe's residual spread: out of fold, or (a given probe) on the held-out
            if "residual_std" not in info:
                _, _, y = _probe_arrays(held, task)
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
            info["mixture_points"] = REGRESSION_POINTS if mixture_classes > 0 else 0
        mix_k = info.get("mixture_classes", info.get("mixture_points", 0))
        scored = _score_all(model, held, loss_fn, task, probe_out, mix_k, sigma)
    finally:
        model.base_model.train(was_training)
    report = _report(model, held, task, info, scored, time.perf_counter() - start)
    model.headroom_report = report  # the model card reports it
    return report


def _score_all(model, held: _Split, loss_fn, task, probe_out, mix_k, sigma=None) -> dict:
    """:func:`_score_batch` over every held-out batch, concatenated per row."""
    parts: dict[str, dict[str, list]] = {}
    lo = 0
    for inputs, target in held.batches:
        B = batch_size(inputs)
        sl = slice(lo, lo + B)
        res = _score_batch(
            model, inputs, target, loss_fn, task, held.pred[sl], probe_out[sl], mix_k, sigma
        )
        for name, d in res.items():
            for k, v in d.items():
                parts.setdefault(name, {}).setdefault(k, []).append(v)
        lo += B
    return {
        name: {k: (torch.cat(v) if v[0] is not None else None) for k, v in d.items()}
        for name, d in parts.items()
    }


def _report(model: OCDModel, held: _Split, task: str, info: dict, scored: dict, seconds: float):
    if task == "classification":
        right = held.pred.argmax(-1) == held.target
        split = "base argmax correct / wrong"
    else:
        right = held.loss <= held.loss.median()
        split = "base per-sample loss at most / above its median"
    rows = _rows(held, task, scored, right)
    ceiling, verdict = _verdict(rows)
    cfg = model.config
    return HeadroomReport(
        task=task,
        n=int(held.loss.shape[0]),
        layer=model.layer_name,
        overfit={
            "optimizer": cfg.overfit_optimizer,
            "lr": cfg.overfit_lr,
            "steps": cfg.overfit_steps,
        },
        probe=info,
        split=split,
        n_base_correct=int(right.sum()),
        n_base_wrong=int((~right).sum()),
        rows=rows,
        ceiling=ceiling,
        verdict=verdict,
        seconds=seconds,
    )
