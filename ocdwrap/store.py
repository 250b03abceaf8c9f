"""The on-disk collection of overfitted deltas: sharded safetensors + a JSON manifest.

This module owns the format: :class:`DeltaStore` reads it, :class:`StoreWriter` writes it,
:func:`merge_parts` joins the parts written by several processes, :func:`remove` deletes a
collection (and nothing else in its directory).

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
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import safe_open

from .errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    CorruptFileError,
    DistributedError,
    EmptyDataError,
)
from .io import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    part_name,
    read_json,
    shard_name,
    tensor_digests,
)

logger = logging.getLogger("ocdwrap")

STORE_FORMAT = "ocdwrap-deltas"
STORE_VERSION = 1
# identity keys added after the first stores were written, with the value those stores used
_IDENTITY_DEFAULTS = {"delta_normalization": "std"}
# identity keys added later that older stores lack because they were made the earlier way: a
# store without such a key is resumed the way it was made (the key is left out of the writer's
# identity, so the caller sees which way); a store with another value is refused
_IDENTITY_ADOPTED = ("adam_outer_formula",)
# identity keys known only once the first batch is overfitted (not compared when resuming)
_LAYOUT_KEYS = ("store_rank1",)
_PART_DIR = re.compile(r"part-\d{5}-of-\d{5}")

__all__ = [
    "MANIFEST_NAME",
    "STORE_FORMAT",
    "STORE_VERSION",
    "DeltaStore",
    "StoreWriter",
    "merge_parts",
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


def _new_manifest(data_fingerprint: str, config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "identity": None,
        "data_fingerprint": data_fingerprint,
        "config": config,
        "shards": [],
        "skipped": 0,
        "complete": False,
        **fields,
    }


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    full = {**_IDENTITY_DEFAULTS, **identity}
    return {k: v for k, v in full.items() if k not in _LAYOUT_KEYS}


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


class StoreWriter:
    """Writes a collection: open (resume or refuse), append rows, close.

    Rows are buffered and written as shards of ``shard_size`` samples; each shard is written
    atomically before the manifest lists it, so the directory is always a valid (partial)
    collection. Opening a directory that holds a partial collection with the same identity
    resumes it after its last intact shard; one with another identity is refused unless
    ``overwrite=True``.

    Example:
        >>> writer = StoreWriter.open("deltas/", identity, shard_size=4096)
        >>> writer.begin(fingerprint_of_first_batch, config.to_dict())
        >>> writer.describe(store_rank1=True, dims=dims, keys=list(rows))  # once
        >>> writer.append(rows, skipped=[17])   # rows: {key: (n, ...) tensors}, in data order
        >>> store = writer.close(positions=n, stopped="end_of_data")
    """

    def __init__(
        self,
        directory: str,
        identity: dict[str, Any],
        manifest: dict | None,
        shard_size: int,
        overwrite: bool = False,
    ) -> None:
        self.directory = directory
        self.identity = identity
        self.manifest = manifest
        self.shard_size = int(shard_size)
        self._buffer: dict[str, list[torch.Tensor]] = {}
        self._buffered = 0
        # skipped samples are counted per shard (those before its stop), so a resumed run that
        # revisits samples after the last shard does not count them twice; a complete collection
        # also counts those after its last shard, which a continued run does not revisit
        shards = manifest["shards"] if manifest else []
        self._skipped = sum(s.get("skipped", 0) for s in shards)
        if manifest and manifest.get("complete"):
            self._skipped = int(manifest.get("skipped", self._skipped))
        self._skipped_at: list[int] = []  # skipped positions not yet in a shard's count
        self.overwrite = overwrite  # begin() replaces a collection of other data

    @property
    def _manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST_NAME)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        identity: dict[str, Any],
        *,
        shard_size: int,
        overwrite: bool = False,
    ) -> StoreWriter:
        """Prepare ``directory`` for a collection with ``identity`` (resume, refuse or replace).

        The caller holds the directory's lock (:func:`ocdwrap.io.directory_lock`): temporary
        files that a killed run left behind are deleted.
        """
        directory = os.fspath(directory)
        manifest = None
        if os.path.isdir(directory):
            _remove_temporaries(directory)
        if os.path.exists(os.path.join(directory, MANIFEST_NAME)):
            store = DeltaStore(directory)
            old = store.manifest
            stored = old["identity"] or {}
            adopted = {
                k: v for k, v in identity.items() if k not in _IDENTITY_ADOPTED or k in stored
            }
            if _comparable(stored) == _comparable(adopted):
                manifest, identity = old, adopted
                damaged = store.first_damaged_shard()
                if damaged is not None:  # rebuild from the first missing or damaged shard on
                    logger.warning(
                        "ocdwrap: shard %s in %s is missing or damaged; collecting again from sample %d.",
                        old["shards"][damaged]["file"],
                        directory,
                        old["shards"][damaged]["start"],
                    )
                    manifest["shards"] = manifest["shards"][:damaged]
                    manifest["complete"] = False
            elif not overwrite:
                ident = old["identity"] or {}
                raise CollectionExistsError(
                    f"{directory} already holds a collection from another base model or config "
                    f"(layer {ident.get('layer')!r}, fingerprint {ident.get('fingerprint')}); "
                    "it was left untouched. Use another out_dir, or pass overwrite=True to replace it."
                )
            else:
                remove(directory, keep_directory=True)
        elif os.path.isdir(directory) and any(
            f.startswith("shard-") for f in os.listdir(directory)
        ):
            if not overwrite:
                raise CollectionExistsError(
                    f"{directory} holds shard files but no manifest; refusing to overwrite them. "
                    "Use another out_dir, or pass overwrite=True."
                )
            remove(directory, keep_directory=True)
        os.makedirs(directory, exist_ok=True)
        return cls(directory, identity, manifest, shard_size, overwrite)

    # --- state -----------------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        """Samples stored so far (intact shards)."""
        return int(sum(s["count"] for s in self.manifest["shards"])) if self.manifest else 0

    @property
    def done(self) -> int:
        """Data positions already covered: where a resumed or continued collection goes on."""
        if not self.manifest:
            return 0
        return DeltaStore._in_memory(self.directory, self.manifest).positions

    @property
    def complete(self) -> bool:
        return bool(self.manifest and self.manifest.get("complete"))

    def holds(self, max_samples: int | None) -> bool:
        """Whether the collection already holds what a collect of ``max_samples`` (None: the
        whole data) asks for; False when that is not known without reading the data."""
        if not self.complete:
            return False
        stopped = self.manifest.get("stopped")
        if stopped == STOPPED_END:
            return True  # every sample: also the first max_samples
        return max_samples is not None and self.done >= max_samples

    def reopen(self) -> None:
        """Mark a complete collection as being continued: incomplete until closed again.

        Skipped samples after its last shard are attributed to that shard (its ``stop`` moves to
        the positions covered), so the continuation neither revisits nor recounts them.
        """
        if not self.complete:
            return
        shards = self.manifest["shards"]
        positions = self.done
        if shards and positions > shards[-1]["stop"]:
            tail = int(self.manifest.get("skipped", 0)) - sum(x.get("skipped", 0) for x in shards)
            shards[-1]["stop"] = positions
            shards[-1]["skipped"] = shards[-1].get("skipped", 0) + max(tail, 0)
        self.manifest["complete"] = False
        for key in ("stopped", "summary", "positions"):
            self.manifest.pop(key, None)

    @property
    def described(self) -> bool:
        return bool(self.manifest and self.manifest.get("identity"))

    def store(self) -> DeltaStore:
        return DeltaStore(self.directory)

    # --- writing ---------------------------------------------------------------------------------
    def begin(self, data_fingerprint: str, config: dict[str, Any]) -> None:
        """Start a new manifest, or check that a resumed collection sees the same data."""
        if self.manifest is not None and self.manifest["data_fingerprint"] != data_fingerprint:
            if self.overwrite:  # the same base and config on other data: start again
                remove(self.directory, keep_directory=True)
                self.manifest, self._skipped, self._skipped_at = None, 0, []
        if self.manifest is None:
            self.manifest = _new_manifest(data_fingerprint, config)
        elif self.manifest["data_fingerprint"] != data_fingerprint:
            raise CollectionExistsError(
                f"{self.directory} holds a partial collection made from different data (its first "
                "batch differs: a shuffled loader?). Resume with the same data in the same order, or "
                "pass overwrite=True to start again."
            )

    def describe(self, *, dims: dict[str, int], keys: list[str], **layout: Any) -> None:
        """Record what only the first rows tell: the layout keys, conditioning widths, row keys."""
        self.manifest["identity"] = {**self.identity, **layout}
        self.manifest["dims"] = dict(dims)
        self.manifest["keys"] = list(keys)

    def append(self, rows: dict[str, torch.Tensor] | None, skipped: Sequence[int] = ()) -> None:
        """Buffer ``rows`` (the kept samples, in data order) and note ``skipped`` positions."""
        self._skipped_at += list(skipped)
        if rows:
            for k, t in rows.items():
                self._buffer.setdefault(k, []).append(t.detach().cpu())
            self._buffered += int(rows["index"].shape[0])
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        while self._buffered >= self.shard_size or (final and self._buffered > 0):
            n = min(self._buffered, self.shard_size)
            joined = {k: torch.cat(v) for k, v in self._buffer.items()}  # copies: no shared storage
            tensors = {k: t[:n] for k, t in joined.items()}  # one copy per key, not two
            # the per-batch pieces are released before the shard is written (lower peak memory)
            self._buffer = {k: [t[n:]] for k, t in joined.items()}
            self._buffered -= n
            self._write_shard(tensors)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        shards = self.manifest["shards"]
        if not shards:  # a manifest first, so a crash never leaves shards without one
            atomic_write_json(self._manifest_path, self.manifest, checksum=True)
        start = shards[-1]["stop"] if shards else 0
        stop = int(tensors["index"][-1]) + 1
        name = shard_name(len(shards))
        atomic_save_tensors(os.path.join(self.directory, name), tensors)
        digests = tensor_digests(tensors)
        n_skipped = sum(p < stop for p in self._skipped_at)
        self._skipped_at = [p for p in self._skipped_at if p >= stop]
        self._skipped += n_skipped
        count = int(tensors["index"].shape[0])
        shards.append(
            {
                "file": name,
                "count": count,
                "start": start,
                "stop": stop,
                "skipped": n_skipped,
                "digests": digests,
            }
        )
        self.manifest["skipped"] = self._skipped
        atomic_write_json(self._manifest_path, self.manifest, checksum=True)

    def close(self, positions: int, stopped: str) -> DeltaStore:
        """Write what is buffered, the summary, and mark the collection complete: it covers the
        first ``positions`` samples of the data and stopped for ``stopped`` (``"end_of_data"``
        or ``"max_samples"``)."""
        if self.manifest is None or (not self.described and not self.manifest["shards"]):
            raise EmptyDataError(
                "collect() got no samples from the data loader; check that it is not empty."
            )
        self._flush(final=True)
        self.manifest["skipped"] = self._skipped + len(self._skipped_at)
        self._skipped, self._skipped_at = self.manifest["skipped"], []
        self.manifest["positions"] = max(int(positions), self.done)
        self.manifest["stopped"] = stopped
        return _commit(self.directory, self.manifest)


def _commit(directory: str, manifest: dict[str, Any]) -> DeltaStore:
    """Add the summary, mark complete, and write the manifest: the collection's commit point."""
    manifest["summary"] = DeltaStore._in_memory(directory, manifest).summary()
    manifest["complete"] = True
    atomic_write_json(os.path.join(directory, MANIFEST_NAME), manifest, checksum=True)
    return DeltaStore(directory)


