"""``headroom()``: can OCD help this model? An answer before any collection or fit.

OCD learns to predict, from the input alone, the weight change that overfitting one layer on the
sample's *label* gives. On a labelled held-out split this module measures, with the model's own
per-sample overfit (optimizer, learning rate, steps, layer), what such a label-free generator can
hope for:

* ``base``: the base model;
* ``overfit``: the layer overfitted towards the true label (the upper bound OCD aims at);
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
on an underfitting or miscalibrated base a lot (docs/headroom.md: a digits MLP, about 95 % of the
gap after one epoch of training, 0-54 % of a far smaller gap after forty, three seeds).

Also reported: the cosine between each label-free row's delta and the true-label delta, split by
samples the base gets right and wrong (regression: per-sample base loss at most / above the
median), and the share of the base -> upper-bound gap each row captures. docs/headroom.md
explains how to read the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batches import batch_size, call_model, read_output, sample_losses
from .capture import Conditioning
from .deltas import FullDelta
from .ensemble import scored_prediction
from .errors import LabelMismatchError, NonFiniteError, NotWrappedError, ProbeFitError
from .evaluation import LabelledSplit, read_labelled
from .model import OCDModel
from .overfit import overfit_batch
from .probe import gaussian_mixture, label_mixture, probe_step, soft_cross_entropy

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

ROWS = ("base", "overfit", "own_label", "probe", "probe_mixture")
# row names of 0.2.0 and before, read (row(), from_dict) as today's: one set across headroom,
# compare, the quickstart and the benchmarks' JSONs
LEGACY_ROWS = {"overfit_on_test": "overfit"}
LABEL_FREE = ("own_label", "probe", "probe_mixture")
LABEL_ROWS = ROWS[1:]  # the rows that overfit the layer on each held-out sample


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
        """The row called ``name`` (one of base, overfit, own_label, probe, probe_mixture)."""
        name = LEGACY_ROWS.get(name, name)
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
        rows = [HeadroomRow(name=LEGACY_ROWS.get(k, k), **v) for k, v in d.pop("rows").items()]
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


# --- the rows: every sample of a batch overfitted towards each target --------------------------------


def _row_deltas(model, inputs, target, loss_fn, task, base_pred, probe_out, rows, mix_k, sigma):
    """The true-label delta and each asked-for label-free row's delta for one batch, and the
    seconds each took."""
    seconds: dict[str, float] = {}

    def timed(name: str, make: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = make()
        seconds[name] = time.perf_counter() - start
        return out

    true = timed(
        "overfit",
        lambda: overfit_batch(model, inputs, target, loss_fn, loss_after=False),
    )
    if not bool(true.finite.all()):
        bad = (~true.finite).nonzero().flatten().tolist()[:10]
        raise NonFiniteError(
            f"NaN/Inf in the overfit of samples {bad} (batch positions); fix the data, or lower "
            "the model's overfit_lr."
        )
    deltas = {"overfit": true.delta}
    make: dict[str, Callable[[], torch.Tensor]] = {}
    if task == "classification":
        own = base_pred.argmax(-1)
        make["own_label"] = lambda: (
            overfit_batch(model, inputs, own, loss_fn, loss_after=False).delta
        )
        make["probe"] = lambda: (
            overfit_batch(model, inputs, probe_out, soft_cross_entropy, loss_after=False).delta
        )
        if mix_k > 0:
            make["probe_mixture"] = lambda: label_mixture(model, inputs, loss_fn, probe_out, mix_k)
    else:
        if probe_out is not None:
            yhat = probe_out.reshape(target.shape).to(target.dtype)
            make["probe"] = lambda: (
                overfit_batch(model, inputs, yhat, loss_fn, loss_after=False).delta
            )
        if mix_k > 0 and sigma is not None:
            make["probe_mixture"] = lambda: gaussian_mixture(
                model, inputs, target, loss_fn, probe_out, sigma, mix_k
            )
    for name, fn in make.items():
        if name in rows:
            deltas[name] = timed(name, fn)
    return deltas, seconds


def _score_batch(model, inputs, target, loss_fn, task, base_pred, probe_out, rows, mix_k, sigma):
    """Per-sample loss, prediction, correctness and cosine with the true delta, and the seconds
    spent, for every row's delta."""
    deltas, seconds = _row_deltas(
        model, inputs, target, loss_fn, task, base_pred, probe_out, rows, mix_k, sigma
    )
    B = base_pred.shape[0]
    true = deltas["overfit"].reshape(B, -1)
    out = {}
    for name, delta in deltas.items():
        start = time.perf_counter()
        with torch.no_grad(), model.use_deltas(FullDelta(delta)):
            pred = read_output(call_model(model, inputs)).float()
        seconds[name] += time.perf_counter() - start
        losses = sample_losses(loss_fn, scored_prediction(pred, task), target, B).detach()
        cos = F.cosine_similarity(delta.reshape(B, -1), true, dim=1, eps=1e-30)
        correct = pred.argmax(-1) == target if task == "classification" else None
        out[name] = {"loss": losses, "cos": cos, "correct": correct, "pred": pred}
        out[name]["seconds"] = torch.tensor([seconds[name]], dtype=torch.float64)
    return out


