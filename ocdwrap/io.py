"""Safe, atomic file writing and reading: safetensors and JSON only, never pickle.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, then
renamed over the destination, so a crash leaves either the old file or the new one.

Every file ocdwrap writes carries a checksum that is verified when the file is read, so a damaged
byte is reported (:class:`~ocdwrap.errors.CorruptFileError`) instead of being trained on:

- the JSON files that are commit points (a collection's manifest, a fit checkpoint, an adapter's
  file list) hold a ``"checksum"`` of their own content (:func:`atomic_write_json` with
  ``checksum=True``; :func:`read_json` verifies it);
- a collection's shards are hashed per tensor (:func:`tensor_digests`: dtype, shape and raw bytes),
  so reading some keys of a shard checks exactly what it reads;
- an adapter's files and a checkpoint's tensors file are hashed whole (:func:`digest_bytes`).

The hash is xxHash's XXH3 (64 bits), several times faster than ``hashlib``'s SHA-256 or zlib's
CRC-32 (``python -m benchmarks.integrity`` measures them and what checking costs ``fit``'s data
loading; docs/reliability.md quotes the committed run). It detects damage; it is not a defence
against someone who edits a file on purpose.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from .errors import CollectionBusyError, CorruptFileError

try:  # POSIX advisory locks; elsewhere directories are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Every file name ocdwrap writes, in one place.
CONFIG_NAME = "ocd_config.json"  # an adapter's OCDConfig
WEIGHTS_NAME = "ocd_model.safetensors"  # an adapter's hypernetwork
SAMPLING_NAME = "ocd_sampling.json"  # an adapter's SamplingConfig: its sampling defaults
MANIFEST_NAME = "manifest.json"  # a delta collection's manifest (its commit point)
CHECKPOINT_JSON = "fit_checkpoint.json"  # a fit checkpoint's commit point
CHECKPOINT_TENSORS = "fit_checkpoint.safetensors"  # its tensors (older checkpoints' fixed name)
ADAPTER_FILES_NAME = "ocd_files.json"  # an adapter's commit point: its files and their hashes
STAGED_SUFFIX = ".next"  # an adapter file written, not yet renamed into place
TEMP_PREFIX = ".tmp-"  # a file being written (renamed over its target once complete)

DIGEST_ALGORITHM = "xxh3_64"


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
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
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


def digest_bytes(data: bytes | memoryview) -> str:
    """The checksum of ``data``: ``"xxh3_64:<16 hex digits>"``."""
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_64_hexdigest(data)}"


def tensor_digest(t: torch.Tensor) -> str:
    """The checksum of a tensor as it is stored: its dtype, shape and raw (little-endian) bytes.

    Works for every dtype (bfloat16 and bool included) without converting the values.
    """
    t = t.detach().to("cpu").contiguous()
    h = xxhash.xxh3_64()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor, by name."""
    return {k: tensor_digest(t) for k, t in tensors.items()}


