"""Small reference models and a plain trainer for the benchmarks.

Models (module names are part of the contract: OCD selects a layer by name):

* :class:`LeNet5`: ``conv1, conv2, fc1, fc2, fc3`` (the paper's layer is ``fc2``, 120 -> 84);
  the examples' model (``examples/data.py``), so the benchmarks measure the quickstart's network.
* :class:`TabularMLP`: Gorishniy et al. (2021)'s MLP; Linear layers ``blocks.{i}.linear`` and
  ``head``.
* :func:`resnet18_small`, :func:`googlenet_small`: torchvision models (no weights downloaded)
  with a stem for small grey images; torchvision's module names (``fc``, ``layer4``, ...).

Training: :func:`train_base` (Adam, early stopping on validation loss, best weights restored),
:func:`continue_training` (the compute-matched control: the base trained for as long as OCD
took) and :func:`evaluate`. Batches follow :mod:`ocdwrap.batches`; ``loss_fn(output, target)``
returns per-sample losses (``reduction="none"``) or their sum.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from examples.data import LeNet5
from ocdwrap.batches import (
    batch_size,
    call_model,
    per_sample_loss,
    read_output,
    split_batch,
    to_device,
)
from ocdwrap.errors import EmptyDataError, NonFiniteError

__all__ = [
    "LeNet5",
    "TabularMLP",
    "TrainResult",
    "continue_training",
    "evaluate",
    "googlenet_small",
    "resnet18_small",
    "train_base",
]

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


# --------------------------------------------------------------------------- models


class _MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.linear(x)))


class TabularMLP(nn.Module):
    """The MLP of Gorishniy et al. (2021): ``n_layers`` x (Linear -> ReLU -> Dropout), then a head.

    Module names: ``blocks.0.linear`` ... ``blocks.{n_layers-1}.linear`` (each with a
    ``.dropout``) and ``head``. The output has shape (B,) when ``d_out == 1`` (so
    ``F.mse_loss(out, y, reduction="none")`` is per sample) and (B, d_out) otherwise.

    Example:
        >>> TabularMLP(8)(torch.zeros(4, 8)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        d_in: int,
        d_hidden: int = 256,
        n_layers: int = 3,
        dropout: float = 0.1,
        d_out: int = 1,
    ) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * n_layers
        self.blocks = nn.ModuleList(_MLPBlock(a, b, dropout) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], d_out)
        self.d_out = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        out = self.head(x)
        return out.squeeze(-1) if self.d_out == 1 else out


def resnet18_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 (random init) with a CIFAR-style stem for small images.

    ``conv1`` becomes a 3x3 stride-1 convolution from ``in_channels`` and ``maxpool`` an
    identity, so a 28x28 input reaches ``layer4`` at 4x4. Other names are torchvision's (``fc``).

    Example:
        >>> resnet18_small()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def googlenet_small(
    num_classes: int = 10, in_channels: int = 1, *, full_resolution: bool = False
) -> nn.Module:
    """torchvision's GoogLeNet (random init, ``aux_logits=False``) with a stem for small images.

    ``conv1`` becomes a 3x3 stride-1 ``BasicConv2d`` from ``in_channels`` and ``maxpool2`` an
    identity: on 28x28 inputs the inception blocks run at 14/7/4 pixels. ``full_resolution=True``
    also drops ``maxpool1`` (28/14/7, as the CIFAR GoogLeNet the paper used; about 4x the
    compute). Module names are torchvision's (``fc`` is the 1024 -> ``num_classes`` head).

    Example:
        >>> googlenet_small()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    from torchvision.models import googlenet
    from torchvision.models.googlenet import BasicConv2d

    model = googlenet(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)
    model.conv1 = BasicConv2d(in_channels, 64, kernel_size=3, stride=1, padding=1)
    nn.init.trunc_normal_(model.conv1.conv.weight, mean=0.0, std=0.01, a=-2, b=2)
    model.maxpool2 = nn.Identity()
    if full_resolution:
        model.maxpool1 = nn.Identity()
    return model


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train_base` did. ``history`` has one dict per epoch (train/val loss, seconds)."""

    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    stopped_by_time: bool
    seconds: float
    seconds_per_epoch: float
    history: list[dict[str, float]] = field(default_factory=list)


def _batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn, device: str) -> tuple[Any, int]:
    """Sum of the per-sample losses of one batch, and the batch size."""
    inputs, target = split_batch(batch)
    inputs, target = to_device(inputs, device), to_device(target, device)
    n = batch_size(inputs)
    pred = read_output(call_model(model, inputs))
    return per_sample_loss(loss_fn, pred, target, n).sum(), n


