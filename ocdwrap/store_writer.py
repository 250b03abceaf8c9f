"""Writing a delta collection: :class:`StoreWriter` appends rows as checksummed shards and keeps
the manifest (the commit point) current; :func:`merge_parts` joins the parts written by several
processes. The format itself is described in :mod:`ocdwrap.store`, which reads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import (
    CollectionExistsError,
    DistributedError,
    EmptyDataError,
)
from .io import (
    MANIFEST_NAME,
    atomic_save_tensors,
    atomic_write_json,
    part_name,
    shard_name,
    tensor_digests,
)
from .store import (
    STOPPED_END,
    STORE_FORMAT,
    STORE_VERSION,
    DeltaStore,
    _remove_temporaries,
    remove,
)

logger = logging.getLogger("ocdwrap")

# identity keys added after the first stores were written, with the value those stores used
_IDENTITY_DEFAULTS = {"delta_normalization": "std"}
# identity keys added later that older stores lack because they were made the earlier way: a
# store without such a key is resumed the way it was made (the key is left out of the writer's
# identity, so the caller sees which way); a store with another value is refused
_IDENTITY_ADOPTED = ("adam_outer_formula", "rows_formula")
# identity keys known only once the first batch is overfitted (not compared when resuming)
_LAYOUT_KEYS = ("store_rank1",)


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
