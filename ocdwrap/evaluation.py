"""Evaluation of an OCD model against its controls on a data loader.

``evaluate_ocd`` scores one of:

* ``"base"``: the base model (``model.disable_adapter()``);
* ``"ocd"``: generated weights, ``num_draws`` per input averaged (probabilities for
  classification, values for regression) — OCD (1 draw) and OCD(K);
* ``"overfit"``: each test sample overfitted with its *true* label (the upper bound).

It returns the mean loss, the accuracy (classification) and, when asked, the per-sample
predictions and the spread between draws (for uncertainty studies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .batches import call_model, read_output, split_batch, to_device
from .deltas import FullDelta
from .model import OCDModel
from .overfit import overfit_batch


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
        losses = loss_fn(pred, target)
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
