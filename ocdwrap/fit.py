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
import json
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
from .config import FitArgs, OCDConfig, results_fields
from .deltas import LOWRANK_KEYS
from .errors import BaseModelMismatchError, CorruptFileError, EmptyDataError, NonFiniteError
from .hypernet import OCDHyperNetwork, pack_lowrank
from .io import (
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    atomic_save_tensors_digest,
    atomic_write_json,
    checkpoint_tensors_name,
    read_json,
    read_verified,
    tensor_fingerprint,
    tensors_from_bytes,
)
from .model import OCDModel
from .processes import Processes
from .store import DeltaStore

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


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    meta[prefix] = sd["param_groups"]


def _restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta[prefix]})


MAX_NORMALISED_RMS = 100.0  # a normalised delta larger than this is degenerate (see below)


def _held(store: DeltaStore) -> dict[str, int]:
    """What a collection holds: {parameterisation: rank} (0 for the full matrix)."""
    keys, ident = store.keys, store.manifest["identity"]
    held: dict[str, int] = {}
    if "delta" in keys:
        held["full"] = 0
    if "u" in keys:
        held["rank1"] = 1
    if "lowrank_u" in keys:
        made = OCDConfig(delta=ident["delta"], delta_rank=ident["delta_rank"])
        held["lowrank"] = made.lowrank_rank(tuple(ident["weight_shape"]))
    return held


def resolve_delta(model: OCDModel, store: DeltaStore) -> tuple[str, int]:
    """The parameterisation (and rank) ``model``'s config asks of ``store``; an error if absent.

    ``delta="auto"`` asks for rank1 where the collection holds the exact rank-one factors (a
    Linear on one vector per sample), else lowrank with ``delta_rank`` capped at the layer's size.
    A collection made with another ``delta`` (or another rank) is a
    :class:`BaseModelMismatchError` naming both and the fix, never a silent substitute.

    Example:
        >>> resolve_delta(ocdwrap.wrap(lenet, "conv2", OCDConfig(delta="auto")), store)
        ('lowrank', 4)
    """
    cfg, held = model.config, _held(store)
    want = cfg.delta
    if want == "auto":
        want = "rank1" if "rank1" in held else "lowrank"
    if want == "lowrank":
        rank = cfg.lowrank_rank(model.weight_shape, model.layer_name)
    else:
        rank = 1 if want == "rank1" else 0
    if held.get(want) == rank:
        return want, rank
    has = ", ".join(f"lowrank rank {r}" if k == "lowrank" else k for k, r in held.items())
    asks = f"lowrank rank {rank}" if want == "lowrank" else want
    made = store.manifest["identity"].get("delta") or ("full" if "full" in held else "rank1")
    fix = f"delta={made!r}" + (f", delta_rank={held['lowrank']}" if "lowrank" in held else "")
    raise BaseModelMismatchError(
        f"The collection in {store.directory} holds {has} deltas (collected with "
        f"delta={made!r}), but this model's config (delta={cfg.delta!r}, "
        f"delta_rank={cfg.delta_rank}) asks for {asks}. Fit with the collection's setting, "
        f"OCDConfig({fix}), or collect again with this config into another out_dir."
    )


