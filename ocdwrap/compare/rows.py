"""The rows of :func:`ocdwrap.compare`, each scored on the same labelled eval samples.

Every function here returns a :class:`Scored`: the per-sample losses and predictions (in the
eval data's order) and the seconds the predictions took. The rows that overfit the layer on
each eval sample (``overfit``, ``own_label``, ``probe``) are ``ocdwrap.headroom``'s own
(:func:`ocdwrap.headroom.score_label_rows`); this module adds the base, any generator (the
library's or a caller's) and the compute-matched base.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import call_model, read_output, sample_losses
from ..deltas import FullDelta, LowRankDelta, Rank1Delta
from ..ensemble import log_mean_probability, scored_prediction
from ..errors import ConfigError
from ..evaluation import LabelledSplit, batch_conditioning
from ..layer import _get_parent
from ..model import OCDModel
from .report import Metric

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]
TrainFn = Callable[[nn.Module, float], Any]


@dataclass
class Scored:
    """A row's per-sample losses (N,) and predictions (N, ...), and the seconds its
    predictions took over the eval samples."""

    loss: torch.Tensor
    pred: torch.Tensor
    seconds: float


def base_row(model: OCDModel, held: LabelledSplit) -> Scored:
    """The base model (its losses from the base pass; its prediction time measured alone,
    after one warm-up call)."""
    with torch.no_grad(), model.disable_adapter():
        call_model(model, held.batches[0][0])
        start = time.perf_counter()
        for inputs, _ in held.batches:
            call_model(model, inputs)
    return Scored(held.loss, held.pred, time.perf_counter() - start)


def _combine(preds: list[torch.Tensor], task: str) -> torch.Tensor:
    """Classification: the log of the mean probability under the ensemble's floor, for one
    draw as for several (the loss of it is the ensemble's cross-entropy, capped as
    :meth:`OCDModel.ensemble` caps it); regression: the mean value."""
    if task == "classification":
        return log_mean_probability(torch.stack(preds))
    return preds[0] if len(preds) == 1 else torch.stack(preds).mean(0)


def _check_spec(spec: Any, n: int, name: str) -> None:
    if not isinstance(spec, FullDelta | Rank1Delta | LowRankDelta) or spec.batch != n:
        raise ConfigError(
            f"Generator {name!r} returned {type(spec).__name__}"
            f"{'' if not hasattr(spec, 'batch') else f' for {spec.batch} samples'}; generate() "
            f"must return a FullDelta, Rank1Delta or LowRankDelta with one delta per sample ({n})."
        )


def score_generator(
    model: OCDModel,
    gen: Any,
    held: LabelledSplit,
    loss_fn: LossFn,
    task: str,
    *,
    draws: int = 1,
    seed: int = 0,
    name: str = "",
) -> Scored:
    """The base model with ``gen``'s deltas on every eval sample: ``draws`` draws each (one
    ``torch.Generator`` seeded with ``seed`` for the whole pass), combined as an ensemble.
    The time counts the conditioning pass, the generation and the prediction passes."""
    rng = torch.Generator(device=model.device).manual_seed(seed)
    losses, preds, seconds = [], [], 0.0
    for inputs, target in held.batches:
        start = time.perf_counter()
        cond, _ = batch_conditioning(model, inputs)
        n = cond.layer_input.shape[0]
        outs = []
        for _ in range(draws):
            spec = gen.generate(model, cond, inputs, rng)
            _check_spec(spec, n, name)
            with torch.no_grad(), model.use_deltas(spec.to(model.device)):
                outs.append(read_output(call_model(model, inputs)).detach().float())
        pred = _combine(outs, task)
        seconds += time.perf_counter() - start
        losses.append(sample_losses(loss_fn, pred, target, n).detach())
        preds.append(pred)
    return Scored(torch.cat(losses), torch.cat(preds), seconds)


def unwrapped_copy(model: OCDModel) -> nn.Module:
    """A deep copy of the base model without ocdwrap in it: the original target layer, and the
    parameters' ``requires_grad`` as they were before wrapping. The wrapped model is untouched."""
    parent, attr = _get_parent(model.base_model, model.layer_name)
    dynamic = getattr(parent, attr)
    setattr(parent, attr, dynamic.base_layer)
    try:
        base = copy.deepcopy(model.base_model)
    finally:
        setattr(parent, attr, dynamic)
    for n, p in base.named_parameters():
        p.requires_grad_(model._requires_grad.get(n, True))
    return base


def compute_matched(
    model: OCDModel,
    train_fn: TrainFn,
    seconds: float,
    held: LabelledSplit,
    loss_fn: LossFn,
    task: str,
) -> tuple[Scored, float]:
    """A copy of the base trained further by ``train_fn(copy, seconds)`` (in place, or returning
    the trained model), then scored; and the seconds ``train_fn`` actually took."""
    base = unwrapped_copy(model)
    start = time.perf_counter()
    out = train_fn(base, seconds)
    took = time.perf_counter() - start
    trained = out if isinstance(out, nn.Module) else base
    trained.eval()
    losses, preds, spent = [], [], 0.0
    for inputs, target in held.batches:
        start = time.perf_counter()
        with torch.no_grad():
            pred = read_output(call_model(trained, inputs)).detach().float()
        spent += time.perf_counter() - start
        scored = scored_prediction(pred, task)
        losses.append(sample_losses(loss_fn, scored, target, pred.shape[0]).detach())
        preds.append(pred)
    return Scored(torch.cat(losses), torch.cat(preds), spent), took


# --- what a row's predictions score -----------------------------------------------------------------


def task_metric(task: str, pred: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy (classification) or RMSE (regression: the root of the mean over samples of each
    sample's mean squared error)."""
    if task == "classification":
        return float((pred.argmax(-1) == target).float().mean())
    n = pred.shape[0]
    err = (pred.reshape(n, -1).float() - target.reshape(n, -1).float()).square().mean(1)
    return float(err.mean().sqrt())


def group_ids(metrics: Mapping[str, Metric], held: LabelledSplit) -> dict[str, torch.Tensor]:
    """Each per-group metric's group id (N,) of every eval sample, from its ``group_fn``."""
    out = {}
    for name, m in metrics.items():
        if m.per == "group":
            ids = [torch.as_tensor(m.group_fn(x, y)).reshape(-1).cpu() for x, y in held.batches]
            out[name] = torch.cat(ids)
            if out[name].shape[0] != held.n:
                raise ConfigError(
                    f"Metric {name!r}: group_fn gave {out[name].shape[0]} group ids for "
                    f"{held.n} eval samples; it must return one per sample of each batch."
                )
    return out


def extra_metrics(
    metrics: Mapping[str, Metric],
    pred: torch.Tensor,
    target: torch.Tensor,
    groups: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Every extra metric of one row's predictions: the mean over samples, or over groups."""
    out = {}
    for name, m in metrics.items():
        if m.per == "sample":
            v = torch.as_tensor(m.fn(pred, target)).double()
            if v.dim() != 1 or v.shape[0] != pred.shape[0]:
                raise ConfigError(
                    f"Metric {name!r} (per='sample') must return one value per sample "
                    f"({pred.shape[0]}), got shape {tuple(v.shape)}."
                )
            out[name] = float(v.mean())
            continue
        ids = groups[name]
        values = [
            float(m.fn(pred[ids.to(pred.device) == g], target[ids.to(target.device) == g]))
            for g in ids.unique().tolist()
        ]
        out[name] = sum(values) / len(values)
    return out
