"""Helpers shared by test_reliability.py and test_faults.py: tiny data, a wrapped MLP, one thread.

Results are compared bit for bit between this process and worker subprocesses, which run torch
on one thread: :func:`_one_thread` pins this process to one thread while it computes them.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from conftest import make_mlp
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap

CE = torch.nn.CrossEntropyLoss(reduction="none")
SMALL = dict(unet_channels=(8, 16), mlp_hidden=32, cond_dim=32, mlp_layers=2)
FIT = dict(batch_size=16)  # FitArgs of the small hypernetworks
FULL_STORE = dict(delta="full")  # the shared store: full deltas, every key ...
SHARD = dict(shard_size=16)  # ... collected in shards of 16
ROOT = Path(__file__).resolve().parent.parent


def _xy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(n: int = 48, batch: int = 8, x=None, y=None) -> DataLoader:
    if x is None:
        x, y = _xy(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _wrap(**cfg) -> ocdwrap.OCDModel:
    return ocdwrap.wrap(make_mlp(), layer="fc2", config=ocdwrap.OCDConfig(**cfg))


@contextmanager
def _one_thread():
    """Pin torch to one thread, as the worker subprocesses are, so results match bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _copy_store(src: str | Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