def score_label_rows(
    model: OCDModel,
    held: LabelledSplit,
    loss_fn: LossFn,
    task: str,
    probe_out: torch.Tensor | None,
    *,
    rows: Iterable[str] = LABEL_ROWS,
    mix_k: int = 0,
    sigma: torch.Tensor | None = None,
) -> dict[str, dict[str, Any]]:
    """Every held-out sample's layer overfitted alone towards each row's target, then scored.

    ``rows``: any of own_label, probe, probe_mixture (overfit, the true label, is
    always computed: the others are compared with it). Returns, per row, the per-sample
    ``loss`` (N,), ``pred`` (N, ...), ``correct`` (N,) (classification, else None), ``cos``
    (N,), the cosine of the row's delta with the true-label delta, and ``seconds`` (overfits
    and prediction passes). The one implementation of these rows, for ``headroom`` and
    ``ocdwrap.compare``.
    """
    rows = set(rows)
    parts: dict[str, dict[str, list]] = {}
    lo = 0
    for inputs, target in held.batches:
        B = batch_size(inputs)
        sl = slice(lo, lo + B)
        q = None if probe_out is None else probe_out[sl]
        res = _score_batch(
            model, inputs, target, loss_fn, task, held.pred[sl], q, rows, mix_k, sigma
        )
        for name, d in res.items():
            for k, v in d.items():
                parts.setdefault(name, {}).setdefault(k, []).append(v)
        lo += B
    out = {
        name: {k: (torch.cat(v) if v[0] is not None else None) for k, v in d.items()}
        for name, d in parts.items()
    }
    for d in out.values():
        d["seconds"] = float(d["seconds"].sum())
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


def _rows(held: LabelledSplit, task: str, scored: dict[str, dict], right: torch.Tensor):
    """The report's rows from the per-sample numbers."""
    acc = (lambda c: float(c.float().mean())) if task == "classification" else (lambda c: None)
    base_correct = held.pred.argmax(-1) == held.target if task == "classification" else None
    base = HeadroomRow("base", float(held.loss.mean()), acc(base_correct))
    bound_scores = scored["overfit"]
    bound = HeadroomRow("overfit", float(bound_scores["loss"].mean()), acc(bound_scores["correct"]))
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
        row = bound if name == "overfit" else HeadroomRow(name, float(s["loss"].mean()))
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
        held, task = read_labelled(model, loader, loss_fn, max_samples=max_samples, task=task)
        train = None
        if train_loader is not None and probe is None:
            train, _ = read_labelled(
                model,
                train_loader,
                loss_fn,
                max_samples=max_train_samples,
                task=task,
                role="train_loader",
                keep_batches=False,
            )
        probe_out, info, sigma = probe_step(
            held, train, task, probe=probe, folds=folds, seed=seed, mixture=mixture_classes
        )
        mix_k = info.get("mixture_classes", info.get("mixture_points", 0))
        scored = score_label_rows(
            model, held, loss_fn, task, probe_out, rows=LABEL_ROWS, mix_k=mix_k, sigma=sigma
        )
    finally:
        model.base_model.train(was_training)
    report = _report(model, held, task, info, scored, time.perf_counter() - start)
    model.headroom_report = report  # the model card reports it
    return report


def _report(
    model: OCDModel, held: LabelledSplit, task: str, info: dict, scored: dict, seconds: float
):
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
