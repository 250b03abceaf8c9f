"""``comparison.json`` and its per-row files: how a comparison resumes instead of recomputing.

``comparison.json`` holds the comparison so far (every finished row) and its identity (the
eval data, the model's behaviour on it, the training data, the config and the settings); each
computed row's per-sample losses are in a safetensors file beside it, named in the JSON with
its checksum. A row is written first, then the JSON naming it (atomically, with a checksum), so
a run killed at any moment leaves the rows finished before it, each whole. A later run with the
same identity takes the stored rows; one with another identity is refused unless
``overwrite=True`` (which discards them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

from ..errors import ComparisonExistsError, CorruptFileError, OCDError
from ..io import (
    atomic_save_tensors_digest,
    atomic_write_json,
    read_json,
    read_verified,
    tensors_from_bytes,
)
from ..store import DeltaStore
from .report import Comparison, Row

COMPARISON_NAME = "comparison.json"
COLLECTION_TIME_NAME = "compare_collection.json"  # what the collection in out_dir cost
FORMAT = "ocdwrap-comparison"


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _row_file(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]
    return f"comparison-{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.safetensors"


class SavedComparison:
    """The rows of ``out_dir/comparison.json`` with this identity (empty for a new one)."""

    def __init__(self, out_dir: str, identity: dict[str, Any], *, overwrite: bool) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, COMPARISON_NAME)
        self.identity = _normalised(identity)
        self.rows: dict[str, Row] = {}
        self.losses: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}
        self.files: dict[str, dict[str, str]] = {}
        if os.path.exists(self.path):
            self._open(overwrite)

    def _open(self, overwrite: bool) -> None:
        fix = "Delete it, or pass overwrite=True to compare afresh."
        try:
            stored = read_json(self.path, what=fix)
        except CorruptFileError:
            if overwrite:
                return
            raise
        if stored.get("identity") != self.identity:
            if overwrite:
                self._discard(stored.get("files", {}))
                return
            theirs = stored.get("identity", {})
            differ = sorted(
                k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k)
            )
            raise ComparisonExistsError(
                f"{self.path} holds a comparison made with other {', '.join(differ)} (eval "
                "data, model, training data or settings); its rows are not reused for this one. "
                "Pass overwrite=True to replace it, or use another out_dir."
            )
        comparison = Comparison.from_dict(stored["comparison"])
        self.info = comparison.info
        self.files = stored.get("files", {})
        for row in comparison.rows:
            entry = self.files.get(row.name)
            if row.skipped is None and entry is None:
                continue
            if entry is not None:
                path = os.path.join(self.out_dir, entry["file"])
                what = "A row of the comparison; it is computed again if you delete it."
                try:
                    data = read_verified(path, entry["digest"], what=what)
                except FileNotFoundError:
                    continue  # recomputed
                self.losses[row.name] = tensors_from_bytes(data, path)["loss"].double()
            self.rows[row.name] = row

    def _discard(self, files: dict[str, dict[str, str]]) -> None:
        for entry in files.values():
            path = os.path.join(self.out_dir, entry["file"])
            if os.path.exists(path):
                os.unlink(path)

    def save_row(self, row: Row, loss: torch.Tensor | None) -> None:
        """Keep ``row`` (and its per-sample losses): the file first, the JSON after it."""
        self.rows[row.name] = row
        if loss is not None:
            self.losses[row.name] = loss
            name = _row_file(row.name)
            digest = atomic_save_tensors_digest(
                os.path.join(self.out_dir, name), {"loss": loss.detach().double().cpu()}
            )
            self.files[row.name] = {"file": name, "digest": digest}
        else:
            self.files.pop(row.name, None)

    def write(self, comparison: Comparison) -> None:
        """``comparison.json`` with every row kept so far."""
        atomic_write_json(
            self.path,
            {
                "format": FORMAT,
                "version": 1,
                "identity": self.identity,
                "files": self.files,
                "comparison": _normalised(comparison.to_dict()),
            },
            checksum=True,
        )


def held_collection(out_dir: str) -> tuple[dict[str, Any], int] | None:
    """What identifies the collection already in ``out_dir``, and its size (None when none)."""
    try:
        store = DeltaStore(out_dir)
        manifest = store.manifest
        found = {"identity": manifest["identity"], "data": manifest.get("data_fingerprint")}
        return found, len(store)
    except (OCDError, FileNotFoundError, KeyError):
        return None


def collection_seconds(
    out_dir: str, before: tuple[dict[str, Any], int] | None, store: DeltaStore, took: float
) -> float | None:
    """What the collection in ``out_dir`` cost in all, kept in ``compare_collection.json``:
    ``took`` when this call collected it from the start; the recorded time (plus ``took`` when
    this call added samples) when it was collected here before; None when something else
    collected it (its time is not known)."""
    path = os.path.join(out_dir, COLLECTION_TIME_NAME)
    now = {"identity": store.manifest["identity"], "data": store.manifest.get("data_fingerprint")}
    now = _normalised(now)
    record = read_json(path) if os.path.exists(path) else {}
    if before is None or _normalised(before[0]) != now:
        seconds = took
    elif record.get("collection") == now and record.get("seconds") is not None:
        seconds = record["seconds"] + (took if len(store) > before[1] else 0.0)
    else:
        seconds = None
    atomic_write_json(path, {"collection": now, "seconds": seconds, "samples": len(store)})
    return seconds
