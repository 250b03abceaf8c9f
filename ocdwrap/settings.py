"""The machinery of ocdwrap's settings dataclasses (:mod:`ocdwrap.config`): fields with help
text and role metadata, JSON round trip, validation, and where each field of ocdwrap 0.1.0's flat
config lives now."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict, field, fields
from typing import Any

from .errors import ConfigError

COLLECTION_RULES = ("always", "not_default", "lowrank")


def _f(
    default: Any, help: str, *, collection: str | None = None, results: bool = True, **kw: Any
) -> Any:
    """A field with its help text; ``collection``: how it enters a collection's identity
    ("always"; "not_default": only when not the default, a field added after collections were
    first written; "lowrank": for delta="lowrank"/"auto" only); ``results``: whether it changes
    what a fit computes (beyond float rounding)."""
    meta = {"help": help, "collection": collection, "results": results}
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, str):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_CHOICES: dict[str, tuple[str | None, ...]] = {
    "overfit_optimizer": ("adam", "sgd"),
    "delta": ("full", "rank1", "lowrank", "auto"),
    "generator": ("diffusion", "regression"),
    "scale": ("learned", "global"),
    "sampler": ("ddim", "ddpm"),
    "task": ("auto", "classification", "regression"),
    "on_nonfinite": ("skip", "raise"),
    "delta_normalization": ("std", "rms"),
    "output_layout": (
        "channels_first",
        "channels_last",
        "sequence_channels_first",
        "sequence_channels_last",
    ),
    "layer_calls": ("once", "chunks"),
}


def _positive_int(value: Any) -> bool:
    """An integer >= 1 (an int, or a float with an integer value as JSON may give); not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value).is_integer() and value >= 1


# --- 0.1.0's flat config: where each of its fields lives now ------------------------------------
# old field -> (new home, new name); "collect" and "select_layer" are those functions' arguments
MOVED: dict[str, tuple[str, str]] = {
    "fit_steps": ("FitArgs", "steps"),
    "fit_batch_size": ("FitArgs", "batch_size"),
    "fit_micro_batch_size": ("FitArgs", "micro_batch_size"),
    "fit_lr": ("FitArgs", "lr"),
    "scale_lr": ("FitArgs", "scale_lr"),
    "ema_decay": ("FitArgs", "ema_decay"),
    "grad_clip": ("FitArgs", "grad_clip"),
    "checkpoint_every": ("FitArgs", "checkpoint_every"),
    "num_draws": ("SamplingConfig", "num_draws"),
    "seed": ("SamplingConfig", "seed"),
    "task": ("SamplingConfig", "task"),
    "max_pass_batch": ("SamplingConfig", "max_pass_batch"),
    "sampler": ("SamplingConfig", "sampler"),
    "sampling_steps": ("SamplingConfig", "sampling_steps"),
    "eta": ("SamplingConfig", "eta"),
    "perturbation": ("select_layer", "perturbation"),
    "selection_draws": ("select_layer", "draws"),
    "noise_scale": ("select_layer", "noise_scale"),
    "shard_size": ("collect", "shard_size"),
    "on_nonfinite": ("collect", "on_nonfinite"),  # and FitArgs.on_nonfinite
}


def _moved_message(names: list[str]) -> str:
    parts = []
    for n in names:
        home, new = MOVED[n]
        where = f"{home}({new}=...)" if home[0].isupper() else f"{home}(..., {new}=...)"
        parts.append(f"{n} -> {where}")
    return (
        f"OCDConfig no longer holds {', '.join(names)}: since ocdwrap 0.2.0 OCDConfig defines the "
        "adapter only, and run-time settings have their own homes: " + "; ".join(parts) + ". "
        "See CHANGELOG.md."
    )


def split_legacy(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """0.1.0's flat config read into its homes: {"OCDConfig", "FitArgs", "SamplingConfig",
    "select_layer", "collect"} -> {field: value} (``on_nonfinite`` goes to FitArgs and collect).

    Example:
        >>> split_legacy({"fit_steps": 50, "num_draws": 5, "delta": "rank1"})["FitArgs"]
        {'steps': 50}
    """
    homes: dict[str, dict[str, Any]] = {
        h: {} for h in ("OCDConfig", "FitArgs", "SamplingConfig", "select_layer", "collect")
    }
    for k, v in d.items():
        if k in MOVED:
            home, new = MOVED[k]
            homes[home][new] = v
            if k == "on_nonfinite":
                homes["FitArgs"]["on_nonfinite"] = v
        else:
            homes["OCDConfig"][k] = v
    return homes


class _Settings:
    """JSON round trip, help texts and ``replace`` for the settings dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown {cls.__name__} keys {unknown} (written by a newer ocdwrap?); "
                "upgrade ocdwrap to use them.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls, name: str) -> str:
        """The documentation of one field."""
        for f in fields(cls):
            if f.name == name:
                return f.metadata["help"]
        raise ConfigError(f"{cls.__name__} has no field {name!r}.")

    def _check_choices(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            optional = value is None and f.default is None  # None: "not set here"
            if f.name in _CHOICES and value not in _CHOICES[f.name] and not optional:
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}={value!r} is not valid; choose one of "
                    f"{list(_CHOICES[f.name])}."
                )

    def _check_positive(self, *names: str, optional: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not _positive_int(value):
                none = "None or " if optional else ""
                raise ConfigError(
                    f"{type(self).__name__}.{name}={value!r} is not valid: it must be {none}an "
                    "integer >= 1."
                )
            setattr(self, name, int(value))
