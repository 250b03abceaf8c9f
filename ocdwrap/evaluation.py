"""Evaluation of an OCD model against its controls on a data loader.

``evaluate_ocd`` scores one of:

* ``"base"``: the base model (``model.disable_adapter()``);
* ``"ocd"``: generated weights, ``num_draws`` per input averaged (probabilities for
  classification, values for regression) — OCD (1 draw) and OCD(K);
* ``"overfit"``: each test sample overfitted with its *true* label (the upper bound).

It returns the mean loss, the accuracy (classification) and, when asked, the per-sample
predictions and the spread between draws (for uncertainty studies).

``read_labelled`` is the one base pass over a labelled loader that ``headroom`` and ``compare``
start from: the conditioning, the base's predictions and per-sample losses, the labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .batches import (
    batch_size,
    call_model,
    index_batch,
    read_output,
    sample_losses,
    split_batch,
    to_device,
)
from .capture import Conditioning
from .deltas import FullDelta
from .ensemble import scored_prediction
from .errors import BatchFormatError, EmptyDataError, LabelMismatchError, OCDError
from .model import OCDModel
from .overfit import overfit_batch

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@torch.no_grad()
def evaluate_ocd(
    model: OCDModel,
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    mode: str = "ocd",
    num_draws: int = 1,
    seed: int = 0,
    task: str = "classification",
    return_predictions: bool = False,
    align: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Mean loss (and accuracy) of ``model`` on ``data`` in ``mode`` 'base', 'ocd' or 'overfit'.

    For classification with ``num_draws > 1`` the loss is the cross-entropy of the mean
    probability (``loss_fn`` is then applied to its log, which is exact for cross-entropy).
    ``align`` is passed to :meth:`OCDModel.ensemble` (draws with an order inside, e.g. speakers).

    Example:
        >>> evaluate_ocd(model, test_loader, nn.CrossEntropyLoss(reduction="none"), num_draws=5)
        {'loss': 0.031, 'accuracy': 0.991, 'n': 10000}
    """
    if mode not in ("base", "ocd", "overfit"):
        raise ValueError(f"mode={mode!r}; choose 'base', 'ocd' or 'overfit'.")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    total, correct, n = 0.0, 0, 0
    preds, spreads, targets = [], [], []
    for batch in data:
        inputs, target = split_batch(batch)
        inputs, target = to_device(inputs, model.device), to_device(target, model.device)
        spread = None
        if mode == "base":
            with model.disable_adapter():
                pred = read_output(call_model(model, inputs)).float()
        elif mode == "overfit":
            res = overfit_batch(model, inputs, target, loss_fn)
            with model.use_deltas(FullDelta(res.delta)):
                pred = read_output(call_model(model, inputs)).float()
        else:
            args = (inputs,) if not isinstance(inputs, dict) else ()
            kwargs = inputs if isinstance(inputs, dict) else {}
            with model.sampling(task=task):
                ens = model.ensemble(*args, num_draws=num_draws, rng=gen, align=align, **kwargs)
            pred = read_output(ens.output).float()
            spread = ens.uncertainty
        # the ensemble's output is already the floored log of its mean probability
        losses = loss_fn(pred if mode == "ocd" else scored_prediction(pred, task), target)
        total += float(losses.sum())
        B = pred.shape[0]
        n += B
        if task == "classification":
            correct += int((pred.argmax(-1) == target).sum())
        if return_predictions:
            preds.append(pred.cpu())
            targets.append(target.cpu())
            if spread is not None:
                spreads.append(spread.cpu())
    out: dict[str, Any] = {"loss": total / max(n, 1), "n": n}
    if task == "classification":
        out["accuracy"] = correct / max(n, 1)
    if return_predictions:
        out["predictions"] = torch.cat(preds)
        out["targets"] = torch.cat(targets)
        if spreads:
            out["spread"] = torch.cat(spreads)
    return out


# --- reading the data: one base pass per batch -----------------------------------------------------


@dataclass
class LabelledSplit:
    """One base pass over a labelled loader: its batches (kept only when asked for, to overfit
    them later), the conditioning, the base's predictions, the labels, the base's losses."""

    batches: list[tuple[Any, Any]]
    cond: Conditioning
    pred: torch.Tensor  # (N, ...) base prediction
    target: torch.Tensor  # (N, ...) labels
    loss: torch.Tensor  # (N,) base per-sample loss

    @property
    def features(self) -> torch.Tensor:
        return torch.cat([self.cond.layer_input, self.cond.layer_output, self.cond.model_output], 1)

    @property
    def n(self) -> int:
        return int(self.loss.shape[0])


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


def batch_conditioning(model: OCDModel, inputs: Any) -> tuple[Conditioning, torch.Tensor]:
    """One base pass over a batch's ``inputs`` (called as the batch convention says): its
    conditioning I(x) and the base's prediction (float)."""
    with torch.no_grad():
        kwargs = inputs if isinstance(inputs, Mapping) else {}
        cond, out = model._conditioning(
            (inputs,), kwargs, lambda: call_model(model.base_model, inputs)
        )
        return cond, read_output(out).detach().float()


def _base_pass(model: OCDModel, inputs: Any, target: Any, loss_fn: LossFn, task: str, role: str):
    cond, pred = batch_conditioning(model, inputs)
    if task == "auto":
        is_cls = pred.dim() == 2 and pred.shape[1] > 1 and pred.is_floating_point()
        is_cls = is_cls and isinstance(target, torch.Tensor) and not target.is_floating_point()
        task = "classification" if is_cls else "regression"
    _check_labels(pred, target, task, loss_fn, role)
    try:
        with torch.no_grad():
            scored = scored_prediction(pred, task)
            losses = sample_losses(loss_fn, scored, target, pred.shape[0]).detach()
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


def read_labelled(
    model: OCDModel,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    max_samples: int | None = None,
    task: str = "auto",
    role: str = "held-out",
    who: str = "headroom",
    keep_batches: bool = True,
) -> tuple[LabelledSplit, str]:
    """One base pass over ``loader`` (at most ``max_samples`` samples) and the task it shows.

    ``task="auto"`` reads classification for (B, C) outputs with integer labels. A loader
    without labels is a :class:`BatchFormatError` naming ``who`` needs them; labels that do not
    fit the task or the loss, a :class:`LabelMismatchError`; an empty loader, an
    :class:`EmptyDataError`. ``keep_batches=False`` keeps only the per-sample tensors.
    """
    batches, conds, preds, targets, losses = [], [], [], [], []
    n = 0
    for batch in loader:
        if max_samples is not None and n >= max_samples:
            break  # max_samples <= 0
        try:
            inputs, target = split_batch(batch)
        except BatchFormatError as e:
            raise BatchFormatError(
                f"{who} needs a labelled {role} loader (the upper bound and the probe use the "
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
        if keep_batches:
            batches.append((inputs, target))
        conds.append(cond)
        preds.append(pred)
        targets.append(target.detach())
        losses.append(loss)
        n += B
        if max_samples is not None and n >= max_samples:
            break
    if not conds:
        raise EmptyDataError(f"{who} got a {role} loader that yielded no samples.")
    cond = Conditioning(
        *(
            torch.cat([getattr(c, k) for c in conds])
            for k in ("layer_input", "layer_output", "model_output")
        )
    )
    split = LabelledSplit(batches, cond, torch.cat(preds), torch.cat(targets), torch.cat(losses))
    return split, task
