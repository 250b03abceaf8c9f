"""``collect()``: overfit the target layer on every training sample and store the deltas.

The loop is: batch -> :func:`ocdwrap.overfit.overfit_batch` (every sample of the batch overfitted
alone, vectorized) -> per-sample rows (normalised delta, rank-one factors or low-rank factors, rho,
conditioning, energy) -> :class:`ocdwrap.store.StoreWriter`, which owns the on-disk format, resumption and
crash safety.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import batch_size, check_inputs, map_tensors, split_batch, to_device
from .config import OCDConfig, collection_identity
from .deltas import (
    LOWRANK_KEYS,
    delta_scale,
    lowrank_factors,
    rank1_energy,
    rank1_factors,
    scale_from_sums,
    top_singular_energy,
)
from .errors import ConfigError, EmptyDataError, NonFiniteError, UnsupportedLayerError
from .io import directory_lock, tensor_fingerprint
from .model import OCDModel
from .overfit import (
    ADAM_OUTER_FORMULA,
    ADAM_OUTER_FORMULA_V1,
    OverfitResult,
    overfit_batch,
    overfit_one,
)
from .store import STOPPED_END, STOPPED_MAX, DeltaStore
from .store_writer import StoreWriter

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]

__all__ = ["collect", "overfit_batch", "overfit_one"]

# how the stored rows' rho and rank-one energy are evaluated, as a collection records it in its
# identity: "sums" takes both from each delta's sum and sum of squares (one pass each, shared
# with the finite check) and brackets the energy at the known right factor before iterating;
# "two-pass" (collections made before the record: none) is delta_scale's centred passes and one
# power iteration. They agree to about 1e-6 but not bit for bit: a collection is never a mix.
ROWS_FORMULA = "sums"
ROWS_FORMULA_V1 = "two-pass"


def _identity(model: OCDModel, cfg: OCDConfig, shard_size: int) -> dict[str, Any]:
    """What a collection depends on: a stored one is resumed only when this is unchanged (the
    config's part is what its fields' ``collection`` metadata names)."""
    identity = {
        "layer": model.layer_name,
        "layer_kind": model.layer_kind,
        "weight_shape": list(model.weight_shape),
        "fingerprint": model.layer_fingerprint(),
        **collection_identity(cfg),
        "store_full": cfg.delta == "full",
        "shard_size": shard_size,
    }
    # Adam on a Linear layer: the closed-form step rounds differently from 0.1.0's formula, so a
    # collection records which one made it and is continued with that one, never a mix (recorded
    # for every Linear target: whether its input is one vector per sample shows only later). A
    # collection made by 0.1.0 records none: StoreWriter.open leaves the key out when it resumes
    # one, and it is continued with 0.1.0's formula.
    if model.layer_kind == "linear" and cfg.overfit_optimizer == "adam":
        identity["adam_outer_formula"] = ADAM_OUTER_FORMULA
    identity["rows_formula"] = ROWS_FORMULA
    return identity


def _maybe_lowrank(cfg: OCDConfig) -> bool:
    return cfg.delta in ("lowrank", "auto")


def _data_fingerprint(inputs: Any) -> str:
    found: list[torch.Tensor] = []
    map_tensors(inputs, lambda t: found.append(t) or t)
    return tensor_fingerprint(*(t[:4] for t in found))


def _positioned(data: Iterable, device: torch.device) -> Iterator[tuple[int, Any, Any]]:
    """(position of the batch's first sample, inputs, target) for every non-empty batch."""
    position = 0
    for batch in data:
        inputs, target = split_batch(batch)
        inputs, target = to_device(inputs, device), to_device(target, device)
        B = batch_size(inputs)
        if B == 0:
            continue
        yield position, inputs, target
        position += B


def _layout(model: OCDModel, cfg: OCDConfig, res: OverfitResult) -> dict[str, Any]:
    """What the store records once the first batch is overfitted: rank-one storage, widths, keys."""
    is_linear = model.layer_kind == "linear"
    B = res.delta.shape[0]
    # one input vector per sample (not B·T flattened token rows): the delta is rank one
    vector_input = is_linear and res.layer_input.dim() == 2 and res.layer_input.shape[0] == B
    if cfg.delta == "rank1" and not vector_input:
        raise UnsupportedLayerError(
            "delta='rank1' needs a Linear target on vector inputs (one input vector per sample); "
            f"this layer is a {model.layer_kind} whose input has shape {tuple(res.layer_input.shape)}, "
            "so its delta has higher rank. Use delta='lowrank' (or 'auto'), or delta='full'."
        )
    lowrank = cfg.delta == "lowrank" or (cfg.delta == "auto" and not vector_input)
    keys = ["index", "rho", "cond_in", "cond_act", "cond_out"]
    keys += (["energy"] if is_linear else []) + (["delta"] if cfg.delta == "full" else [])
    keys += ["u", "v"] if vector_input else []
    keys += [*LOWRANK_KEYS, "lowrank_energy"] if lowrank else []
    dims = {"cond_in": res.cond.dims[0], "cond_act": res.cond.dims[1], "cond_out": res.cond.dims[2]}
    return {"store_rank1": vector_input, "dims": dims, "keys": keys}


def _rows(
    res: OverfitResult,
    cfg: OCDConfig,
    first: int,
    keys: list[str],
    rank: int = 0,
    formula: str = ROWS_FORMULA,
) -> dict[str, torch.Tensor]:
    """The stored rows of every sample of one batch (same arithmetic whatever is kept);
    ``formula``: :data:`ROWS_FORMULA`, or :data:`ROWS_FORMULA_V1` to continue a collection
    made before it."""
    delta = res.delta  # (B, out, in) or (B, out, in, kh, kw)
    B = delta.shape[0]
    row_sum = res.delta_sum
    if not bool(res.finite.all()):  # those rows are dropped; zeros keep the SVD path finite
        delta = delta.masked_fill(~res.finite.view(B, *([1] * (delta.dim() - 1))), 0.0)
        row_sum = None if row_sum is None else row_sum.masked_fill(~res.finite, 0.0)
    flat = delta.reshape(B, -1)
    total = None  # ‖Δ‖²_F per row, with the "sums" formula
    if formula == ROWS_FORMULA_V1:
        rho = delta_scale(flat, cfg.delta_normalization)  # (B,)
    else:
        total = torch.linalg.vecdot(flat, flat)
        row_sum = flat.sum(1) if row_sum is None else row_sum
        rho = scale_from_sums(flat, cfg.delta_normalization, row_sum, total)  # (B,)
    rows = {"index": torch.arange(first, first + B, dtype=torch.int64), "rho": rho}
    rows.update(res.cond.as_dict())
    if "u" in keys:
        u, v = rank1_factors(delta, res.layer_input, cfg.overfit_optimizer)
        rows["u"], rows["v"] = u / rho.unsqueeze(1), v
    if "energy" in keys:  # from v, the near-top right singular vector, when it is known
        if "u" in keys:  # u = Δv / ‖v‖²: Δv is not computed again
            rows["energy"] = rank1_energy(delta, v, u * v.square().sum(1, keepdim=True), total)
        else:
            rows["energy"] = top_singular_energy(delta, total=total)
    if "delta" in keys:
        rows["delta"] = (delta / rho.view(B, *([1] * (delta.dim() - 1)))).reshape(
            B, delta.shape[1], -1
        )  # (B, out, in·kh·kw)
    if "lowrank_u" in keys:  # the factors of delta / rho: s_k scaled, u_k and v_k unit vectors
        u, s, v, energy = lowrank_factors(delta, rank)  # (B, r, out), (B, r), (B, r, in'), (B,)
        rows.update(lowrank_u=u, lowrank_s=s / rho.unsqueeze(1), lowrank_v=v)
        rows["lowrank_energy"] = energy
    return rows


def _dataset_size(data: Iterable, max_samples: int | None) -> int | None:
    try:
        total = len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        total = None
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples
    return total


def collect(
    model: OCDModel,
    data: Iterable,
    loss_fn: LossFn,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_samples: int | None = None,
    progress: bool = True,
    shard_size: int = 4096,
    on_nonfinite: str = "skip",
) -> DeltaStore:
    """Overfit the target layer on every training sample and store the deltas on disk.

    What is already in ``out_dir`` is reused, never passed off as more than it is:

    - an interrupted collection is resumed after its last intact shard (a shard that is missing
      or fails its checksum is rebuilt, with every shard after it);
    - a collection stopped at ``max_samples=m`` holds the first m samples: a later call with a
      larger ``max_samples``, or with none, *continues* it from sample m to the new limit or to
      the end of the data; a call with ``max_samples <= m`` returns it at once (holding m);
    - a collection of the whole data is returned at once, whatever ``max_samples`` asks;
    - a collection written by ocdwrap 0.1.0 (which did not record whether ``max_samples``
      stopped it) is continued as far as the data goes, which re-reads the data but overfits
      only samples it does not hold.

    ``store.stopped`` says which: ``"end_of_data"`` or ``"max_samples"``. Every call reads the
    first batch and refuses a directory collected from other data (or another base model or
    config) unless ``overwrite=True``. While a call runs, the directory is locked: another
    process collecting into it is refused at once (:class:`~ocdwrap.errors.CollectionBusyError`).

    Args:
        model: an :class:`OCDModel` (see :func:`ocdwrap.wrap`).
        data: batches ``(inputs, target)`` or HF dicts with ``"labels"``, in a fixed order
            (do not shuffle: resumption skips the samples already stored).
        loss_fn: ``loss_fn(prediction, target)`` -> per-sample losses (B,) or their sum.
        out_dir: collection directory (see above for what it may already hold).
        overwrite: replace a collection of other data, base model or config.
        max_samples: collect the first ``max_samples`` samples only.
        shard_size: samples per safetensors shard; a shard is the unit of resumption (part of
            the collection's identity: continue a collection with the size it was made with).
        on_nonfinite: samples with NaN/Inf in inputs, losses or deltas: ``"skip"`` them (the
            manifest counts them) or ``"raise"``.

    Returns:
        a :class:`DeltaStore` over ``out_dir``.

    Example:
        >>> store = ocdwrap.collect(model, train_loader, nn.CrossEntropyLoss(reduction="none"), "deltas/")
    """
    cfg = model.config
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(
            f"collect(shard_size={shard_size!r}): the samples per shard, an int >= 1."
        )
    if on_nonfinite not in ("skip", "raise"):
        raise ConfigError(f"collect(on_nonfinite={on_nonfinite!r}): choose 'skip' or 'raise'.")
    # a delta_rank the layer cannot have fails here, before any sample is overfitted
    rank = cfg.lowrank_rank(model.weight_shape, model.layer_name) if _maybe_lowrank(cfg) else 0
    out_dir = os.fspath(out_dir)
    with directory_lock(out_dir):
        writer = StoreWriter.open(
            out_dir, _identity(model, cfg, shard_size), shard_size=shard_size, overwrite=overwrite
        )
        return _collect(
            model, data, loss_fn, writer, cfg, rank, max_samples, progress, on_nonfinite
        )


def _collect(
    model: OCDModel,
    data: Iterable,
    loss_fn: LossFn,
    writer: StoreWriter,
    cfg: OCDConfig,
    rank: int,
    max_samples: int | None,
    progress: bool,
    on_nonfinite: str,
) -> DeltaStore:
    bar = None
    checked_loss = False
    stopped, end = STOPPED_END, 0
    workspace: dict = {}  # overfit_batch's (B, out, in) buffers, reused batch after batch
    for lo, inputs, target in _positioned(data, model.device):
        B = batch_size(inputs)
        if lo == 0:  # refuses other data, also where the collection is complete
            writer.begin(_data_fingerprint(inputs), cfg.to_dict())
            if writer.holds(max_samples):
                return writer.store()
            writer.reopen()  # continued past where a complete collection stopped
            done = writer.done
            bar = tqdm(
                total=_dataset_size(data, max_samples),
                initial=done,
                desc="ocdwrap collect",
                unit="sample",
                disable=not progress,
            )
        if max_samples is not None and lo >= max_samples:
            stopped = STOPPED_MAX
            break
        end = lo + B if max_samples is None else min(lo + B, max_samples)
        if lo + B <= done:
            continue
        keep = slice(max(done - lo, 0), B if max_samples is None else min(B, max_samples - lo))
        check_inputs(inputs, model.device)
        # always the whole batch, even when only part of it is kept (a resume point or max_samples
        # inside it): kernels may round differently for another batch size, and a resumed
        # collection must store exactly what an uninterrupted one stores
        res = overfit_batch(
            model,
            inputs,
            target,
            loss_fn,
            config=cfg,
            check_loss=not checked_loss,
            adam_formula=writer.identity.get("adam_outer_formula", ADAM_OUTER_FORMULA_V1),
            workspace=workspace,
            loss_after=False,  # only the deltas are stored
        )
        checked_loss = True
        in_range = torch.zeros(B, dtype=torch.bool, device=res.finite.device)
        in_range[keep] = True
        bad = (~res.finite & in_range).nonzero().flatten().add(lo).tolist()
        if bad and on_nonfinite == "raise":
            raise NonFiniteError(
                f"NaN/Inf in inputs, losses or deltas for samples {bad[:10]}; fix the data or pass "
                "collect(..., on_nonfinite='skip') to skip and count them."
            )
        if not writer.described:
            layout = _layout(model, cfg, res)
            writer.describe(**layout)
        kept = (res.finite & in_range).nonzero().flatten()
        rows = None
        if kept.numel():
            formula = writer.identity.get("rows_formula", ROWS_FORMULA_V1)
            rows = _rows(res, cfg, lo, writer.manifest["keys"], rank, formula)
            if kept.numel() < B:
                rows = {k: t[kept.to(t.device)] for k, t in rows.items()}
        writer.append(rows, skipped=bad)
        bar.update(keep.stop - keep.start)
        if max_samples is not None and lo + B >= max_samples:
            stopped = STOPPED_MAX
            break
    if bar is None:
        raise EmptyDataError(
            "collect() got no samples from the data loader; check that it is not empty."
        )
    bar.close()
    return writer.close(positions=end, stopped=stopped)
