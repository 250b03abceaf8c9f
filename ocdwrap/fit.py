"""``fit()``: train the hypernetwork (denoiser or regressor, and the scale model) on a collection.

Each step draws a minibatch of stored samples, a timestep t ~ U{0..T-1} and Gaussian noise, and
minimises the epsilon-prediction MSE (or, for the regressor, the MSE of the normalised delta),
plus the scale model's relative dB loss (both computed by the hypernetwork's ``forward``).
Gradients are clipped, an EMA of the generator is kept and used for sampling. A checkpoint
(safetensors + JSON) is written every ``args.checkpoint_every`` steps; ``fit`` resumes from it
and continues exactly where it stopped.

One loop serves one process and several (``accelerate launch``, ``torchrun``): with W > 1
processes every process draws the same global minibatch (from ``seed``), trains on its slice
under DistributedDataParallel, which averages the gradients, so every process holds the same
weights after every step, and those are the weights one process reaches (up to float rounding).
Checkpoints are written by the main process.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import Conditioning
from .config import FitArgs
from .errors import BaseModelMismatchError, EmptyDataError, NonFiniteError
from .fit_checkpoint import Checkpoint, run_id
from .hypernet import OCDHyperNetwork, continued_hypernetwork, new_hypernetwork
from .io import (
    tensor_fingerprint,
)
from .model import OCDModel
from .processes import Processes
from .store import DeltaStore, held_deltas, load_training_data

logger = logging.getLogger("ocdwrap")


@dataclass
class FitReport:
    """What :func:`fit` did. ``losses`` / ``scale_losses`` hold one value per step."""

    steps: int
    samples: int
    losses: list[float] = field(default_factory=list)
    scale_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    skipped_steps: int = 0
    resumed_from: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # the FitArgs of this fit

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 20) :]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        return d


def _check_store(model: OCDModel, store: DeltaStore) -> None:
    ident = store.manifest["identity"]
    if ident["layer"] != model.layer_name or ident["fingerprint"] != model.layer_fingerprint():
        raise BaseModelMismatchError(
            f"The collection in {store.directory} was made on layer {ident['layer']!r} "
            f"(fingerprint {ident['fingerprint']}), but this model targets {model.layer_name!r} "
            f"(fingerprint {model.layer_fingerprint()}). Collect again for this base model."
        )
    if ident["overfit_optimizer"] != model.config.overfit_optimizer:
        raise BaseModelMismatchError(
            f"The collection was overfitted with {ident['overfit_optimizer']!r} but the model's config says "
            f"{model.config.overfit_optimizer!r}; the rank-one factor depends on it. Use the same config."
        )
    if not store.complete:
        raise BaseModelMismatchError(
            f"The collection in {store.directory} is incomplete; run ocdwrap.collect again to finish it."
        )
    if len(store) == 0:
        raise EmptyDataError(
            f"The collection in {store.directory} holds no samples (were they all skipped as "
            "non-finite? see its manifest's 'skipped'); collect again from a non-empty loader."
        )


def _global_batch(requested: int, samples: int, procs: Processes) -> int:
    """The minibatch over all processes: at most the data, and a multiple of the process count."""
    b = min(requested, samples)
    if b % procs.world:
        b = max(b - b % procs.world, procs.world)
        if procs.is_main:
            logger.warning(
                "ocdwrap fit: global batch rounded to %d (a multiple of %d processes)",
                b,
                procs.world,
            )
    return b


def _data_parallel(hyper: OCDHyperNetwork, procs: Processes, device: torch.device) -> nn.Module:
    """``hyper`` itself on one process, else wrapped in DistributedDataParallel."""
    if procs.world == 1:
        return hyper
    ddp = nn.parallel.DistributedDataParallel
    # the statistics buffers are computed identically on every process: no per-step sync
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(hyper, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


@dataclass
class _Minibatches:
    """Draws each step's global minibatch (identically on every process) and takes this
    process's slice: (target, cond_in, cond_act, cond_out, rho, timesteps, noise)."""

    target: torch.Tensor
    rho: torch.Tensor
    cond: Conditioning
    size: int  # the global minibatch
    mine: slice  # this process's part of it
    gen: torch.Generator
    timesteps: int

    def __call__(self) -> tuple[torch.Tensor, ...]:
        b, gen, device = self.size, self.gen, self.target.device
        idx = torch.randint(0, self.target.shape[0], (b,), generator=gen, device=device)
        t = torch.randint(0, self.timesteps, (b,), generator=gen, device=device)
        noise = torch.randn((b, *self.target.shape[1:]), generator=gen, device=device)
        i = idx[self.mine]
        c = self.cond.index(i)
        return (self.target[i], *c.tensors(), self.rho[i], t[self.mine], noise[self.mine])


MICRO_BATCH_BYTES = 16 << 20  # largest activation of one micro-batch (see _micro_batch)


