"""Safe, atomic file writing and reading: safetensors and JSON only, never pickle.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
renamed over the destination, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError

# Every file name ocdwrap writes, in one place.
CONFIG_NAME = "ocd_config.json"  # an adapter's OCDConfig
WEIGHTS_NAME = "ocd_model.safetensors"  # an adapter's hypernetwork
MANIFEST_NAME = "manifest.json"  # a delta collection's manifest (its commit point)
CHECKPOINT_JSON = "fit_checkpoint.json"  # a fit checkpoint's commit point
CHECKPOINT_TENSORS = "fit_checkpoint.safetensors"  # its tensors (older checkpoints' fixed name)


def shard_name(i: int) -> str:
    """The file of a collection's ``i``-th shard."""
    return f"shard-{i:05d}.safetensors"


def part_name(rank: int, world: int) -> str:
    """The sub-directory of process ``rank``'s shards: ``part-00001-of-00004``."""
    return f"part-{rank:05d}-of-{world:05d}"


def checkpoint_tensors_name(step: int) -> str:
    """The tensors file of a fit checkpoint taken after ``step`` steps."""
    return f"fit_checkpoint-{step:08d}.safetensors"


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, fsync it, then rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str) -> Any:
    """Read a JSON object, turning a truncated or corrupted file into :class:`CorruptFileError`.

    Every JSON file ocdwrap writes (config, manifest, checkpoint) holds one object; anything
    else (binary data, a list, a bare value) is reported as corrupted.
    """
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e}); the file is truncated or corrupted. "
            "Restore it from a backup, or delete it and recreate it."
        ) from e
    if not isinstance(obj, dict):
        raise CorruptFileError(
            f"{path} holds a JSON {type(obj).__name__}, not the object ocdwrap wrote; the file is "
            "corrupted or not an ocdwrap file. Restore it from a backup, or delete it and recreate it."
        )
    return obj


def atomic_save_tensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors to ``path`` atomically (streamed to disk, not built in memory)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupted file into :class:`CorruptFileError`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(
            f"{path} could not be read as safetensors ({e}); the file is truncated or corrupted. "
            "Delete it and write it again: collect() run again rebuilds a missing or damaged shard, "
            "fit() without the checkpoint starts over, save_pretrained() rewrites an adapter."
        ) from e


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A short hash of tensors' shapes, dtypes and values, to tell base models apart."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