def _json_checksum(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return digest_bytes(canonical.encode("ascii"))


def atomic_write_json(path: str, obj: Any, *, checksum: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    With ``checksum=True`` the object gets a ``"checksum"`` of the rest of its content, which
    :func:`read_json` verifies: a changed digit (a flipped bit on disk) is refused instead of
    silently changing what the file says.
    """
    if checksum:
        obj = {**obj, "checksum": _json_checksum(obj)}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, *, what: str = "") -> Any:
    """Read a JSON object, turning a truncated or corrupted file into :class:`CorruptFileError`.

    Every JSON file ocdwrap writes (config, manifest, checkpoint) holds one object; anything
    else (binary data, a list, a bare value) is reported as corrupted. An object with a
    ``"checksum"`` (see :func:`atomic_write_json`) must match it. ``what`` names, for the error,
    what the file is and how to recreate it.
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
    if "checksum" in obj and obj["checksum"] != _json_checksum(obj):
        raise CorruptFileError(
            f"{path} does not match the checksum ocdwrap recorded in it: a value in it changed "
            f"after it was written (a damaged disk block, or an edit by hand). {what}".rstrip()
        )
    return obj


def read_verified(path: str, digest: str | None, *, what: str) -> bytes:
    """The bytes of ``path``, checked against ``digest`` (from :func:`digest_bytes`) when one is
    recorded; a mismatch is a :class:`CorruptFileError` naming the file and ``what`` it held
    and how to recreate it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as f:
        data = f.read()
    if digest is not None and digest_bytes(data) != digest:
        raise CorruptFileError(
            f"{path} does not match its recorded checksum: the file was damaged after it was "
            f"written. {what}"
        )
    return data


def tensors_from_bytes(data: bytes, path: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (read with :func:`read_verified`); a damaged file is a
    :class:`CorruptFileError` naming ``path``."""
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(
            f"{path} could not be read as safetensors ({e}); the file is truncated or corrupted."
        ) from e


def safetensors_metadata(data: bytes, path: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header's string map; {} when none)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise CorruptFileError(f"{path} has a damaged safetensors header ({e}).") from e
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{path} has a damaged safetensors header (metadata not a map).")
    return meta


def atomic_save_tensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors to ``path`` atomically (streamed to disk, not built in memory)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: _save_file(tensors, tmp, metadata, path))


def _save_file(
    tensors: dict[str, torch.Tensor], tmp: str, metadata: dict[str, str] | None, path: str
) -> None:
    """``save_file``, with a write the system refuses (disk full, file size limit) raised as the
    ``OSError`` it is (safetensors reports it as a serialization error)."""
    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, f"{os.strerror(code)}: could not write {path} ({e})", path) from e


def atomic_save_tensors_digest(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors to ``path`` atomically and return the file's checksum
    (:func:`digest_bytes` of exactly the bytes written; built in memory, for files that are
    read whole: adapters and fit checkpoints)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata=metadata)
    _atomic_write_bytes(path, data)
    return digest_bytes(data)


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


@contextlib.contextmanager
def directory_lock(directory: str, what: str = "collecting into") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the ``with`` block.

    A second process (or a second call in this one) that asks for it while it is held gets a
    :class:`~ocdwrap.errors.CollectionBusyError` at once; it does not wait. The lock is the
    directory's own (``flock`` on it), so no lock file is left behind, and it is released when
    the holder exits or is killed. On systems without ``fcntl`` nothing is locked.
    """
    os.makedirs(directory, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise CollectionBusyError(
                f"Another process (or another call in this one) is {what} {directory} right now. "
                "Wait for it to finish, then run again (a finished or interrupted collection is "
                "reused or resumed), or use another directory."
            ) from e
        yield
    finally:
        os.close(fd)  # releases the lock


# --- a set of files with one commit point (an adapter) ----------------------------------------


def _staged(directory: str, name: str) -> str:
    return os.path.join(directory, name + STAGED_SUFFIX)


def _roll_forward(directory: str, listed: dict[str, Any]) -> None:
    """Finish the renames of a committed save that was interrupted after its commit point."""
    for name, entry in listed.items():
        final, staged = os.path.join(directory, name), _staged(directory, name)
        if os.path.exists(staged) and (
            not os.path.exists(final) or file_digest(final) != entry["digest"]
        ):
            if file_digest(staged) == entry["digest"]:
                os.replace(staged, final)


def write_file_set(directory: str, files: dict[str, bytes], fmt: str) -> None:
    """Write ``files`` (name -> bytes) into ``directory`` so that a crash at any moment leaves
    the old set or the new one, never a mix.

    Each file is first written beside its final name (``name.next``); then the commit point,
    ``ocd_files.json``, names every file with its checksum; then each file is renamed into place.
    :func:`read_file_set` reads a file from its final name when that matches the commit point,
    else from the ``.next`` one. A save interrupted after its commit point is completed by the
    next save before it writes anything.
    """
    index_path = os.path.join(directory, ADAPTER_FILES_NAME)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(index_path):
        try:
            _roll_forward(directory, read_json(index_path).get("files", {}))
        except CorruptFileError:
            pass  # a damaged commit point: the new set replaces it below
    for name, data in files.items():
        _atomic_write_bytes(_staged(directory, name), data)
    listed = {
        name: {"digest": digest_bytes(data), "bytes": len(data)} for name, data in files.items()
    }
    atomic_write_json(index_path, {"format": fmt, "version": 1, "files": listed}, checksum=True)
    for name in files:
        os.replace(_staged(directory, name), os.path.join(directory, name))


def file_digest(path: str) -> str:
    """:func:`digest_bytes` of a file's content."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


def read_file_set(
    directory: str, names: list[str], *, what: str, optional: tuple[str, ...] = ()
) -> tuple[dict[str, bytes], bool]:
    """The bytes of ``names`` in ``directory`` and whether they were verified; each of
    ``optional`` is read too where the set holds it (a file a later version added).

    Where a commit point (``ocd_files.json``, see :func:`write_file_set`) exists, each file must
    match its checksum there, read from its final name or, after a save interrupted between its
    commit point and its renames, from ``name.next``; a file that matches neither is a
    :class:`~ocdwrap.errors.CorruptFileError` naming it, with ``what`` (what the set is and how
    to recreate it). Without one (written by ocdwrap 0.1.0) the files are read unverified.
    """
    index_path = os.path.join(directory, ADAPTER_FILES_NAME)
    if not os.path.exists(index_path):
        out = {}
        for name in [*names, *optional]:
            if name in optional and not os.path.exists(os.path.join(directory, name)):
                continue
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
        return out, False
    listed = read_json(index_path, what=what).get("files", {})
    out = {}
    for name in [*names, *(n for n in optional if n in listed)]:
        if name not in listed:
            raise CorruptFileError(f"{index_path} does not list {name}. {what}")
        digest = listed[name]["digest"]
        for path in (os.path.join(directory, name), _staged(directory, name)):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    data = f.read()
                if digest_bytes(data) == digest:
                    out[name] = data
                    break
        else:
            raise CorruptFileError(
                f"{os.path.join(directory, name)} does not match the checksum recorded when it "
                f"was saved (in {ADAPTER_FILES_NAME}): the file was damaged or changed. {what}"
            )
    return out, True


def json_from_bytes(data: bytes, path: str) -> dict[str, Any]:
    """Parse a JSON object read with :func:`read_file_set`; damage is a CorruptFileError."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); the file is corrupted.") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(obj).__name__}, not an object.")
    return obj
