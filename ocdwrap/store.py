"""The on-disk collection of overfitted deltas: sharded safetensors + a JSON manifest.

This module owns the format: :class:`DeltaStore` reads it (and :func:`load_training_data` turns
it into the fit's tensors), :func:`remove` deletes a collection (and nothing else in its
directory); :mod:`ocdwrap.store_writer` writes it (``StoreWriter``, and ``merge_parts`` joins
the parts written by several processes).

Layout of a collection directory::

    manifest.json              identity (layer, base fingerprint, overfit settings), shards, summary
                               (a shard's "file" is relative to the directory; shards written by
                               several processes live in part-R-of-W/ subfolders and carry an
                               "index_offset" added to their stored index on load)
    shard-00000.safetensors    per sample: rho (n,), cond_in (n, d_in), cond_act (n, d_act),
    shard-00001.safetensors    cond_out (n, d_out), index (n,) position in the data stream,
    ...                        energy (n,) top-singular-value energy fraction (Linear targets),
                               and the normalised delta: delta (n, out, in·kh·kw) for the full
                               parameterisation and/or u (n, out), v (n, in) for rank one, and/or
                               for low rank r the canonical factors of delta / rho:
                               lowrank_u (n, r, out), lowrank_s (n, r), lowrank_v (n, r, in·kh·kw),
                               lowrank_energy (n,) the energy share the r factors keep.

Shards are written atomically and listed in the manifest only once complete (the manifest is
the commit point), so an interrupted collection resumes after the last listed shard.

Integrity: each shard's entry records a checksum of every tensor in it (``"digests"``), and the
manifest a checksum of its own content (``"checksum"``); both are verified whenever they are
read, so a damaged byte is a :class:`~ocdwrap.errors.CorruptFileError` naming the shard and its
samples, and :func:`ocdwrap.collect` run again rebuilds it. Collections written before checksums
existed (ocdwrap 0.1.0) still load and resume, unverified (:attr:`DeltaStore.verified`).

Why a collection stopped: a complete manifest records ``"stopped"``, ``"end_of_data"`` (the data
ran out: it holds every sample) or ``"max_samples"`` (it holds the first ``"positions"`` samples
and a later collect without that limit continues it). Manifests written by 0.1.0 do not say; they
are read as "unknown": a later collect looks at the data to find out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any

import torch
from safetensors import safe_open

from .capture import Conditioning
from .config import OCDConfig
from .deltas import LOWRANK_KEYS
from .errors import (
    CollectionNotFoundError,
    CorruptFileError,
    NonFiniteError,
)
from .hypernet import pack_lowrank, resolve_delta
from .io import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    load_tensors,
    read_json,
    shard_name,
    tensor_digests,
)

logger = logging.getLogger("ocdwrap")

STORE_FORMAT = "ocdwrap-deltas"
STORE_VERSION = 1
_PART_DIR = re.compile(r"part-\d{5}-of-\d{5}")

__all__ = [
    "MANIFEST_NAME",
    "STORE_FORMAT",
    "STORE_VERSION",
    "DeltaStore",
    "remove",
    "shard_name",
]


STOPPED_END = "end_of_data"  # the data ran out: the collection holds every sample
STOPPED_MAX = "max_samples"  # collect() was asked for the first max_samples samples only

_REBUILD = "Run ocdwrap.collect again with the same data and out_dir: it rebuilds it."


def _missing_shard(path: str) -> CorruptFileError:
    return CorruptFileError(f"Shard {path} listed in the manifest is missing. {_REBUILD}")


def _shard_samples(shard: dict[str, Any]) -> str:
    return f"samples {shard['start']}-{shard['stop'] - 1} of the data"


def _check_digests(
    path: str, shard: dict[str, Any], tensors: dict[str, torch.Tensor], keys: list[str]
) -> None:
    """Raise CorruptFileError when a loaded tensor does not match its recorded checksum."""
    digests = shard.get("digests")
    if not digests:
        return  # written before checksums (0.1.0): unverified
    found = tensor_digests({k: tensors[k] for k in keys if k in digests})
    bad = [k for k, d in found.items() if d != digests[k]]
    if bad:
        raise CorruptFileError(
            f"Shard {path} ({_shard_samples(shard)}) is damaged: {', '.join(bad)} do not match the "
            f"checksums recorded when it was written. {_REBUILD}"
        )


class DeltaStore:
    """Read access to a collection written by :func:`ocdwrap.collect`.

    Example:
        >>> store = DeltaStore("deltas/")
        >>> len(store), store.dims, store.manifest["summary"]
        >>> data = store.load(["delta", "rho", "cond_in", "cond_act", "cond_out"])
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST_NAME)
        if not os.path.exists(path):
            raise CollectionNotFoundError(
                f"{self.directory} holds no delta collection (no {MANIFEST_NAME}); run ocdwrap.collect first."
            )
        self.manifest: dict[str, Any] = read_json(
            path,
            what="Delete the collection (ocdwrap.store.remove) and collect again, or restore the "
            "manifest from a backup.",
        )
        if self.manifest.get("format") != STORE_FORMAT:
            raise CorruptFileError(
                f"{path} is not an ocdwrap delta manifest (format={self.manifest.get('format')!r})."
            )
        missing = [k for k in ("identity", "shards") if k not in self.manifest]
        if missing or not isinstance(self.manifest["shards"], list):
            raise CorruptFileError(
                f"{path} lacks {missing or ['a list of shards']}; the manifest is damaged. Delete the "
                "collection directory's manifest.json and shards, and collect again."
            )

    @classmethod
    def _in_memory(cls, directory: str, manifest: dict[str, Any]) -> DeltaStore:
        """A store over ``directory`` whose manifest is not written yet (the writer's view)."""
        store = cls.__new__(cls)
        store.directory, store.manifest = directory, manifest
        return store

    def __len__(self) -> int:
        return int(sum(s["count"] for s in self.manifest["shards"]))

    @property
    def complete(self) -> bool:
        """The collection finished what it was asked (see :attr:`stopped` for how much)."""
        return bool(self.manifest.get("complete"))

    @property
    def stopped(self) -> str | None:
        """Why a complete collection stopped: ``"end_of_data"`` (it holds every sample of the
        data), ``"max_samples"`` (only the first :attr:`positions`), or None (still incomplete,
        or written by ocdwrap 0.1.0, which did not record it)."""
        return self.manifest.get("stopped") if self.complete else None

    @property
    def positions(self) -> int:
        """Data positions the collection covers: stored samples plus skipped (NaN/Inf) ones."""
        if self.complete and "positions" in self.manifest:
            return int(self.manifest["positions"])
        shards = self.manifest["shards"]
        return int(shards[-1]["stop"]) if shards else 0

    @property
    def verified(self) -> bool:
        """True when the manifest and every shard carry checksums (written by ocdwrap >= 0.2);
        reads of a verified collection check every byte they use."""
        return "checksum" in self.manifest and all(
            s.get("digests") for s in self.manifest["shards"]
        )

    @property
    def dims(self) -> dict[str, int]:
        """Conditioning widths: {'cond_in': d_in, 'cond_act': d_act, 'cond_out': d_out}."""
        return dict(self.manifest["dims"])

    @property
    def keys(self) -> list[str]:
        return list(self.manifest["keys"])

    @property
    def layer(self) -> str:
        return self.manifest["identity"]["layer"]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["identity"]["weight_shape"])

    def shard_paths(self) -> list[str]:
        return [os.path.join(self.directory, s["file"]) for s in self.manifest["shards"]]

    def first_damaged_shard(self) -> int | None:
        """Index of the first listed shard that is missing, unreadable or (where checksums were
        recorded) does not match them, else None.

        Reads every shard whole: a resumed collection rebuilds from the first damaged shard on.
        """
        for i, (shard, path) in enumerate(zip(self.manifest["shards"], self.shard_paths())):
            try:
                tensors = load_tensors(path)
                _check_digests(path, shard, tensors, list(tensors))
            except (OSError, CorruptFileError):  # missing, unreadable or damaged
                return i
            if tensors["index"].shape[0] != shard["count"]:
                return i
        return None

    def load(
        self,
        keys: list[str] | None = None,
        device: str | torch.device = "cpu",
        *,
        verify: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Concatenate ``keys`` (default: all) over every shard.

        Every tensor read is checked against the checksum recorded when its shard was written
        (a :class:`CorruptFileError` names the shard, its samples and the fix); ``verify=False``
        skips that (what it costs is measured by ``benchmarks.integrity``).
        """
        keys = keys or self.keys
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise KeyError(
                f"This collection has no {missing} (it holds {self.keys}); collect again with a config "
                "that stores them (delta='full' stores 'delta'; Linear targets on vectors also store 'u', 'v'; "
                "delta='lowrank' stores 'lowrank_u', 'lowrank_s', 'lowrank_v')."
            )
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for shard, path in zip(self.manifest["shards"], self.shard_paths()):
            if not os.path.exists(path):
                raise _missing_shard(path)
            if len(keys) == len(self.keys):
                tensors = load_tensors(path, device)
            else:
                tensors = self._load_some(path, keys, device)
            if verify:
                _check_digests(path, shard, tensors, keys)
            if "index" in keys and shard.get("index_offset"):
                # a per-process shard (ocdwrap.distributed) counts from its part's first sample
                tensors["index"] = tensors["index"] + int(shard["index_offset"])
            for k in keys:
                parts[k].append(tensors[k])
        if not self.manifest["shards"]:
            return {k: torch.empty(0) for k in keys}
        return {k: torch.cat(v) for k, v in parts.items()}

    @staticmethod
    def _load_some(
        path: str, keys: list[str], device: str | torch.device
    ) -> dict[str, torch.Tensor]:
        if not os.path.exists(path):
            raise _missing_shard(path)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # safetensors raises several types for damaged files
            raise CorruptFileError(
                f"{path} could not be read as safetensors ({e}); the shard is truncated or corrupted. "
                "Run ocdwrap.collect again with the same data: it rebuilds it."
            ) from e

    def summary(self) -> dict[str, Any]:
        """Count, skipped samples, rho's mean and spread, and the energy the stored factors keep.

        ``top_singular_energy`` (Linear targets): the share of each delta's energy in its top
        singular value; ``lowrank_energy`` (low-rank collections): the share its top r keep.
        """
        have = self.manifest["keys"]
        keys = ["rho"] + [k for k in ("energy", "lowrank_energy", "lowrank_s") if k in have]
        data = self.load(keys)
        rho = data["rho"].double()
        summary: dict[str, Any] = {
            "count": int(rho.numel()),
            "skipped_nonfinite": int(self.manifest.get("skipped", 0)),
            "rho_mean": float(rho.mean()) if rho.numel() else None,
            "rho_cv": float(rho.std() / rho.mean()) if rho.numel() > 1 else None,
        }
        for key, name in (("energy", "top_singular_energy"), ("lowrank_energy", "lowrank_energy")):
            if key in data and data[key].numel():
                summary[name] = _spread(data[key].double())
        if "lowrank_energy" in summary:
            summary["lowrank_energy"]["rank"] = int(data["lowrank_s"].shape[1])
        return summary

    def __repr__(self) -> str:
        return (
            f"DeltaStore({self.directory!r}, samples={len(self)}, layer={self.layer!r}, "
            f"complete={self.complete}, stopped={self.stopped!r})"
        )


def _spread(e: torch.Tensor) -> dict[str, float]:
    """Mean, min, median and 5th percentile of a (n,) tensor."""
    return {
        "mean": float(e.mean()),
        "min": float(e.min()),
        "median": float(e.median()),
        "p05": float(e.quantile(0.05)) if e.numel() > 1 else float(e.min()),
    }


def remove(directory: str | os.PathLike, *, keep_directory: bool = False) -> None:
    """Delete the collection in ``directory``: its shards, per-process parts and manifest.

    Other files in the directory are left alone; the directory itself goes when nothing else
    is in it (unless ``keep_directory``).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        try:
            for path in DeltaStore(directory).shard_paths():
                if os.path.exists(path):
                    os.unlink(path)
        except CorruptFileError:  # a damaged manifest: the stray files below still go
            pass
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if (f.startswith("shard-") and f.endswith(".safetensors")) or f.startswith(TEMP_PREFIX):
            os.unlink(path)
        elif _PART_DIR.fullmatch(f) and os.path.isdir(path):
            shutil.rmtree(path)
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)
    if not keep_directory and not os.listdir(directory):
        os.rmdir(directory)


def _remove_temporaries(directory: str) -> None:
    """Delete the temporary files (``.tmp-*``) of writes that a killed process left half done.

    Only while the directory's lock is held (:func:`ocdwrap.io.directory_lock`, as ``collect``
    holds it): then no other process is writing there.
    """
    for f in os.listdir(directory):
        if f.startswith(TEMP_PREFIX):
            path = os.path.join(directory, f)
            if os.path.isfile(path):
                os.unlink(path)


# --- the collection as the fit's tensors --------------------------------------------------------
MAX_NORMALISED_RMS = 100.0  # a normalised delta larger than this is degenerate (see below)


def held_deltas(store: DeltaStore) -> dict[str, int]:
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


def _training_targets(
    model: Any, store: DeltaStore, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(target, rho, RMS of each normalised delta, the conditioning tensors) of every stored row."""
    delta, _ = resolve_delta(
        model.config, model.weight_shape, model.layer_name, held_deltas(store), store.directory
    )
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
    model: Any, store: DeltaStore, device: torch.device, on_nonfinite: str = "skip"
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
