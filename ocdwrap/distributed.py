"""Several processes (``accelerate launch``, ``torchrun``): sharded collection and data-parallel fitting.

:func:`collect_distributed` cuts the training set into one contiguous part per process, at batch
boundaries. Process ``r`` of ``W`` overfits its part with :func:`ocdwrap.collect` into
``out_dir/part-r-of-W/`` (so every part is resumable on its own), and the main process then
writes ``out_dir/manifest.json`` listing every part's shards in data order, each with the index
offset of its part. ``DeltaStore(out_dir)`` therefore reads exactly what a single-process
``collect`` of the same data would have stored: the same rows, in the same order, with the same
sample indices.

:func:`fit_distributed` trains the hypernetwork with ``DistributedDataParallel``. Every process
holds the collection and draws the same global minibatch (from ``seed``); each trains on its
slice and DDP averages the gradients, so after every step all processes hold the same weights,
and those are the weights :func:`ocdwrap.fit` reaches on one process with the same seed (up to
float rounding).

Both work with an ``accelerate.Accelerator`` or a plain ``torch.distributed`` process group,
and fall back to the single-process functions when there is only one process.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset
from tqdm.auto import tqdm

from .capture import Conditioning
from .collect import _summary, collect
from .diffusion import make_scheduler
from .errors import CollectionExistsError, EmptyDataError, NonFiniteError, OCDError
from .fit import FitReport, _check_store, load_training_data, new_hypernetwork
from .hypernet import OCDHyperNetwork
from .io import atomic_write_json
from .model import OCDModel
from .store import MANIFEST_NAME, STORE_FORMAT, STORE_VERSION, DeltaStore

logger = logging.getLogger("ocdwrap")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


class DistributedError(OCDError, RuntimeError):
    """A multi-process collection or fit failed on some process, or the processes disagree."""


# --- the process group ------------------------------------------------------------------------------


@dataclass
class Processes:
    """Who this process is: ``rank`` of ``world`` (from an Accelerator or torch.distributed)."""

    rank: int
    world: int
    accelerator: Any = None

    @classmethod
    def current(cls, accelerator: Any = None) -> Processes:
        """The process group of ``accelerator``, else torch.distributed's, else a single process."""
        if accelerator is not None:
            return cls(accelerator.process_index, accelerator.num_processes, accelerator)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        else:
            dist.barrier()

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over processes of a small float tensor."""
        if self.world == 1:
            return values
        t = values.detach().to(self._device(), torch.float64)
        dist.all_reduce(t)
        return (t / self.world).to(values.device, values.dtype)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _run_everywhere(procs: Processes, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every process; if it fails on any, every process raises (none hangs)."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # re-raised below, after the others know
        error = e
    if procs.any(error is not None):
        if error is not None:
            raise error
        raise DistributedError(
            f"{what} failed on another process; its log has the error. Nothing was merged; "
            "fix the cause and run again (finished parts are resumed)."
        )
    return result


# --- collection ----------------------------------------------------------------------------------


def part_name(rank: int, world: int) -> str:
    """The sub-directory of process ``rank``'s shards: ``part-00001-of-00004``."""
    return f"part-{rank:05d}-of-{world:05d}"