def _training_targets(
    model: OCDModel, store: DeltaStore, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(target, rho, RMS of each normalised delta, the conditioning tensors) of every stored row."""
    delta, _ = resolve_delta(model, store)
    keys = {"rank1": ["u", "v"], "lowrank": list(LOWRANK_KEYS), "full": ["delta"]}[delta]
    data = store.load([*keys, "rho", "cond_in", "cond_act", "cond_out"], device=device)
    rho = data["rho"].float()
    if delta == "lowrank":  # orthonormal u_k, v_k: ‖Σ s_k u_k v_kᵀ‖_F² = Σ s_k²
        u, s, v = (data[k].float() for k in LOWRANK_KEYS)
        target = pack_lowrank(u, s, v)  # (N, r·(out + 1 + in'))
        size = (s.square().sum(1) / (u.shape[2] * v.shape[2])).sqrt()
        return target, rho, size, data
    target = data[keys[0]].float()
    # the RMS of each normalised delta: 1 with "rms"; sqrt(1 + mean^2 / std^2) with "std"
    size = target.reshape(target.shape[0], -1).square().mean(1).sqrt()
    if delta == "rank1":  # delta / rho = (u / rho) v^T
        size = size * data["v"].float().square().mean(1).sqrt()
    return target, rho, size, data


def load_training_data(
    model: OCDModel, store: DeltaStore, device: torch.device, on_nonfinite: str = "skip"
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """The fit targets, rho and conditioning, finite rows only.

    Targets: normalised full deltas (N, out, in'), rank-one left factors (N, out), or packed
    low-rank factors (N, r·(out + 1 + in')), as :func:`resolve_delta` picks for the config.

    Example:
        >>> target, rho, cond = load_training_data(model, DeltaStore("deltas/"), torch.device("cpu"))
    """
    target, rho, size, data = _training_targets(model, store, device)
    cond = Conditioning.from_dict(data)
    finite = torch.isfinite(target.reshape(target.shape[0], -1)).all(1) & torch.isfinite(rho)
    for t in (cond.layer_input, cond.layer_output, cond.model_output):
        finite &= torch.isfinite(t).all(1)
    if not bool(finite.all()):  # collect() never stores these; a damaged or edited store
        bad = (~finite).nonzero().flatten().tolist()
        if on_nonfinite == "raise" or not bool(finite.any()):
            raise NonFiniteError(
                f"The collection in {store.directory} holds NaN/Inf for stored rows {bad[:10]} "
                f"({len(bad)} in all); collect again, or pass FitArgs(on_nonfinite='skip') to leave them out."
            )
        logger.warning("ocdwrap fit: leaving out %d stored rows with NaN/Inf.", len(bad))
        target, rho, cond, size = target[finite], rho[finite], cond.index(finite), size[finite]
    # A delta whose elements are (nearly) all equal has a per-element std of ~0: its normalised
    # size is in the millions, which would swamp the generator's target scale (target_std) and
    # blow up every generated delta.
    degenerate = size > MAX_NORMALISED_RMS
    if bool(degenerate.any()):
        bad = degenerate.nonzero().flatten().tolist()
        msg = (
            f"{len(bad)} of {len(size)} deltas in {store.directory} are (nearly) constant across "
            f"their elements, so their per-element std is ~0 and the normalised delta is huge "
            f"(RMS up to {float(size.max()):.3g}); this happens in small layers. Collect with "
            "OCDConfig(delta_normalization='rms')"
        )
        if on_nonfinite == "raise" or bool(degenerate.all()):
            raise NonFiniteError(msg + ", or pass FitArgs(on_nonfinite='skip') to leave them out.")
        logger.warning("ocdwrap fit: leaving out rows %s. %s.", bad[:10], msg)
        keep = ~degenerate
        target, rho, cond = target[keep], rho[keep], cond.index(keep)
    return target, rho, cond


def new_hypernetwork(
    model: OCDModel,
    target: torch.Tensor,
    rho: torch.Tensor,
    cond: Conditioning,
    seed: int,
    *,
    store: DeltaStore | None = None,
) -> OCDHyperNetwork:
    """A fresh hypernetwork for ``model``: initial weights from ``seed``, statistics from the data.

    ``store`` (the collection ``target`` came from) resolves ``delta="auto"``; without it the
    config's own ``delta`` is built.

    Example:
        >>> target, rho, cond = load_training_data(model, store, torch.device("cpu"))
        >>> hyper = new_hypernetwork(model, target, rho, cond, seed=0, store=store)
    """
    dims = (cond.layer_input.shape[1], cond.layer_output.shape[1], cond.model_output.shape[1])
    delta, rank = resolve_delta(model, store) if store is not None else (None, None)
    with torch.random.fork_rng(devices=[]):  # the initial weights follow `seed`, not global state
        torch.manual_seed(seed)
        hyper = OCDHyperNetwork(
            model.config,
            kind=model.layer_kind,
            weight_shape=model.weight_shape,
            dims=dims,
            delta=delta,
            delta_rank=rank or None,
        ).to(target.device)
    hyper.set_statistics(cond, rho, target)
    hyper.ema.load_state_dict(hyper.net.state_dict())
    return hyper


def _continued(
    model: OCDModel, store: DeltaStore, target: torch.Tensor, cond: Conditioning, device
) -> OCDHyperNetwork:
    """The loaded hypernetwork, to be trained further, after checking it fits this collection."""
    hyper = model.hypernet
    dims = (cond.layer_input.shape[1], cond.layer_output.shape[1], cond.model_output.shape[1])
    if tuple(hyper.dims) != dims or tuple(hyper.target_shape) != tuple(target.shape[1:]):
        raise BaseModelMismatchError(
            f"The loaded hypernetwork generates {tuple(hyper.target_shape)} deltas from "
            f"conditioning of widths {tuple(hyper.dims)}, but the collection in {store.directory} "
            f"holds {tuple(target.shape[1:])} deltas with conditioning widths {dims}. Continue "
            "fitting on a collection made like the one it was fitted on, or fit a fresh one "
            "(from_pretrained without is_trainable=True)."
        )
    return hyper.to(device)


class _Checkpoint:
    """Resumable fit state in ``directory``: a tensors file per save and the JSON naming it.

    The tensors go first, under a new name; the JSON naming them is the commit point, so a crash
    at any moment leaves a JSON whose tensors file exists and belongs to the same step.
    """

    def __init__(self, directory: str | os.PathLike, run_id: dict[str, Any]) -> None:
        self.directory = os.fspath(directory)
        self.run_id = run_id
        self.json_path = os.path.join(self.directory, CHECKPOINT_JSON)

    def restore(self, hyper, opt, opt_scale, gen: torch.Generator, report: FitReport) -> int:
        """Load the saved state into the arguments; the step to continue from (0 when none)."""
        if not os.path.exists(self.json_path):
            return 0
        fix = "Delete the checkpoint directory (or pass resume=False) and fit again."
        meta = read_json(self.json_path, what=fix)
        stored, mine = meta.get("run_id") or {}, json.loads(json.dumps(self.run_id))
        if stored != mine and ("format" in stored or not _matches_legacy(stored, mine)):
            raise BaseModelMismatchError(
                f"The checkpoint in {self.directory} belongs to another fit (different collection, "
                "config, steps or seed); it was left untouched. Use another checkpoint_dir or resume=False."
            )
        # the JSON names the tensors file written with it (older checkpoints: the fixed name)
        path = os.path.join(self.directory, str(meta.get("tensors", CHECKPOINT_TENSORS)))
        # checkpoints written before checksums (0.1.0) carry none: read unverified
        what = f"It held the fit state after step {meta.get('step')}. {fix}"
        data = read_verified(path, meta.get("tensors_digest"), what=what)
        tensors = {k: v.to(gen.device) for k, v in tensors_from_bytes(data, path).items()}
        if "rng" not in tensors:
            raise CorruptFileError(
                f"{path} has no generator state; delete the checkpoint and fit again."
            )
        try:
            hyper.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            for prefix, o in (("opt", opt), ("opts", opt_scale)):
                part = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                _restore_optimizer(prefix, o, part, meta)
            gen.set_state(tensors["rng"].cpu())
            report.losses, report.scale_losses = meta["losses"], meta["scale_losses"]
            report.skipped_steps = int(meta["skipped_steps"])
            report.resumed_from = int(meta["step"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CorruptFileError(
                f"The checkpoint in {self.directory} does not fit this run ({e}); it is damaged. "
                "Delete it (or pass resume=False) and fit again."
            ) from e
        return report.resumed_from

    def save(
        self, step: int, hyper, opt, opt_scale, gen: torch.Generator, report: FitReport
    ) -> None:
        tensors = {f"model.{k}": v for k, v in hyper.state_dict().items()}
        meta: dict[str, Any] = {}
        _flatten_optimizer("opt", opt, tensors, meta)
        _flatten_optimizer("opts", opt_scale, tensors, meta)
        tensors["rng"] = gen.get_state()
        name = checkpoint_tensors_name(step)
        digest = atomic_save_tensors_digest(os.path.join(self.directory, name), tensors)
        meta.update(
            run_id=self.run_id,
            step=step,
            tensors=name,
            tensors_digest=digest,
            losses=report.losses,
            scale_losses=report.scale_losses,
            skipped_steps=report.skipped_steps,
        )
        atomic_write_json(self.json_path, meta, checksum=True)
        for f in os.listdir(self.directory):  # older tensors files, now unreferenced
            if f != name and f.startswith("fit_checkpoint") and f.endswith(".safetensors"):
                os.unlink(os.path.join(self.directory, f))


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Delete the fit checkpoint in ``directory`` (its JSON and tensors files); other files stay,
    and the directory goes when nothing else is in it."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    for f in os.listdir(directory):
        if f == CHECKPOINT_JSON or (f.startswith("fit_checkpoint") and f.endswith(".safetensors")):
            os.unlink(os.path.join(directory, f))
    if not os.listdir(directory):
        os.rmdir(directory)


RUN_ID_FORMAT = 2  # 0.1.0's run ids had none: every setting in one flat config


def _run_id(model: OCDModel, store: DeltaStore, samples: int, args: FitArgs) -> dict[str, Any]:
    """What a checkpoint belongs to: it is resumed only by a fit with the same (the adapter's
    and the fit's settings that change what a step computes, as their metadata says)."""
    return {
        "format": RUN_ID_FORMAT,
        "store": store.manifest["identity"],
        "samples": samples,
        "config": results_fields(model.config),
        "args": results_fields(args),
    }


def _matches_legacy(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a 0.1.0 checkpoint's run id (every setting in one flat config, steps, batch
    size, lr and seed beside it) names the fit ``current`` describes: its flat config is read
    into today's homes and compared on the fields that change a result (a field 0.1.0 did not
    have counts as its default)."""
    from .settings import split_legacy

    homes = split_legacy(stored.get("config") or {})
    old_args = {
        **homes["FitArgs"],
        **{k: stored.get(k) for k in ("steps", "batch_size", "lr", "seed")},
    }
    defaults = {"config": results_fields(OCDConfig()), "args": results_fields(FitArgs())}
    for part, old in (("config", homes["OCDConfig"]), ("args", old_args)):
        for k, v in current[part].items():
            if old.get(k, defaults[part].get(k)) != v:
                return False
    return stored.get("store") == current["store"] and stored.get("samples") == current["samples"]


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

    continued = (
        model.is_trainable and model.hypernet is not None
    )  # from_pretrained(is_trainable=True)
    if continued:
        hyper = _continued(model, store, target, cond, device)
    else:
        hyper = new_hypernetwork(
            model, target, rho, cond, args.seed, store=store
        )  # same everywhere
    hyper.scale.requires_grad_(model.config.scale == "learned")
    opt = torch.optim.Adam(hyper.net.parameters(), lr=args.lr)
    opt_scale = torch.optim.Adam(hyper.scale.parameters(), lr=args.scale_lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    report = FitReport(steps=steps, samples=N, args=args.to_dict())
    checkpoint = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        run_id = _run_id(model, store, N, args)
        if continued:  # continued: from these weights
            run_id["continued_from"] = tensor_fingerprint(*hyper.state_dict().values())
        checkpoint = _Checkpoint(checkpoint_dir, run_id)
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
