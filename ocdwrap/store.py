"""``DeltaStore``: the on-disk collection of overfitted deltas, sharded safetensors + a JSON manifest.

Layout of a collection directory::

    manifest.json              identity (layer, base fingerprint, overfit settings), shards, summary
                               (a shard's "file" is relative to the directory; shards written by
                               several processes live in part-R-of-W/ subfolders and carry an
                               "index_offset" added to their stored index on load)
    shard-00000.safetensors    per sample: rho (n,), cond_in (n, d_in), cond_act (n, d_act),
    shard-00001.safetensors    cond_out (n, d_out), index (n,) position in the data stream,
    ...                        energy (n,) top-singular-value energy fraction (Linear targets),
                               and the normalised delta: delta (n, out, in·kh·kw) for the full
                               parameterisation and/or u (n, out), v (n, in) for rank one.

Shards are written atomically and listed in the manifest only once complete, so an
interrupted collection resumes after the last listed shard.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open

from .errors import CorruptFileError
from .io import load_tensors, read_json

MANIFEST_NAME = "manifest.json"
STORE_FORMAT = "ocdwrap-deltas"
STORE_VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


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
            raise FileNotFoundError(
                f"{self.directory} holds no delta collection (no {MANIFEST_NAME}); run ocdwrap.collect first."
            )
        self.manifest: dict[str, Any] = read_json(path)
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

    def __len__(self) -> int:
        return int(sum(s["count"] for s in self.manifest["shards"]))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

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
        """Index of the first listed shard that is missing or whose header is unreadable, else None.

        Reads only the shards' headers (cheap): :func:`ocdwrap.collect` uses it on resume to
        rebuild from the first damaged shard on.
        """
        for i, s in enumerate(self.manifest["shards"]):
            try:
                with safe_open(
                    os.path.join(self.directory, s["file"]), framework="pt", device="cpu"
                ) as f:
                    n = f.get_slice("index").get_shape()[0]
            except Exception:  # missing file or damaged header
                return i
            if n != s["count"]:
                return i
        return None

    def load(
        self, keys: list[str] | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Concatenate ``keys`` (default: all) over every shard."""
        keys = keys or self.keys
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise KeyError(
                f"This collection has no {missing} (it holds {self.keys}); collect again with a config "
                "that stores them (delta='full' stores 'delta'; Linear targets on vectors also store 'u', 'v')."
            )
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for shard, path in zip(self.manifest["shards"], self.shard_paths()):
            if not os.path.exists(path):
                raise CorruptFileError(
                    f"Shard {path} listed in the manifest is missing; run ocdwrap.collect again with the "
                    "same data to rebuild it."
                )
            if len(keys) == len(self.keys):
                tensors = load_tensors(path, device)
            else:
                tensors = self._load_some(path, keys, device)
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
            raise CorruptFileError(
                f"Shard {path} listed in the manifest is missing; run ocdwrap.collect again with the "
                "same data to rebuild it."
            )
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # safetensors raises several types for damaged files
            raise CorruptFileError(
                f"{path} could not be read as safetensors ({e}); the shard is truncated or corrupted. "
                "Run ocdwrap.collect again with the same data: it rebuilds it."
            ) from e

    def __repr__(self) -> str:
        return f"DeltaStore({self.directory!r}, samples={len(self)}, layer={self.layer!r}, complete={self.complete})"
