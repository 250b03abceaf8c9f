"""Several processes (``accelerate launch``, ``torchrun``): sharded collection.

:func:`collect_distributed` cuts the training set into one contiguous part per process, at batch
boundaries. Process ``r`` of ``W`` overfits its part with :func:`ocdwrap.collect` into
``out_dir/part-r-of-W/`` (so every part is resumable on its own), and the main process then
writes ``out_dir/manifest.json`` listing every part's shards in data order, each with the index
offset of its part (:func:`ocdwrap.store_writer.merge_parts`). ``DeltaStore(out_dir)`` therefore reads
exactly what a single-process ``collect`` of the same data would have stored: the same rows, in
the same order, with the same sample indices.

Fitting needs nothing special: :func:`ocdwrap.fit` takes ``accelerator=`` and runs under
DistributedDataParallel when more than one process takes part. Both work with an
``accelerate.Accelerator`` or a plain ``torch.distributed`` process group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

from .batches import split_batch
from .collect import _data_fingerprint, collect
from .errors import CollectionExistsError, DistributedError, EmptyDataError
from .io import MANIFEST_NAME, part_name
from .model import OCDModel
from .processes import Processes, run_everywhere
from .store import STOPPED_END, STOPPED_MAX, DeltaStore, remove
from .store_writer import merge_parts

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


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
    shard_size: int = 4096,
    on_nonfinite: str = "skip",
) -> DeltaStore:
    """Collect with every process of the group, each on its own contiguous part of ``data``.

    Call it on every process with the same arguments. Each process writes its own shards under
    ``out_dir/part-R-of-W/``; the main process merges their manifests into ``out_dir``; every
    process returns a :class:`DeltaStore` over ``out_dir`` that equals a single-process
    :func:`ocdwrap.collect` of the same data. ``out_dir`` must be on a file system every
    process sees. An interrupted run resumes each part (with the same number of processes).

    What ``out_dir`` already holds is treated as :func:`ocdwrap.collect` treats it, with one
    difference: a collection stopped at ``max_samples=m`` cannot be continued by several
    processes (each part is cut from the number of samples, so the parts of m samples are not
    the first parts of more). A later call asking for more than m is refused with an error that
    says so (pass ``max_samples=m`` to use it, ``overwrite=True`` to collect again, or continue
    it on one process with :func:`ocdwrap.collect`); a call asking for m or fewer returns it.

    Args:
        model: the :class:`OCDModel`, on this process's device (``model.to(accelerator.device)``).
        data: a DataLoader with a fixed order (``shuffle=False``), or a map-style Dataset with
            ``batch_size`` (and ``collate_fn``).
        loss_fn: per-sample loss, as for :func:`ocdwrap.collect`.
        out_dir: the collection directory.
        accelerator: an ``accelerate.Accelerator``; None uses torch.distributed when initialised.
        max_samples: collect the first ``max_samples`` samples only.
        overwrite: replace a different collection found in ``out_dir`` or in a part.
        shard_size, on_nonfinite: as in :func:`ocdwrap.collect`.

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
            shard_size=shard_size,
            on_nonfinite=on_nonfinite,
        )
    out_dir = os.fspath(out_dir)
    dataset, bs, collate, workers, len_all = _as_dataset(data, batch_size, collate_fn)
    n = len_all if max_samples is None else min(len_all, max_samples)
    if n == 0:
        raise EmptyDataError("collect_distributed got an empty dataset.")
    stopped = STOPPED_MAX if n < len_all else STOPPED_END
    parts = partition(n, bs, procs.world)

    def first_batch_fingerprint() -> str:
        loader = DataLoader(Subset(dataset, range(min(bs, n))), batch_size=bs, collate_fn=collate)
        return _data_fingerprint(split_batch(next(iter(loader)))[0])

    def prepare() -> bool:
        if not procs.is_main:
            return False
        return _clear_root(out_dir, procs.world, overwrite, n, first_batch_fingerprint)

    held = run_everywhere(procs, "Preparing the collection directory", prepare)
    if procs.any(bool(held)):  # it already holds the n samples asked for (and maybe more)
        procs.barrier()
        return DeltaStore(out_dir)
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
            shard_size=shard_size,
            on_nonfinite=on_nonfinite,
        )

    run_everywhere(procs, "Collection", collect_part)
    procs.barrier()
    run_everywhere(
        procs,
        "Merging the parts",
        lambda: merge_parts(out_dir, parts, procs.world, stopped) if procs.is_main else None,
    )
    procs.barrier()
    return DeltaStore(out_dir)


def _clear_root(
    out_dir: str, world: int, overwrite: bool, n: int, fingerprint: Callable[[], str]
) -> bool:
    """Make ``out_dir`` ready for a merged manifest of ``world`` parts covering ``n`` samples;
    True when it already holds a complete collection of at least those samples (of the same
    data: ``fingerprint()`` is its first batch's)."""
    if not os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        return False
    store = DeltaStore(out_dir)
    manifest = store.manifest
    if manifest.get("world_size") == world and not overwrite:
        held = store.positions
        if not store.complete or n == held:
            return False  # our own merged manifest (a rerun or a resume): the parts decide
        if n < held:  # holds more than asked, as ocdwrap.collect returns it
            if fingerprint() != manifest["data_fingerprint"]:
                raise CollectionExistsError(
                    f"{out_dir} holds a collection made from different data (its first batch "
                    "differs: a shuffled loader?); it was left untouched. Use another out_dir, "
                    "or pass overwrite=True to replace it."
                )
            return True
        if store.stopped != STOPPED_END:
            why = (
                "stopped at max_samples"
                if store.stopped == STOPPED_MAX
                else "written by ocdwrap 0.1.0, which did not record whether max_samples stopped it"
            )
            raise CollectionExistsError(
                f"{out_dir} holds a collection of the first {held} samples by {world} processes "
                f"({why}), and {n} were asked for. Several processes cannot continue it: each "
                f"part is cut from the number of samples. Pass max_samples={held} to use it, "
                "overwrite=True to collect the whole range again, or continue it on one process "
                "with ocdwrap.collect(model, data, loss_fn, out_dir)."
            )
        return False  # more data than the whole collection saw: the parts refuse it
    if manifest.get("world_size") == world:
        return False  # overwrite=True: each part replaces its own collection
    if not overwrite:
        raise CollectionExistsError(
            f"{out_dir} already holds a collection written by "
            f"{manifest.get('world_size', 1)} process(es); it was left untouched. Use another "
            f"out_dir, or pass overwrite=True to replace it with this {world}-process one."
        )
    remove(out_dir)


def is_distributed(accelerator: Any = None) -> bool:
    """True when more than one process takes part (an Accelerator's, or torch.distributed's)."""
    return Processes.current(accelerator).world > 1


__all__ = [
    "DistributedError",
    "Processes",
    "collect_distributed",
    "is_distributed",
    "merge_parts",
    "part_name",
    "partition",
]
