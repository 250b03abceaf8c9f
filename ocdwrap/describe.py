"""``ocdwrap info``: what a directory holds (an adapter, a delta collection, a fit checkpoint),
read from its files without building anything."""

from __future__ import annotations

import json
import os
from typing import Any

from .io import CHECKPOINT_JSON, CONFIG_NAME, MANIFEST_NAME, SAMPLING_NAME, WEIGHTS_NAME

UNVERIFIED = "none (written by ocdwrap 0.1.0): unverified"


def _dir_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_adapter(directory: str) -> dict[str, Any]:
    """What a saved adapter holds (read from its files; nothing is built)."""
    from .card import read_card
    from .io import json_from_bytes, read_file_set, safetensors_metadata, tensors_from_bytes

    path = os.path.join(directory, WEIGHTS_NAME)
    files, verified = read_file_set(
        directory,
        [CONFIG_NAME, WEIGHTS_NAME],
        what="Save the adapter again.",
        optional=(SAMPLING_NAME,),
    )
    meta = safetensors_metadata(files[WEIGHTS_NAME], path)
    tensors = tensors_from_bytes(files[WEIGHTS_NAME], path)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    config = json_from_bytes(files[CONFIG_NAME], os.path.join(directory, CONFIG_NAME))
    spec = json.loads(meta.get("hypernet", "{}"))

    def count(prefix: str) -> int:
        total = 0
        for k, shape in shapes.items():
            if k.startswith(prefix):
                n = 1
                for s in shape:
                    n *= s
                total += n
        return total

    from .settings import split_legacy

    homes = split_legacy(config)  # a 0.1.0 config holds the sampling defaults itself
    if SAMPLING_NAME in files:
        homes["SamplingConfig"] = json_from_bytes(
            files[SAMPLING_NAME], os.path.join(directory, SAMPLING_NAME)
        )
    keys = (
        "base_model_name_or_path",
        "library_version",
        "delta",
        "generator",
        "scale",
        "overfit_optimizer",
        "overfit_lr",
        "overfit_steps",
    )
    sampling = ("sampler", "sampling_steps", "num_draws")
    return {
        "kind": "adapter",
        "directory": directory,
        "layer": meta.get("layer"),
        "fingerprint": meta.get("fingerprint"),
        "layer_kind": spec.get("kind"),
        "weight_shape": spec.get("weight_shape"),
        "conditioning_dims": spec.get("dims"),
        "config": {
            **{k: config.get(k) for k in keys if config.get(k) is not None},
            **{k: homes["SamplingConfig"].get(k) for k in sampling},
        },
        "parameters": {
            "generator": count("net."),
            "generator_ema": count("ema."),
            "scale_model": count("scale."),
        },
        "dtypes": dtypes,
        "bytes": _dir_bytes(directory),
        "checksums": "xxh3_64 per file: verified" if verified else UNVERIFIED,
        "model_card": read_card(directory),
    }


def describe_collection(directory: str) -> dict[str, Any]:
    """What a delta collection holds (from its manifest and file sizes)."""
    from .store import DeltaStore

    store = DeltaStore(directory)
    m = store.manifest
    ident = m["identity"]
    n = len(store)
    size = sum(os.path.getsize(p) for p in store.shard_paths() if os.path.exists(p))
    return {
        "kind": "collection",
        "directory": directory,
        "layer": ident["layer"],
        "fingerprint": ident["fingerprint"],
        "layer_kind": ident["layer_kind"],
        "weight_shape": ident["weight_shape"],
        "overfit": {k: ident[k] for k in ("overfit_optimizer", "overfit_lr", "overfit_steps")},
        "samples": n,
        "complete": store.complete,
        "stopped": store.stopped,
        "positions": store.positions,
        "checksums": "xxh3_64 per tensor: checked when read" if store.verified else UNVERIFIED,
        "skipped_nonfinite": int(m.get("skipped", 0)),
        "shards": len(m["shards"]),
        "processes": int(m.get("world_size", 1)),
        "stored": m.get("keys"),
        "conditioning_dims": m.get("dims"),
        "shard_bytes": size,
        "bytes_per_sample": size / n if n else None,
        "summary": m.get("summary"),
    }


def describe_checkpoint(directory: str) -> dict[str, Any]:
    """Where a resumable fit checkpoint stands."""
    from .io import read_json

    meta = read_json(os.path.join(directory, CHECKPOINT_JSON))
    run = meta.get("run_id", {})
    losses = meta.get("losses") or []
    return {
        "kind": "fit checkpoint",
        "directory": directory,
        "layer": run.get("store", {}).get("layer"),
        "step": meta.get("step"),
        "steps": run.get("steps"),
        "samples": run.get("samples"),
        "last_loss": losses[-1] if losses else None,
        "checksums": "xxh3_64: checked when resumed" if "tensors_digest" in meta else UNVERIFIED,
    }