def _micro_batch(hyper: OCDHyperNetwork, per_process: int, micro_batch_size: int | None) -> int:
    """Samples per forward/backward pass within a step.

    glibc serves allocations above 32 MiB with mmap and unmaps them on free, and PyTorch's CPU
    allocator does not cache, so a UNet activation above that size is mapped and faulted in anew
    on every step (on LeNet5's 84 x 120 layer at batch 128: 10 M page faults and more kernel
    than user time per step). Micro-batches whose largest activation stays under 16 MiB avoid it.
    """
    if micro_batch_size is not None:
        return min(int(micro_batch_size), per_process)
    per_sample = getattr(hyper.net.net, "activation_bytes", lambda: 0)()
    if per_sample == 0:
        return per_process
    return max(1, min(per_process, MICRO_BATCH_BYTES // per_sample))


def _accumulate(
    objective: nn.Module, batch: tuple[torch.Tensor, ...], micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over ``batch`` in micro-batches of ``micro`` samples; the mean losses.

    Each micro-batch's losses are weighted by its share of the batch, so the accumulated
    gradient is the full batch's (every loss is a mean over samples). Under DDP the gradients
    are averaged over processes once, in the last micro-batch's backward.
    """
    n = batch[0].shape[0]
    starts = range(0, n, micro)
    loss_sum = sloss_sum = None
    for k, lo in enumerate(starts):
        part = tuple(t[lo : lo + micro] for t in batch)
        last = k == len(starts) - 1
        sync = nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync()
        with sync:
            loss, sloss = objective(*part)
            w = part[0].shape[0] / n
            total = loss + sloss
            (total * w if w != 1 else total).backward()
        loss_sum = loss.detach() * w if loss_sum is None else loss_sum + loss.detach() * w
        sloss_sum = sloss.detach() * w if sloss_sum is None else sloss_sum + sloss.detach() * w
    return loss_sum, sloss_sum


def _train_step(
    objective: nn.Module,
    hyper: OCDHyperNetwork,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    batch: tuple[torch.Tensor, ...],
    procs: Processes,
    report: FitReport,
    step: int,
    micro: int,
    args: FitArgs,
) -> bool:
    """One optimisation step; False when it was skipped (non-finite loss or gradient)."""
    opt, opt_scale = opts
    opt.zero_grad(set_to_none=True)
    opt_scale.zero_grad(set_to_none=True)
    # with several processes, DDP averages the gradients in the (last) backward
    loss, sloss = _accumulate(objective, batch, micro)
    means = procs.all_mean(torch.stack([loss, sloss]))
    if not bool(torch.isfinite(means).all()):  # the same decision on every process
        _nonfinite(
            args, report, f"non-finite loss ({float(means[0])}, scale {float(means[1])})", step
        )
        return False
    gnorm = torch.nn.utils.clip_grad_norm_(hyper.net.parameters(), args.grad_clip)
    snorm = torch.nn.utils.clip_grad_norm_(hyper.scale.parameters(), args.grad_clip)
    if not (torch.isfinite(gnorm) and torch.isfinite(snorm)):  # would poison the weights
        what = f"non-finite gradient (norm {float(gnorm)}, scale {float(snorm)})"
        _nonfinite(args, report, what, step)
        return False
    opt.step()
    if hyper.config.scale == "learned":
        opt_scale.step()
    hyper.update_ema(args.ema_decay)
    report.losses.append(float(means[0]))
    report.scale_losses.append(float(means[1]))
    return True


def fit(
    model: OCDModel,
    store: DeltaStore | str | os.PathLike,
    args: FitArgs | None = None,
    *,
    accelerator: Any = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    **moved: Any,
) -> FitReport:
    """Train the OCD hypernetwork of ``model`` on a collection; ``model`` is ready to predict after.

    Args:
        model: the :class:`OCDModel` the collection was made with.
        store: a :class:`DeltaStore` or its directory.
        args: a :class:`~ocdwrap.FitArgs` (steps, batch size, learning rates, EMA, clipping,
            checkpoint interval, seed); ``FitArgs()`` when not given. Recorded in the report
            (``report.args``) and the checkpoint. On a model loaded with
            ``from_pretrained(is_trainable=True)`` the fit continues from the loaded
            hypernetwork and ``args.steps`` counts the extra steps.
        accelerator: an ``accelerate.Accelerator`` when several processes take part (None: the
            torch.distributed group when one is initialised, else this process alone). Call
            ``fit`` on every process with the same arguments; ``args.batch_size`` is then the
            global minibatch (rounded down to a multiple of the process count).
        device: where to train (default: the base model's device).
        checkpoint_dir: write resumable checkpoints there every ``args.checkpoint_every`` steps
            (from the main process); with ``resume=True`` an existing checkpoint from the same
            setup is continued.

    Returns:
        a :class:`FitReport` with the loss curves.

    Example:
        >>> report = ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=2000, seed=0))
        >>> report.final_loss
    """
    if moved:
        names = ", ".join(f"{k}=" for k in moved)
        raise TypeError(
            f"fit() got {names}: since ocdwrap 0.2.0 the fit settings are a FitArgs, e.g. "
            "fit(model, store, FitArgs(steps=500, batch_size=64, lr=1e-4, seed=0))."
        )
    args = args if args is not None else FitArgs()
    if not isinstance(args, FitArgs):
        raise TypeError(f"fit(args=...) takes an ocdwrap.FitArgs, got {type(args).__name__}.")
    procs = Processes.current(accelerator)
    store = store if isinstance(store, DeltaStore) else DeltaStore(store)
    _check_store(model, store)
    steps = args.steps
    device = torch.device(device) if device is not None else model.device
    target, rho, cond = load_training_data(model, store, device, args.on_nonfinite)
    N = target.shape[0]
    b = _global_batch(args.batch_size, N, procs)
    mine = slice(procs.rank * (b // procs.world), (procs.rank + 1) * (b // procs.world))

    # from_pretrained(is_trainable=True): continue from the loaded hypernetwork
    continued = model.is_trainable and model.hypernet is not None
    if continued:
        hyper = continued_hypernetwork(model, target, cond, store.directory).to(device)
    else:  # the same initial weights on every process
        hyper = new_hypernetwork(model, target, rho, cond, args.seed, held=held_deltas(store))
    hyper.scale.requires_grad_(model.config.scale == "learned")
    opt = torch.optim.Adam(hyper.net.parameters(), lr=args.lr)
    opt_scale = torch.optim.Adam(hyper.scale.parameters(), lr=args.scale_lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    report = FitReport(steps=steps, samples=N, args=args.to_dict())
    checkpoint = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        identity = run_id(model, store, N, args)
        if continued:  # continued: from these weights
            identity["continued_from"] = tensor_fingerprint(*hyper.state_dict().values())
        checkpoint = Checkpoint(checkpoint_dir, identity)
    start = checkpoint.restore(hyper, opt, opt_scale, gen, report) if checkpoint and resume else 0
    objective = _data_parallel(hyper, procs, device)

    hyper.train()
    t0 = time.perf_counter()
    show = progress and procs.is_main
    bar = tqdm(
        range(start, steps), desc="ocdwrap fit", disable=not show, initial=start, total=steps
    )
    draw = _Minibatches(target, rho, cond, b, mine, gen, model.config.num_train_timesteps)
    micro = _micro_batch(hyper, b // procs.world, args.micro_batch_size)
    for step in bar:
        t_step = time.perf_counter()
        if not _train_step(
            objective, hyper, (opt, opt_scale), draw(), procs, report, step, micro, args
        ):
            continue
        if step == start and procs.is_main:
            _warn_if_slow(hyper, device, time.perf_counter() - t_step, steps - start)
        if show and step % 50 == 0:
            bar.set_postfix(
                loss=f"{report.losses[-1]:.4f}", scale_dB=f"{report.scale_losses[-1]:.1f}"
            )
        every = args.checkpoint_every
        if checkpoint and procs.is_main and every and (step + 1) % every == 0:
            checkpoint.save(step + 1, hyper, opt, opt_scale, gen, report)
    bar.close()
    report.seconds = time.perf_counter() - t0
    report.samples_per_second = (steps - start) * b / max(report.seconds, 1e-9)
    hyper.scale.requires_grad_(True)
    hyper.eval()
    model.hypernet = hyper
    model.fit_report = report  # the model card reports it
    return report


SLOW_FIT_SECONDS = 600.0  # a CPU fit of the full-matrix UNet expected to take longer: say so


def _warn_if_slow(hyper: OCDHyperNetwork, device: torch.device, first: float, steps: int) -> None:
    """After the first step, the expected duration of a full-matrix fit on a CPU, and the fix.

    The full-matrix UNet is compute-bound on a CPU (a fit step at the library's defaults on an
    84 x 120 layer: about 30 CPU-seconds, docs/performance.md), so a fit of the default 2,000
    steps would take most of a day there; the low-rank and rank-one generators take minutes.
    """
    if hyper.delta != "full" or device.type != "cpu":
        return
    expected = first * steps
    if expected <= SLOW_FIT_SECONDS:
        return
    logger.warning(
        "ocdwrap fit: the full-matrix UNet on a CPU: the first step took %.1f s, so %d steps "
        "will take about %s. On a CPU use OCDConfig(delta='auto') (rank one where the delta is "
        "rank one, else low-rank factors; minutes), fewer fit_steps, or a GPU (device='cuda').",
        first,
        steps,
        _duration(expected),
    )


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def _nonfinite(args: FitArgs, report: FitReport, what: str, step: int) -> None:
    """Raise, or count the skipped step, as ``args.on_nonfinite`` says."""
    if args.on_nonfinite == "raise":
        raise NonFiniteError(
            f"fit step {step}: {what}; lower the learning rate, or pass "
            "FitArgs(on_nonfinite='skip') to skip such steps."
        )
    report.skipped_steps += 1
