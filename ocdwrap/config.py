"""``OCDConfig``: every setting of the method in one JSON-serialisable dataclass.

Defaults follow the authors' released code where it and the paper disagree (see
docs/how-ocd-works.md for the table): Adam lr 5e-4 for 3 overfit steps on the layer's weight
only, normalisation by the per-element standard deviation of the delta, a 1000-step linear
beta schedule from 1e-6 to 1e-2 sampled with 10 DDIM steps (eta = 0). The UNet's default size
is small enough to fit on two CPU cores; ``OCDConfig.paper()`` gives the paper's size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .io import CONFIG_NAME

FORMAT_VERSION = 1
DEFAULT_DELTA_RANK = 4  # see docs/how-ocd-works.md, "Deltas that are not rank one"


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, str):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


_CHOICES: dict[str, tuple[str, ...]] = {
    "overfit_optimizer": ("adam", "sgd"),
    "delta": ("full", "rank1", "lowrank", "auto"),
    "generator": ("diffusion", "regression"),
    "scale": ("learned", "global"),
    "sampler": ("ddim", "ddpm"),
    "task": ("auto", "classification", "regression"),
    "on_nonfinite": ("skip", "raise"),
    "delta_normalization": ("std", "rms"),
    "perturbation": ("gaussian", "reinit"),
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


@dataclass
class OCDConfig:
    """Configuration of an OCD adapter. Every field is stored in ``ocd_config.json``.

    Example:
        >>> cfg = OCDConfig(delta="rank1", overfit_steps=3)
        >>> OCDConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    # --- target layer -------------------------------------------------------------------
    layer: str | None = _f(
        None, "Name of the target module (as in model.named_modules()); set by wrap()."
    )
    layer_ranking: list = _f(
        [],
        "Layer-selection scores [[name, score], ...], best first, when layer='auto' chose the layer.",
    )

    # --- collection: overfitting each training sample ---------------------------------------
    overfit_steps: int = _f(
        3, "Gradient steps taken on each training sample alone (the paper's K=3)."
    )
    overfit_optimizer: str = _f(
        "adam", "Optimizer of the per-sample overfit: 'adam' (released code) or 'sgd' (paper text)."
    )
    overfit_lr: float = _f(5e-4, "Learning rate of the per-sample overfit.")
    adam_betas: tuple = _f((0.9, 0.999), "Adam betas of the per-sample overfit.")
    adam_eps: float = _f(1e-8, "Adam epsilon of the per-sample overfit.")
    delta_normalization: str = _f(
        "std",
        "rho_s, the size each delta is divided by: 'std' (per-element standard deviation, the "
        "released code) or 'rms' (root mean square: the paper's L2 norm / sqrt(numel)). 'std' is "
        "~0 for a delta whose elements are nearly equal (small layers, e.g. one output); use 'rms' there.",
    )
    shard_size: int = _f(
        4096,
        "Samples per safetensors shard written by collect(); a shard is the unit of resumption.",
    )
    on_nonfinite: str = _f(
        "skip", "What collect()/fit() do on NaN/Inf: 'skip' the sample and count it, or 'raise'."
    )

    # --- conditioning ----------------------------------------------------------------------
    output_layout: str = _f(
        "channels_first",
        "How the model output is read for the conditioning. For 4 or more dimensions: "
        "'channels_first' (B, C, H, W), e.g. a segmentation or a generated image in PyTorch's "
        "layout, or 'channels_last' (B, H, W, C), e.g. a render (B, H, W, 3); under these two a "
        "3-D output is (B, T, F) tokens, averaged over T. For a 3-D output read as a sequence: "
        "'sequence_channels_first' (B, C, T), e.g. a separator's (B, speakers, samples), or "
        "'sequence_channels_last' (B, T, C); each channel is pooled over T (see output_grid), "
        "and other shapes are an error. Outputs of 1-2 dimensions are not affected.",
    )
    output_grid: int = _f(
        1,
        "Spatial model outputs (4+ dimensions) are average-pooled to output_grid x output_grid "
        "cells per channel (adaptive average pooling), flattened channel-major, as the "
        "conditioning's model-output part: 1 keeps each channel's mean; 4 keeps a coarse 4 x 4 "
        "picture of a render. Under the sequence layouts each channel is pooled over T to "
        "output_grid cells (C * output_grid values, whatever the length).",
    )

    layer_calls: str = _f(
        "once",
        "How often the target layer may run in one forward pass: 'once' (a second call is an "
        "error: a shared module would mix two roles) or 'chunks' (every call holds the whole "
        "batch in dim 0 and a part of each sample's positions, e.g. rays rendered in chunks: "
        "the conditioning pools over all calls and the overfit sums the gradients of all calls).",
    )

    # --- the hypernetwork -----------------------------------------------------------------
    delta: str = _f(
        "auto",
        "Delta parameterisation: 'auto' (the default: rank1 where it is exact, else lowrank with "
        "delta_rank capped at the layer's smaller side), 'rank1' (Linear on vector inputs, exact "
        "there), 'lowrank' (delta_rank factor pairs from a truncated SVD: Conv2d, Linear on token "
        "sequences) or 'full' matrix (the paper's UNet; OCDConfig.paper(); a GPU path: on a CPU "
        "its fit takes hours where 'auto' takes minutes, and at CPU sizes it learned nothing "
        "useful in our benchmarks, docs/results.md).",
    )
    delta_rank: int = _f(
        DEFAULT_DELTA_RANK,
        "Factor pairs r per delta for delta='lowrank' (and 'auto' where it picks lowrank): "
        "delta ~ sum of r terms s_k u_k v_k^T. At most min(out, in*kh*kw) of the target layer; "
        "collect() reports the energy the r factors keep (summary 'lowrank_energy').",
    )
    generator: str = _f(
        "diffusion", "'diffusion' (the paper) or 'regression' (an MLP trained with MSE; a control)."
    )
    scale: str = _f(
        "learned",
        "'learned' scale model rho(I(x)), or 'global' (mean rho over training; the paper's ablation).",
    )
    cond_dim: int = _f(
        128,
        "Width of the conditioning embedding for the MLP denoiser, the regressor and the scale model.",
    )
    mlp_hidden: int = _f(
        256, "Hidden width of the MLP networks (rank-1 denoiser, regressor, scale model)."
    )
    mlp_layers: int = _f(3, "Residual blocks of the MLP networks.")
    unet_channels: tuple = _f(
        (32, 64, 64), "UNet2DModel block_out_channels (full path); one entry per level."
    )
    unet_layers_per_block: int = _f(1, "ResNet layers per UNet block.")
    unet_attention: bool = _f(False, "Use attention blocks at the two lowest UNet resolutions.")
    dropout: float = _f(0.0, "Dropout in the hypernetwork (always off while sampling).")

    # --- diffusion --------------------------------------------------------------------------
    num_train_timesteps: int = _f(1000, "Diffusion training timesteps (released code: 1000).")
    beta_start: float = _f(1e-6, "First beta of the linear schedule (released code: 1e-6).")
    beta_end: float = _f(1e-2, "Last beta of the linear schedule (released code: 1e-2).")
    sampler: str = _f("ddim", "Sampler: 'ddim' (released code) or 'ddpm'.")
    sampling_steps: int = _f(
        2,
        "Denoising steps at inference (deterministic DDIM). 2 by measurement: on MNIST and "
        "California Housing two steps score as well as ten or better, at a fifth of the "
        "generator's cost (benchmarks.sampling_steps, docs/performance.md); the released code "
        "and OCDConfig.paper(): 10.",
    )
    eta: float = _f(0.0, "DDIM eta (0 = deterministic given the initial noise).")
    clip_sample: bool = _f(
        False, "Clip samples to [-1, 1] in the scheduler; off: normalised deltas are unbounded."
    )

    # --- fitting ----------------------------------------------------------------------------
    fit_steps: int = _f(2000, "Optimizer steps of fit() (denoiser and scale model).")
    fit_batch_size: int = _f(128, "Batch size of fit().")
    fit_micro_batch_size: int | None = _f(
        None,
        "Samples per forward/backward pass inside one fit step (gradients accumulated, so the step "
        "equals the full batch's up to rounding). None: automatic, the full-matrix UNet in "
        "micro-batches whose largest activation stays under 16 MiB (larger buffers are mapped "
        "and page-faulted in anew on every step on a CPU), everything else in one pass.",
    )
    fit_lr: float = _f(1e-4, "Adam learning rate of the denoiser / regressor.")
    scale_lr: float = _f(1e-3, "Adam learning rate of the scale model.")
    ema_decay: float = _f(0.995, "EMA decay of the denoiser weights; sampling uses the EMA.")
    grad_clip: float = _f(1.0, "Gradient-norm clip of fit().")
    checkpoint_every: int = _f(
        500, "fit() writes a resumable checkpoint every this many steps (0: never)."
    )

    # --- inference --------------------------------------------------------------------------
    max_pass_batch: int | None = _f(
        None,
        "Most rows one prediction pass of the base model may take: an ensemble of num_draws=K "
        "draws runs K x B rows, and above this many it runs them in consecutive passes "
        "(same result). None: one pass. Also a model.sampling() setting.",
    )
    num_draws: int = _f(
        1,
        "Draws per input when the model is called; >1 returns the ensemble mean (the paper's OCD(5)).",
    )
    task: str = _f(
        "auto",
        "How draws are averaged: 'classification' (probabilities), 'regression' (values), 'auto'.",
    )
    seed: int | None = _f(None, "Seed of the sampling noise; None draws fresh noise on every call.")

    # --- layer selection ----------------------------------------------------------------------
    perturbation: str = _f(
        "gaussian",
        "Layer selection perturbation: 'gaussian' noise (paper) or 'reinit' (re-initialise the layer; a variant).",
    )
    selection_draws: int = _f(32, "Perturbation draws per candidate layer in layer selection.")
    noise_scale: float = _f(
        1.0, "Gaussian perturbation std as a multiple of the layer weight's std."
    )

    ocdwrap_version: int = _f(
        FORMAT_VERSION, "Format version of this config (for forward compatibility)."
    )

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(
                    f"OCDConfig.{name}={value!r} is not valid; choose one of {list(choices)}."
                )
        for name in (
            "overfit_steps",
            "shard_size",
            "sampling_steps",
            "fit_batch_size",
            "num_draws",
            "output_grid",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"OCDConfig.{name} must be >= 1, got {getattr(self, name)!r}.")
        if not _positive_int(self.delta_rank):
            raise ConfigError(
                f"OCDConfig.delta_rank={self.delta_rank!r} is not valid: it counts the factor pairs "
                "of each low-rank delta, so it must be an integer >= 1 (e.g. "
                f"delta_rank={DEFAULT_DELTA_RANK}, the default)."
            )
        self.delta_rank = int(self.delta_rank)
        if self.max_pass_batch is not None and not _positive_int(self.max_pass_batch):
            raise ConfigError(
                f"OCDConfig.max_pass_batch={self.max_pass_batch!r} is not valid: it is the most rows "
                "one prediction pass may take, so None (one pass) or an integer >= 1, e.g. "
                "max_pass_batch=64."
            )
        if self.max_pass_batch is not None:
            self.max_pass_batch = int(self.max_pass_batch)
        if self.fit_micro_batch_size is not None and int(self.fit_micro_batch_size) < 1:
            raise ConfigError(
                "OCDConfig.fit_micro_batch_size must be None (automatic) or >= 1, "
                f"got {self.fit_micro_batch_size!r}."
            )
        if int(self.selection_draws) < 2:
            raise ConfigError(
                f"OCDConfig.selection_draws must be >= 2 (an entropy needs several draws), "
                f"got {self.selection_draws!r}."
            )
        if self.overfit_lr <= 0:
            raise ConfigError(f"OCDConfig.overfit_lr must be > 0, got {self.overfit_lr!r}.")
        if self.sampling_steps > self.num_train_timesteps:
            raise ConfigError(
                f"OCDConfig.sampling_steps={self.sampling_steps} exceeds num_train_timesteps={self.num_train_timesteps}."
            )
        self.adam_betas = tuple(self.adam_betas)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.layer_ranking = [list(r) for r in self.layer_ranking]

    # --- presets ----------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> OCDConfig:
        """The paper's setting: full-matrix deltas, a 128-channel UNet with five downsamplings
        and attention, 20,000 fit steps, 10 sampling steps (the released code's)."""
        base = dict(
            delta="full",
            unet_channels=(128,) * 6,
            unet_attention=True,
            unet_layers_per_block=2,
            fit_steps=20000,
            sampling_steps=10,
        )
        base.update(overrides)
        return cls(**base)

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["unet_channels"] = list(self.unet_channels)
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OCDConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown OCDConfig keys {unknown} (written by a newer ocdwrap?); "
                "upgrade ocdwrap to use them.",
                stacklevel=2,
            )
        version = d.get("ocdwrap_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            warnings.warn(
                f"This config has format version {version}, newer than this ocdwrap's {FORMAT_VERSION}; "
                "loading what is known.",
                stacklevel=2,
            )
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["ocdwrap_version"] = FORMAT_VERSION
        return cls(**kwargs)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``ocd_config.json`` into ``directory`` (atomically) and return its path."""
        from .io import atomic_write_text

        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        atomic_write_text(path, self.to_json_string())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> OCDConfig:
        """Read ``ocd_config.json`` from ``directory``."""
        from .io import read_json

        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        return cls.from_dict(read_json(path))

    def replace(self, **changes: Any) -> OCDConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def lowrank_rank(self, weight_shape: tuple[int, ...], layer: str | None = None) -> int:
        """The factor pairs r of a low-rank delta of a layer whose weight has ``weight_shape``.

        A Conv2d weight (out, in, kh, kw) counts as the matrix (out, in·kh·kw). ``delta_rank``
        above min(out, in·kh·kw) is a :class:`ConfigError` for ``delta="lowrank"``; for
        ``delta="auto"`` (which did not ask for that rank explicitly) it is capped there.

        Example:
            >>> OCDConfig(delta="lowrank", delta_rank=4).lowrank_rank((16, 6, 5, 5))
            4
            >>> OCDConfig(delta="auto", delta_rank=8).lowrank_rank((6, 1, 5, 5))
            6
        """
        out, inner = int(weight_shape[0]), math.prod(int(s) for s in weight_shape[1:])
        most = min(out, inner)
        if self.delta_rank <= most:
            return self.delta_rank
        if self.delta == "auto":
            return most
        name = f"layer {layer!r}" if layer else "the target layer"
        raise ConfigError(
            f"OCDConfig.delta_rank={self.delta_rank} is larger than {name} allows: its weight "
            f"{tuple(weight_shape)} is the matrix {out} x {inner}, whose rank is at most {most}. "
            f"Use delta_rank <= {most} (delta_rank={most} keeps every delta exactly), "
            "or delta='full'."
        )

    @staticmethod
    def help(name: str) -> str:
        """The documentation of one field."""
        for f in fields(OCDConfig):
            if f.name == name:
                return f.metadata["help"]
        raise ConfigError(f"OCDConfig has no field {name!r}.")