def partition(n: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` sample ranges, one per process, cut at batch boundaries.

    Example:
        >>> partition(10, 4, 2)
        [(0, 8), (8, 10)]
    """
    batches = math.ceil(n / batch_size)
    per = math.ceil(batches / world)
    return [
        (min(r * per * batch_size, n), min((r + 1) * per * batch_size, n)) for r in range(world)
    ]


def _as_dataset(
    data: DataLoader | Dataset, batch_size: int | None, collate_fn: Callable | None
) -> tuple[Dataset, int, Callable | None, int, bool]:
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise TypeError(
                "collect_distributed needs a DataLoader built with batch_size= (not a batch_sampler), "
                "so that every process can cut its part at batch boundaries."
            )
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"collect_distributed needs the samples in a fixed order, but this DataLoader uses a "
                f"{type(data.sampler).__name__} (shuffle=True?). Build it with shuffle=False."
            )
        dataset, bs = data.dataset, batch_size or data.batch_size
        collate, workers, drop_last = data.collate_fn, data.num_workers, data.drop_last
    else:
        if batch_size is None:
            raise TypeError(
                "collect_distributed got a Dataset without batch_size=; pass batch_size (and "
                "collate_fn if the samples need one), or pass a DataLoader."
            )
        dataset, bs, collate, workers, drop_last = data, batch_size, collate_fn, 0, False
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            "collect_distributed needs a map-style dataset with len() to cut it into parts; an "
            "IterableDataset cannot be split without reading it. Collect with ocdwrap.collect on one "
            "process, or give each process its own part of the data and merge with merge_parts()."
        )
    n = len(dataset)
    if drop_last:
        n = (n // bs) * bs
    return dataset, bs, collate, workers, n


def collect_distributed(
    model: OCDModel,
    data: DataLoader | Dataset,
    loss_fn: LossFn,
    out_dir: str | os.PathLike,
    *,
    accelerator: Any = None,
    batch_size: int | None = None,
    collate_fn: Callable | None = None,
    max_samples: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DeltaStore:
    """Collect with every process of the group, each on its own contiguous part of ``data``.

    Call it on every process with the same arguments. Each process writes its own shards under
    ``out_dir/part-R-of-W/``; the main process merges their manifests into ``out_dir``; every
    process returns a :class:`DeltaStore` over ``out_dir`` that equals a single-process
    :func:`ocdwrap.collect` of the same data. ``out_dir`` must be on a file system every
    process sees. An interrupted run resumes each part (with the same number of processes).

    Args:
        model: the :class:`OCDModel`, on this process's device (``model.to(accelerator.device)``).
        data: a DataLoader with a fixed order (``shuffle=False``), or a map-style Dataset with
            ``batch_size`` (and ``collate_fn``).
        loss_fn: per-sample loss, as for :func:`ocdwrap.collect`.
        out_dir: the collection directory.
        accelerator: an ``accelerate.Accelerator``; None uses torch.distributed when initialised.
        max_samples: collect the first ``max_samples`` samples only.
        overwrite: replace a different collection found in ``out_dir`` or in a part.

    Example:
        >>> accelerator = Accelerator()
        >>> model = ocdwrap.wrap(base, layer="fc2").to(accelerator.device)
        >>> store = collect_distributed(model, train_loader, loss, "deltas/", accelerator=accelerator)
    """
    procs = Processes.current(accelerator)
    if procs.world == 1:
        return collect(
            model,
            data,
            loss_fn,
            out_dir,
            overwrite=overwrite,
            max_samples=max_samples,
            progress=progress,
        )
    out_dir = os.fspath(out_dir)
    dataset, bs, collate, workers, n = _as_dataset(data, batch_size, collate_fn)
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise EmptyDataError("collect_distributed got an empty dataset.")
    parts = partition(n, bs, procs.world)

    def prepare() -> None:
        if procs.is_main:
            _clear_root(out_dir, procs.world, overwrite)

    _run_everywhere(procs, "Preparing the collection directory", prepare)
    procs.barrier()

    lo, hi = parts[procs.rank]

    def collect_part() -> None:
        if lo >= hi:  # more processes than batches: nothing to do here
            return
        loader = DataLoader(
            Subset(dataset, range(lo, hi)), batch_size=bs, collate_fn=collate, num_workers=workers
        )
        collect(
            model,
            loader,
            loss_fn,
            os.path.join(out_dir, part_name(procs.rank, procs.world)),
            overwrite=overwrite,
            progress=progress and procs.is_main,
        )

    _run_everywhere(procs, "Collection", collect_part)
    procs.barrier()
    _run_everywhere(
        procs,
        "Merging the parts",
        lambda: merge_parts(out_dir, parts, procs.world) if procs.is_main else None,
    )
    procs.barrier()
    return DeltaStore(out_dir)


def _clear_root(out_dir: str, world: int, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a merged manifest of ``world`` parts."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return
    manifest = DeltaStore(out_dir).manifest
    if manifest.get("world_size") == world:
        return  # our own merged manifest (a rerun or a resume): the parts decide
    if not overwrite:
        raise CollectionExistsError(
            f"{out_dir} already holds a collection written by "
            f"{manifest.get('world_size', 1)} process(es); it was left untouched. Use another "
            f"out_dir, or pass overwrite=True to replace it with this {world}-process one."
        )
    for s in manifest["shards"]:
        p = os.path.join(out_dir, s["file"])
        if os.path.exists(p):
            os.unlink(p)
    for f in os.listdir(out_dir):
        if f.startswith("part-") and os.path.isdir(os.path.join(out_dir, f)):
            shutil.rmtree(os.path.join(out_dir, f))
    os.unlink(path)


def merge_parts(out_dir: str | os.PathLike, parts: list[tuple[int, int]], world: int) -> dict:
    """Write ``out_dir/manifest.json`` listing the shards of every part, in data order.

    ``parts[r]`` is the ``[start, stop)`` sample range process ``r`` collected into
    ``out_dir/part-r-of-world/``. Returns the merged manifest.
    """
    out_dir = os.fspath(out_dir)
    merged: dict[str, Any] | None = None
    first_identity = None
    for rank, (lo, hi) in enumerate(parts):
        if lo >= hi:
            continue
        name = part_name(rank, world)
        part = DeltaStore(os.path.join(out_dir, name)).manifest
        if not part.get("complete"):
            raise DistributedError(
                f"Part {name} of {out_dir} is incomplete; run the collection again."
            )
        held = sum(s["count"] for s in part["shards"]) + int(part.get("skipped", 0))
        if held != hi - lo:
            raise DistributedError(
                f"Part {name} of {out_dir} holds {held} samples but covers samples [{lo}, {hi}) "
                "of the data now; the data changed since it was collected. Collect again with "
                "overwrite=True."
            )
        if first_identity is None:
            first_identity = part["identity"]
            merged = {
                "format": STORE_FORMAT,
                "version": STORE_VERSION,
                "identity": part["identity"],
                "data_fingerprint": part["data_fingerprint"],
                "config": part["config"],
                "dims": part["dims"],
                "keys": part["keys"],
                "shards": [],
                "skipped": 0,
                "complete": False,
                "world_size": world,
                "parts": [],
            }
        elif part["identity"] != first_identity:
            raise DistributedError(
                f"The processes hold different base models or configs: part {name} has layer "
                f"{part['identity']['layer']!r}, fingerprint {part['identity']['fingerprint']}; part 0 has "
                f"{first_identity['layer']!r}, {first_identity['fingerprint']}. Load the same weights on "
                "every process (e.g. from one checkpoint) before wrapping."
            )
        assert merged is not None
        for s in part["shards"]:
            merged["shards"].append(
                {
                    "file": f"{name}/{s['file']}",
                    "count": s["count"],
                    "start": s["start"] + lo,
                    "stop": s["stop"] + lo,
                    "index_offset": lo,
                }
            )
        merged["skipped"] += int(part.get("skipped", 0))
        merged["parts"].append({"dir": name, "start": lo, "stop": hi})
    if merged is None:
        raise EmptyDataError(f"No part of {out_dir} holds any sample.")
    merged["summary"] = _summary(out_dir, merged)
    merged["complete"] = True
    atomic_write_json(os.path.join(out_dir, MANIFEST_NAME), merged)
    return merged


# --- fitting -------------------------------------------------------------------------------------


class _Objective(nn.Module):
    """The fit loss of one minibatch slice, as a module DDP can wrap."""

    def __init__(self, hyper: OCDHyperNetwork, alphas_cumprod: torch.Tensor, learned_scale: bool):
        super().__init__()
        self.hyper = hyper
        self.learned_scale = learned_scale
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def forward(self, target, cin, cact, cout, rho, t, noise):
        c = Conditioning(cin, cact, cout)
        loss = self.hyper.generator_loss(target, c, t, noise, self.alphas_cumprod)
        sloss = self.hyper.scale_loss(rho, c) if self.learned_scale else loss.new_zeros(())
        return loss, sloss


def fit_distributed(
    model: OCDModel,
    store: DeltaStore | str | os.PathLike,
    *,
    accelerator: Any = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FitReport:
    """Fit the hypernetwork with DistributedDataParallel over every process of the group.

    Call it on every process with the same arguments; afterwards every process's ``model``
    holds the same fitted hypernetwork (save it from the main process only). ``batch_size``
    (default ``config.fit_batch_size``) is the global minibatch: each of the W processes trains
    on ``batch_size / W`` samples per step, and the result equals :func:`ocdwrap.fit` with the
    same seed on one process up to float rounding. A batch size that W does not divide is
    rounded down to a multiple of W. With one process this is :func:`ocdwrap.fit`'s loop.
    Every process loads the whole collection (its conditioning and normalised deltas).
    Resumable checkpoints are not written (use :func:`ocdwrap.fit` for those).

    Example:
        >>> report = fit_distributed(model, "deltas/", accelerator=accelerator)
        >>> if accelerator.is_main_process:
        ...     model.save_pretrained("adapter/")
    """
    procs = Processes.current(accelerator)
    if not isinstance(store, DeltaStore):
        store = DeltaStore(store)
    _check_store(model, store)
    cfg = model.config
    steps = int(steps or cfg.fit_steps)
    device = model.device
    target, rho, cond = load_training_data(model, store, device)
    N = target.shape[0]
    b = min(int(batch_size or cfg.fit_batch_size), N)
    if b % procs.world:
        b = max(b - b % procs.world, procs.world)
        if procs.is_main:
            logger.warning(
                "ocdwrap fit_distributed: global batch rounded to %d (a multiple of %d)",
                b,
                procs.world,
            )
    per = b // procs.world
    sl = slice(procs.rank * per, (procs.rank + 1) * per)

    hyper = new_hypernetwork(model, target, rho, cond, seed)  # the same on every process
    learned = cfg.scale == "learned"
    hyper.scale.requires_grad_(learned)
    opt = torch.optim.Adam(hyper.net.parameters(), lr=lr or cfg.fit_lr)
    opt_scale = torch.optim.Adam(hyper.scale.parameters(), lr=cfg.scale_lr)
    alphas = make_scheduler(cfg).alphas_cumprod.to(device=device, dtype=torch.float32)
    objective: nn.Module = _Objective(hyper, alphas, learned)
    if procs.world > 1:
        ddp = nn.parallel.DistributedDataParallel
        # the statistics buffers are computed identically on every process: no per-step sync
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False}
        )
        objective = ddp(
            objective, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
        )
    gen = torch.Generator(device=device).manual_seed(seed)
    report = FitReport(steps=steps, samples=N)

    hyper.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="ocdwrap fit (DDP)", disable=not (progress and procs.is_main))
    for step in bar:
        # the global minibatch, drawn identically everywhere; this process takes its slice
        idx = torch.randint(0, N, (b,), generator=gen, device=device)
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen, device=device)
        noise = torch.randn((b, *target.shape[1:]), generator=gen, device=device)
        i = idx[sl]
        c = cond.index(i)
        loss, sloss = objective(
            target[i], c.layer_input, c.layer_output, c.model_output, rho[i], t[sl], noise[sl]
        )
        means = procs.all_mean(torch.stack([loss.detach(), sloss.detach()]))
        if not bool(torch.isfinite(means).all()):  # the same decision on every process
            if cfg.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"fit step {step}: non-finite loss; lower the learning rate, or pass "
                    "OCDConfig(on_nonfinite='skip') to skip such steps."
                )
            report.skipped_steps += 1
            continue
        opt.zero_grad(set_to_none=True)
        opt_scale.zero_grad(set_to_none=True)
        (loss + sloss).backward()  # DDP averages the gradients over processes here
        gnorm = torch.nn.utils.clip_grad_norm_(hyper.net.parameters(), cfg.grad_clip)
        snorm = (
            torch.nn.utils.clip_grad_norm_(hyper.scale.parameters(), cfg.grad_clip)
            if learned
            else gnorm.new_zeros(())
        )
        if not (torch.isfinite(gnorm) and torch.isfinite(snorm)):  # identical gradients everywhere
            if cfg.on_nonfinite == "raise":
                raise NonFiniteError(f"fit step {step}: non-finite gradient norm {float(gnorm)}.")
            report.skipped_steps += 1
            continue
        opt.step()
        if learned:
            opt_scale.step()
        hyper.update_ema(cfg.ema_decay)
        report.losses.append(float(means[0]))
        report.scale_losses.append(float(means[1]))
        if progress and procs.is_main and step % 50 == 0:
            bar.set_postfix(loss=f"{report.losses[-1]:.4f}")
    bar.close()
    report.seconds = time.perf_counter() - t0
    report.samples_per_second = steps * b / max(report.seconds, 1e-9)
    hyper.scale.requires_grad_(True)
    hyper.eval()
    model.hypernet = hyper
    return report


def is_distributed(accelerator: Any = None) -> bool:
    """True when more than one process takes part (an Accelerator's, or torch.distributed's)."""
    return Processes.current(accelerator).world > 1


__all__ = [
    "DistributedError",
    "Processes",
    "collect_distributed",
    "fit_distributed",
    "is_distributed",
    "merge_parts",
    "part_name",
    "partition",
]
