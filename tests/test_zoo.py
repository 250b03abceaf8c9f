"""Tests of benchmarks.zoo: reference model names and shapes, and the plain trainer (tiny problems)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.datasets import tensor_loader
from benchmarks.zoo import (
    LeNet5,
    TabularMLP,
    continue_training,
    evaluate,
    googlenet_small,
    resnet18_small,
    train_base,
)
from ocdwrap.errors import EmptyDataError

CE = nn.CrossEntropyLoss(reduction="none")


def mse(out, y):
    return F.mse_loss(out, y, reduction="none")


def test_lenet5_names_and_shapes():
    model = LeNet5()
    names = [n for n, _ in model.named_modules() if n]
    assert names == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert (model.fc1.in_features, model.fc1.out_features) == (400, 120)
    assert (model.fc2.in_features, model.fc2.out_features) == (120, 84)
    assert (model.conv1.padding, model.conv1.out_channels, model.conv2.out_channels) == (
        (2, 2),
        6,
        16,
    )
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert LeNet5(num_classes=5, in_channels=3)(torch.zeros(2, 3, 28, 28)).shape == (2, 5)


def test_tabular_mlp_names_and_shapes():
    model = TabularMLP(8, d_hidden=16, n_layers=2)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["blocks.0.linear", "blocks.1.linear", "head"]
    assert model(torch.zeros(5, 8)).shape == (5,)
    assert TabularMLP(8, d_hidden=16, d_out=3)(torch.zeros(5, 8)).shape == (5, 3)


@pytest.mark.parametrize("build", [resnet18_small, googlenet_small])
def test_torchvision_small_models(build):
    torch.manual_seed(0)
    model = build()
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10
    x = torch.randn(2, 1, 28, 28)
    model.train()
    assert model(x).shape == (2, 10)  # a plain tensor in train mode too (no aux logits)
    model.eval()
    with torch.no_grad():
        assert build(num_classes=4, in_channels=3).eval()(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_googlenet_full_resolution():
    model = googlenet_small(full_resolution=True).eval()
    assert isinstance(model.maxpool1, nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def blobs(n, seed, noise=0.5):
    """Three Gaussian blobs in 4-d: a problem a tiny MLP learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    return centers[y] + noise * torch.randn(n, 4, generator=g), y


def test_train_base_lowers_val_loss_and_restores_best(capsys):
    torch.manual_seed(0)
    model = TabularMLP(4, d_hidden=32, n_layers=2, dropout=0.0, d_out=3)
    train = tensor_loader(*blobs(256, 0), 32, shuffle=True)
    val = tensor_loader(*blobs(128, 1), 64)
    before = evaluate(model, val, CE)
    result = train_base(model, train, val, CE, lr=1e-2, max_epochs=8, patience=2)
    after = evaluate(model, val, CE)
    assert "epoch 1: train" in capsys.readouterr().err
    assert result.best_val_loss < 0.5 * before["loss"] and after["accuracy"] > 0.9
    assert after["loss"] == pytest.approx(result.best_val_loss, rel=1e-6)
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    assert result.epochs_run == len(result.history) and result.seconds > 0
    assert result.seconds_per_epoch == pytest.approx(result.seconds / result.epochs_run)


def test_train_base_stops_early_and_keeps_the_best_epoch():
    # Random labels: fitting the training set makes the validation loss rise.
    g = torch.Generator().manual_seed(0)
    x_tr, y_tr = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    x_va, y_va = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = TabularMLP(4, d_hidden=128, n_layers=2, dropout=0.0, d_out=3)
    val = tensor_loader(x_va, y_va, 64)
    result = train_base(
        model,
        tensor_loader(x_tr, y_tr, 16),
        val,
        CE,
        lr=1e-2,
        max_epochs=30,
        patience=2,
        progress=False,
    )
    assert result.stopped_early and not result.stopped_by_time
    assert result.epochs_run == result.best_epoch + 2 < 30
    assert result.history[-1]["val_loss"] > result.best_val_loss
    assert evaluate(model, val, CE)["loss"] == pytest.approx(result.best_val_loss, rel=1e-6)


def test_train_base_time_budget_and_dict_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, features):
            return self.lin(features).squeeze(-1)

    x, y = torch.randn(64, 4), torch.randn(64)
    batches = [{"features": x[i : i + 8], "labels": y[i : i + 8]} for i in range(0, 64, 8)]
    result = train_base(
        Keyword(), batches, batches, mse, max_epochs=5, time_budget_s=0.0, progress=False
    )
    assert result.stopped_by_time and result.epochs_run == 1
    metrics = evaluate(Keyword(), batches, mse, task="regression")
    assert metrics["n"] == 64 and metrics["rmse"] == pytest.approx(metrics["loss"] ** 0.5)


def test_continue_training_runs_for_the_given_time():
    model = LeNet5()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    w = model.fc2.weight.detach().clone()
    steps = continue_training(model, tensor_loader(x, y, 8), CE, seconds=0.2, lr=1e-3)
    assert steps >= 2 and not model.training
    assert not torch.equal(w, model.fc2.weight)


def test_evaluate_accuracy_and_empty_loader():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])
    metrics = evaluate(model, tensor_loader(x, y, 2), CE)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["n"] == 3
    assert metrics["loss"] == pytest.approx(CE(model(x), y).mean().item(), rel=1e-6)
    with pytest.raises(EmptyDataError):
        evaluate(model, [], CE)
    with pytest.raises(ValueError, match="task"):
        evaluate(model, tensor_loader(x, y, 2), CE, task="ranking")