def merge_parts(
    out_dir: str | os.PathLike,
    parts: list[tuple[int, int]],
    world: int,
    stopped: str = STOPPED_END,
) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` listing the shards of every part, in data order.

    ``parts[r]`` is the ``[start, stop)`` sample range process ``r`` collected into
    ``out_dir/part-r-of-world/``; ``stopped`` says why the ranges end where they do
    (``"max_samples"`` when they cover only the first samples of the data). Returns the merged
    manifest.
    """
    out_dir = os.fspath(out_dir)
    merged: dict[str, Any] | None = None
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
        if merged is None:
            merged = _new_manifest(
                part["data_fingerprint"], part["config"], world_size=world, parts=[]
            )
            merged.update(identity=part["identity"], dims=part["dims"], keys=part["keys"])
        elif part["identity"] != merged["identity"]:
            first = merged["identity"]
            raise DistributedError(
                f"The processes hold different base models or configs: part {name} has layer "
                f"{part['identity']['layer']!r}, fingerprint {part['identity']['fingerprint']}; part 0 has "
                f"{first['layer']!r}, {first['fingerprint']}. Load the same weights on "
                "every process (e.g. from one checkpoint) before wrapping."
            )
        for s in part["shards"]:
            merged["shards"].append(
                {
                    "file": f"{name}/{s['file']}",
                    "count": s["count"],
                    "start": s["start"] + lo,
                    "stop": s["stop"] + lo,
                    "index_offset": lo,
                    **({"digests": s["digests"]} if s.get("digests") else {}),
                }
            )
        merged["skipped"] += int(part.get("skipped", 0))
        merged["parts"].append({"dir": name, "start": lo, "stop": hi})
    if merged is None:
        raise EmptyDataError(f"No part of {out_dir} holds any sample.")
    merged["positions"] = max(hi for lo, hi in parts)
    merged["stopped"] = stopped
    return _commit(out_dir, merged).manifest