def describe(directory: str) -> list[dict[str, Any]]:
    """Describe ``directory``: an adapter, a collection, a fit checkpoint, or a folder holding some
    of those one level down (a Trainer's output_dir). Raises FileNotFoundError if none."""
    found = []
    if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        found.append(describe_adapter(directory))
    if os.path.exists(os.path.join(directory, MANIFEST_NAME)):
        found.append(describe_collection(directory))
    if os.path.exists(os.path.join(directory, CHECKPOINT_JSON)):
        found.append(describe_checkpoint(directory))
    if not found and os.path.isdir(directory):
        for sub in sorted(os.listdir(directory)):
            path = os.path.join(directory, sub)
            if os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, f))
                for f in (WEIGHTS_NAME, MANIFEST_NAME, CHECKPOINT_JSON)
            ):
                found.extend(describe(path))
    if not found:
        raise FileNotFoundError(
            f"{directory} holds no ocdwrap adapter ({WEIGHTS_NAME}), collection ({MANIFEST_NAME}) "
            f"or fit checkpoint ({CHECKPOINT_JSON})."
        )
    return found


def _card_line(card: dict[str, Any] | None) -> str:
    if card is None:
        return "none"
    parts = [f"README.md: {card.get('title') or '(no title)'}"]
    if card.get("base_model"):
        parts.append(f"base model {card['base_model']}")
    if card.get("library_version"):
        parts.append(f"ocdwrap {card['library_version']}")
    if card.get("sections"):
        parts.append("sections: " + ", ".join(card["sections"]))
    return "; ".join(parts)


def _collection_state(info: dict[str, Any]) -> str:
    if not info["complete"]:
        return "INCOMPLETE: run collect again to resume"
    if info["stopped"] == "max_samples":
        return f"the first {info['positions']:,} samples (stopped at max_samples)"
    if info["stopped"] == "end_of_data":
        return "complete: the whole data"
    return "complete (written by ocdwrap 0.1.0: whether max_samples stopped it is not recorded)"


def print_info(info: dict[str, Any]) -> None:
    print(f"{info['kind']}: {info['directory']}")
    rows: list[tuple[str, Any]] = [
        (
            "layer",
            f"{info.get('layer')} ({info.get('layer_kind', '?')}, weight {info.get('weight_shape')})",
        )
    ]
    if info["kind"] == "adapter":
        rows += [
            ("base fingerprint", info["fingerprint"]),
            ("conditioning dims", info["conditioning_dims"]),
            *[(k, v) for k, v in info["config"].items()],
            ("parameters", ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items())),
            ("dtypes", ", ".join(info["dtypes"])),
            ("size on disk", _human(info["bytes"])),
            ("checksums", info["checksums"]),
            ("model card", _card_line(info.get("model_card"))),
        ]
    elif info["kind"] == "collection":
        rows += [
            ("base fingerprint", info["fingerprint"]),
            ("samples", f"{info['samples']:,} ({_collection_state(info)})"),
            ("skipped (NaN/Inf)", info["skipped_nonfinite"]),
            ("shards", f"{info['shards']} written by {info['processes']} process(es)"),
            ("stored per sample", ", ".join(info["stored"] or [])),
            ("conditioning dims", info["conditioning_dims"]),
            ("overfit", info["overfit"]),
            ("size on disk", _human(info["shard_bytes"])),
            (
                "per sample",
                _human(info["bytes_per_sample"]) if info["bytes_per_sample"] else "-",
            ),
            ("checksums", info["checksums"]),
        ]
        summary = info.get("summary") or {}
        if summary.get("rho_mean") is not None:
            rows.append(
                ("rho mean / cv", f"{summary['rho_mean']:.4g} / {summary.get('rho_cv') or 0:.3f}")
            )
        energy = summary.get("top_singular_energy")
        if energy:
            rows.append(
                ("top singular energy", f"mean {energy['mean']:.4f}, min {energy['min']:.4f}")
            )
    else:
        rows += [
            ("step", f"{info['step']} of {info['steps']}"),
            ("samples", info["samples"]),
            ("last loss", info["last_loss"]),
            ("checksums", info["checksums"]),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


# --- import paths ---------------------------------------------------------------------------------