def _train_step(
    model: nn.Module, batch: Any, loss_fn: LossFn, opt: torch.optim.Optimizer, device: str
) -> tuple[float, int]:
    total, n = _batch_loss(model, batch, loss_fn, device)
    loss = total / n
    if not torch.isfinite(loss):
        raise NonFiniteError(f"Training loss became {loss.item()}; lower the learning rate.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(total.detach()), n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    device: str = "cpu",
    task: str = "classification",
) -> dict[str, float]:
    """Mean per-sample loss over ``loader`` (model in eval mode), and accuracy or RMSE.

    Returns ``{"loss", "n", "accuracy"}`` for ``task="classification"`` (argmax of the output
    against integer targets) or ``{"loss", "n", "rmse"}`` for ``task="regression"``.

    Example:
        >>> evaluate(model, test_loader, nn.CrossEntropyLoss(reduction="none"))["accuracy"]
        0.98
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', not {task!r}.")
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in loader:
        inputs, target = split_batch(batch)
        inputs, target = to_device(inputs, device), to_device(target, device)
        n = batch_size(inputs)
        pred = read_output(call_model(model, inputs))
        total += float(per_sample_loss(loss_fn, pred, target, n).sum())
        count += n
        if task == "classification":
            correct += int((pred.argmax(-1) == target).sum())
    if count == 0:
        raise EmptyDataError("evaluate() got a loader that yielded no samples.")
    out = {"loss": total / count, "n": float(count)}
    if task == "classification":
        out["accuracy"] = correct / count
    else:
        out["rmse"] = math.sqrt(total / count)
    return out


def _val_loss(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, device: str) -> float:
    return evaluate(model, loader, loss_fn, device, task="regression")["loss"]


def train_base(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    lr: float = 1e-3,
    max_epochs: int = 50,
    patience: int = 3,
    weight_decay: float = 0.0,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> TrainResult:
    """Train ``model`` with Adam until the validation loss stops improving; keep the best weights.

    Stops after ``patience`` epochs without a new best validation loss (``stopped_early``),
    after ``max_epochs``, or once ``time_budget_s`` has elapsed (checked after every step; the
    cut epoch is still validated; ``stopped_by_time``). The best weights are restored, so
    ``evaluate(model, val_loader, loss_fn)["loss"] == result.best_val_loss``. Seeds torch's
    global RNG with ``seed``; prints one line per epoch to stderr when ``progress``.

    Example:
        >>> ce = nn.CrossEntropyLoss(reduction="none")
        >>> result = train_base(LeNet5(), train_loader, val_loader, ce, max_epochs=20)
        >>> result.best_val_loss, result.epochs_run
        (0.041, 9)
    """
    if max_epochs < 1 or patience < 1:
        raise ValueError(f"max_epochs and patience must be >= 1 (got {max_epochs}, {patience}).")
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    stopped_early = stopped_by_time = False
    for epoch in range(1, max_epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            loss_sum, n = _train_step(model, batch, loss_fn, opt, device)
            total, count = total + loss_sum, count + n
            if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
                stopped_by_time = True
                break
        if count == 0:
            raise EmptyDataError("train_base() got a training loader that yielded no samples.")
        val = _val_loss(model, val_loader, loss_fn, device)
        history.append(
            {
                "epoch": float(epoch),
                "train_loss": total / count,
                "val_loss": val,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        if progress:
            print(
                f"epoch {epoch}: train {total / count:.4f}  val {val:.4f}  "
                f"({history[-1]['seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        if val < best_loss:
            best_loss, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            stopped_early = True
            break
        if stopped_by_time:
            break
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        best_val_loss=best_loss,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        stopped_by_time=stopped_by_time,
        seconds=seconds,
        seconds_per_epoch=seconds / len(history),
        history=history,
    )


def continue_training(
    model: nn.Module,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    seconds: float,
    lr: float = 1e-4,
    device: str = "cpu",
    weight_decay: float = 0.0,
    seed: int = 0,
) -> int:
    """Train ``model`` further (fresh Adam) for ``seconds`` of wall time; return the steps taken.

    The compute-matched control: give the base model the time OCD spent, then compare. Cycles
    over ``train_loader`` as often as needed; leaves the model in eval mode.

    Example:
        >>> steps = continue_training(model, train_loader, ce, seconds=2.6, lr=1e-4)
    """
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        yielded = False
        for batch in train_loader:
            yielded = True
            _train_step(model, batch, loss_fn, opt, device)
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
        if not yielded:
            raise EmptyDataError("continue_training() got a loader that yielded no samples.")
    model.eval()
    return steps
