"""Resumable fit state: the checkpoint :func:`ocdwrap.fit` writes every
``FitArgs.checkpoint_every`` steps (hypernetwork, both optimizers, the generator state and the
loss curves) and the run id that says which fit it belongs to.

The tensors go first, under a new name; the JSON naming them is the commit point, so a crash at
any moment leaves a JSON whose tensors file exists and belongs to the same step.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch

from .config import FitArgs, OCDConfig, results_fields
from .errors import BaseModelMismatchError, CorruptFileError
from .io import (
    CHECKPOINT_JSON,
    CHECKPOINT_TENSORS,
    atomic_save_tensors_digest,
    atomic_write_json,
    checkpoint_tensors_name,
    read_json,
    read_verified,
    tensors_from_bytes,
)

if TYPE_CHECKING:
    from .model import OCDModel
    from .store import DeltaStore


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


class Checkpoint:
    """Resumable fit state in ``directory``: a tensors file per save and the JSON naming it.

    The tensors go first, under a new name; the JSON naming them is the commit point, so a crash
    at any moment leaves a JSON whose tensors file exists and belongs to the same step.
    """

    def __init__(self, directory: str | os.PathLike, run_id: dict[str, Any]) -> None:
        self.directory = os.fspath(directory)
        self.run_id = run_id
        self.json_path = os.path.join(self.directory, CHECKPOINT_JSON)

    def restore(self, hyper, opt, opt_scale, gen: torch.Generator, report: Any) -> int:
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

    def save(self, step: int, hyper, opt, opt_scale, gen: torch.Generator, report: Any) -> None:
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


def run_id(model: OCDModel, store: DeltaStore, samples: int, args: FitArgs) -> dict[str, Any]:
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
