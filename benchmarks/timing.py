"""Clocks, the machine in words, and progress lines: what every benchmark measures time with.

Every benchmark script times with :func:`timed` (CUDA work is synchronised before the clock is
read, so a GPU run times the kernels, not their launch), states where it ran with
:func:`machine` (the string stored in each JSON's ``machine`` field), and reports progress with
:func:`log` on stderr, so that stdout holds only the tables.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def log(msg: str) -> None:
    """One progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine(device: str | None = None) -> str:
    """The machine in words, e.g. '2-core CPU, no GPU (x86_64)' or 'NVIDIA H200 GPU, 16 CPU cores'.

    ``device`` is where the benchmark ran; by default the GPU when there is one. A CPU run on a
    machine with a GPU says so ('GPU present').
    """
    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} GPU, {os.cpu_count()} CPU cores"
    gpu = "GPU present" if cuda else "no GPU"
    return f"{os.cpu_count()}-core CPU, {gpu} ({platform.machine()})"


def sync(device: str | torch.device | None) -> None:
    """Wait for the CUDA work queued so far, when ``device`` is a CUDA device."""
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (``ru_maxrss``: KB on Linux, bytes on
    macOS)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def timed(fn: Callable[[], Any], device: str | torch.device | None = None) -> tuple[Any, float]:
    """``(fn(), seconds it took)``; with a CUDA ``device``, its queued work is included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def one_epoch_seconds(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str = "cpu",
) -> float:
    """Wall time of one plain training epoch (Adam 1e-4) of a copy of ``model`` over ``loader``:
    the unit the speed and layer-selection benchmarks state their costs in."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def epoch() -> None:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return timed(epoch, device)[1]
