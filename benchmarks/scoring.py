"""How a benchmark scores a way of predicting the test set: its task, loss and metrics.

A :class:`Task` says how a domain is scored (classification: cross-entropy and accuracy %;
regression: MSE and RMSE in the target's units). :func:`evaluate_module` scores a plain model,
:func:`evaluate_predictions` any ``predict(x, y)`` function, and :func:`evaluate_with_deltas`
the OCD model run with deltas a row chose itself (nearest neighbour, own-label overfit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ocdwrap
from ocdwrap.batches import read_output, split_batch, to_device

from .zoo import evaluate as zoo_evaluate

CE = nn.CrossEntropyLoss(reduction="none")  # the per-sample loss of every classification benchmark


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, the loss of every regression benchmark."""
    return F.mse_loss(pred, y, reduction="none")


@dataclass
class Task:
    """How a domain is scored: classification (CE, accuracy %) or regression (MSE, RMSE)."""

    kind: str  # "classification" | "regression"
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    y_std: float = 1.0  # regression: targets were standardised with this std

    @classmethod
    def classification(cls) -> Task:
        return cls("classification", CE)

    @classmethod
    def regression(cls, y_std: float = 1.0) -> Task:
        return cls("regression", mse, y_std=y_std)

    def metrics(self, res: dict[str, Any]) -> dict[str, float]:
        """evaluate_ocd / zoo.evaluate result -> this domain's metrics."""
        if self.kind == "classification":
            return {"loss": float(res["loss"]), "acc": 100.0 * float(res["accuracy"])}
        mse_ = float(res["loss"])
        return {"mse": mse_, "rmse": math.sqrt(mse_) * self.y_std}


def evaluate_module(module: nn.Module, loader: Iterable, task: Task, device: str) -> dict:
    """A plain model's metrics (eval mode)."""
    return task.metrics(zoo_evaluate(module, loader, task.loss_fn, device, task=task.kind))


def evaluate_ocd(model: ocdwrap.OCDModel, loader: Iterable, task: Task, **kw: Any) -> dict:
    """``ocdwrap.evaluate_ocd`` (``kw``: ``num_draws``, ``seed``, ``mode``) in this task's metrics."""
    return task.metrics(ocdwrap.evaluate_ocd(model, loader, task.loss_fn, task=task.kind, **kw))


@torch.no_grad()
def evaluate_predictions(
    predict: Callable[[Any, Any], torch.Tensor], loader: Iterable, task: Task, device: str
) -> dict[str, float]:
    """Metrics of ``predict(inputs, target) -> prediction`` over ``loader``."""
    total, correct, n = 0.0, 0, 0
    for batch in loader:
        x, y = split_batch(batch)
        x, y = to_device(x, device), to_device(y, device)
        pred = predict(x, y).float()
        total += float(task.loss_fn(pred, y).sum())
        n += int(y.shape[0])
        if task.kind == "classification":
            correct += int((pred.argmax(-1) == y).sum())
    res = {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}
    return task.metrics(res)


def evaluate_with_deltas(
    model: ocdwrap.OCDModel,
    test_loader: Iterable,
    task: Task,
    spec_fn: Callable[[Any, Any, int], Any],
) -> dict[str, float]:
    """Metrics when test batch (x, y) starting at position p runs with ``spec_fn(x, y, p)``."""
    position = 0

    def predict(x: Any, y: Any) -> torch.Tensor:
        nonlocal position
        spec = spec_fn(x, y, position).to(model.device)
        position += int(y.shape[0])
        with model.use_deltas(spec):
            return read_output(model(x))

    return evaluate_predictions(predict, test_loader, task, str(model.device))
