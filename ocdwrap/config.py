"""The settings of ocdwrap, each in its home.

* :class:`OCDConfig` defines an adapter: the target layer, the per-sample overfit that makes the
  deltas, the conditioning, the delta parameterisation, the networks and the diffusion schedule.
  It is what ``ocd_config.json`` holds and what is needed to rebuild and use the adapter.
* :class:`FitArgs`: how :func:`ocdwrap.fit` trains the hypernetwork (steps, batch, learning
  rates, EMA, clipping, checkpoints, seed), recorded with the fit report and checkpoint.
* :class:`SamplingConfig`: the sampling defaults of a fitted adapter (draws, seed, sampler,
  steps), saved beside it as ``ocd_sampling.json``; ``model.sampling(...)`` overrides them for
  a call.
* Layer selection is set by :func:`ocdwrap.select_layer`'s arguments (``wrap(...,
  perturbation=..., draws=..., noise_scale=...)``), collection I/O by
  :func:`ocdwrap.collect`'s (``shard_size``, ``on_nonfinite``).

Each field carries metadata: its help text, and for ``OCDConfig`` how it enters a collection's
identity (``collection``: a stored collection is resumed only by a config that agrees on these)
and whether it changes what a fit computes (``results``); ``FitArgs`` fields say the latter too.
:func:`collection_identity` and :func:`results_fields` read it, so no list of which field
belongs where is kept by hand.

Defaults follow the authors' released code where it and the paper disagree (see
docs/how-ocd-works.md for the table): Adam lr 5e-4 for 3 overfit steps on the layer's weight
only, normalisation by the per-element standard deviation of the delta, a 1000-step linear
beta schedule from 1e-6 to 1e-2 sampled with deterministic DDIM. The networks' default size is
small enough for two CPU cores; ``OCDConfig.paper()``, ``FitArgs.paper()`` and
``SamplingConfig.paper()`` give the paper's.

Files written by ocdwrap 0.1.0 held every setting in one flat ``ocd_config.json``;
:func:`split_legacy` reads its fields into their new homes (``legacy_settings``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .io import CONFIG_NAME, SAMPLING_NAME
from .settings import (
    MOVED,
    _f,
    _moved_message,
    _positive_int,
    _Settings,
    split_legacy,
)

FORMAT_VERSION = 2  # 1: ocdwrap 0.1.0's flat config; 2: settings by role
DEFAULT_DELTA_RANK = 4  # see docs/how-ocd-works.md, "Deltas that are not rank one"


def _refuse_moved(cls):
    """``OCDConfig(fit_steps=...)``: an error naming where the setting lives now."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        moved = [k for k in kwargs if k in MOVED]
        if moved:
            raise ConfigError(_moved_message(moved))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_refuse_moved
@dataclass
class OCDConfig(_Settings):
    """What defines an OCD adapter; every field is stored in ``ocd_config.json``.

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
        results=False,
    )

    # --- collection: overfitting each training sample ---------------------------------------
    overfit_steps: int = _f(
        3,
        "Gradient steps taken on each training sample alone (the paper's K=3).",
        collection="always",
    )
    overfit_optimizer: str = _f(
        "adam",
        "Optimizer of the per-sample overfit: 'adam' (released code) or 'sgd' (paper text).",
        collection="always",
    )
    overfit_lr: float = _f(5e-4, "Learning rate of the per-sample overfit.", collection="always")
    adam_betas: tuple = _f(
        (0.9, 0.999), "Adam betas of the per-sample overfit.", collection="always"
    )
    adam_eps: float = _f(1e-8, "Adam epsilon of the per-sample overfit.", collection="always")
    delta_normalization: str = _f(
        "std",
        "rho_s, the size each delta is divided by: 'std' (per-element standard deviation, the "
        "released code) or 'rms' (root mean square: the paper's L2 norm / sqrt(numel)). 'std' is "
        "~0 for a delta whose elements are nearly equal (small layers, e.g. one output); use 'rms' there.",
        collection="always",
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
        collection="not_default",
    )
    output_grid: int = _f(
        1,
        "Spatial model outputs (4+ dimensions) are average-pooled to output_grid x output_grid "
        "cells per channel (adaptive average pooling), flattened channel-major, as the "
        "conditioning's model-output part: 1 keeps each channel's mean; 4 keeps a coarse 4 x 4 "
        "picture of a render. Under the sequence layouts each channel is pooled over T to "
        "output_grid cells (C * output_grid values, whatever the length).",
        collection="not_default",
    )

    layer_calls: str = _f(
        "once",
        "How often the target layer may run in one forward pass: 'once' (a second call is an "
        "error: a shared module would mix two roles) or 'chunks' (every call holds the whole "
        "batch in dim 0 and a part of each sample's positions, e.g. rays rendered in chunks: "
        "the conditioning pools over all calls and the overfit sums the gradients of all calls).",
        collection="not_default",
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
        collection="lowrank",
    )
    delta_rank: int = _f(
        DEFAULT_DELTA_RANK,
        "Factor pairs r per delta for delta='lowrank' (and 'auto' where it picks lowrank): "
        "delta ~ sum of r terms s_k u_k v_k^T. At most min(out, in*kh*kw) of the target layer; "
        "collect() reports the energy the r factors keep (summary 'lowrank_energy').",
        collection="lowrank",
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
    clip_sample: bool = _f(
        False, "Clip samples to [-1, 1] in the scheduler; off: normalised deltas are unbounded."
    )

    # --- provenance (recorded, never changes a result) ----------------------------------------
    base_model_name_or_path: str | None = _f(
        None,
        "The base model's name or path where it records one (Hugging Face models); set by wrap().",
        results=False,
    )
    base_model_class: str | None = _f(
        None, "The base model's class name; set by wrap().", results=False
    )
    library_version: str | None = _f(
        None,
        "The ocdwrap version that saved this adapter; set by save_pretrained().",
        results=False,
    )
    ocdwrap_version: int = _f(
        FORMAT_VERSION, "Format version of this config (for forward compatibility).", results=False
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_positive("overfit_steps", "output_grid")
        if not _positive_int(self.delta_rank):
            raise ConfigError(
                f"OCDConfig.delta_rank={self.delta_rank!r} is not valid: it counts the factor pairs "
                "of each low-rank delta, so it must be an integer >= 1 (e.g. "
                f"delta_rank={DEFAULT_DELTA_RANK}, the default)."
            )
        self.delta_rank = int(self.delta_rank)
        if self.overfit_lr <= 0:
            raise ConfigError(f"OCDConfig.overfit_lr must be > 0, got {self.overfit_lr!r}.")
        self.adam_betas = tuple(self.adam_betas)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.layer_ranking = [list(r) for r in self.layer_ranking]

    # --- presets ----------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> OCDConfig:
        """The paper's adapter: full-matrix deltas, a 128-channel UNet with five downsamplings
        and attention (with ``FitArgs.paper()``'s 20,000 steps and ``SamplingConfig.paper()``'s
        10 sampling steps)."""
        base: dict[str, Any] = dict(
            delta="full", unet_channels=(128,) * 6, unet_attention=True, unet_layers_per_block=2
        )
        base.update(overrides)
        return cls(**base)

    # --- serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OCDConfig:
        """Read a config; one written by 0.1.0 (every setting in one dict) keeps its adapter
        fields here, the others are read by :func:`split_legacy` into their homes."""
        adapter = split_legacy(d)["OCDConfig"]
        version = adapter.get("ocdwrap_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            warnings.warn(
                f"This config has format version {version}, newer than this ocdwrap's {FORMAT_VERSION}; "
                "loading what is known.",
                stacklevel=2,
            )
        adapter["ocdwrap_version"] = FORMAT_VERSION
        return super().from_dict(adapter)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``ocd_config.json`` into ``directory`` (atomically) and return its path."""
        return _save(self, directory, CONFIG_NAME)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> OCDConfig:
        """Read ``ocd_config.json`` from ``directory``."""
        from .io import read_json

        return cls.from_dict(read_json(os.path.join(os.fspath(directory), CONFIG_NAME)))

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


def _save(settings: _Settings, directory: str | os.PathLike, name: str) -> str:
    from .io import atomic_write_text

    path = os.path.join(os.fspath(directory), name)
    atomic_write_text(path, settings.to_json_string())
    return path


def collection_identity(cfg: OCDConfig) -> dict[str, Any]:
    """The config's part of a collection's identity, as each field's ``collection`` rule says."""
    default, lowrank = OCDConfig(), cfg.delta in ("lowrank", "auto")
    out: dict[str, Any] = {}
    for f in fields(cfg):
        rule, value = f.metadata["collection"], getattr(cfg, f.name)
        if (
            rule == "always"
            or (rule == "not_default" and value != getattr(default, f.name))
            or (rule == "lowrank" and lowrank)
        ):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def results_fields(settings: _Settings) -> dict[str, Any]:
    """The fields of ``settings`` that change what a fit computes (their ``results`` flag)."""
    d = settings.to_dict()
    return {f.name: d[f.name] for f in fields(settings) if f.metadata["results"]}


@dataclass
class FitArgs(_Settings):
    """How :func:`ocdwrap.fit` trains the hypernetwork (transformers keeps these in its
    ``TrainingArguments``); recorded with the fit report and checkpoint, not in the adapter.

    Example:
        >>> args = FitArgs(steps=500, batch_size=64, seed=1)
        >>> report = ocdwrap.fit(model, store, args=args)
    """

    steps: int = _f(2000, "Optimizer steps of this fit (denoiser and scale model).")
    batch_size: int = _f(
        128,
        "Minibatch of stored samples per step (with several processes the global minibatch, "
        "rounded down to a multiple of the process count).",
    )
    micro_batch_size: int | None = _f(
        None,
        "Samples per forward/backward pass inside one step (gradients accumulated, so the step "
        "equals the full batch's up to rounding). None: automatic, the full-matrix UNet in "
        "micro-batches whose largest activation stays under 16 MiB (larger buffers are mapped "
        "and page-faulted in anew on every step on a CPU), everything else in one pass.",
        results=False,
    )
    lr: float = _f(1e-4, "Adam learning rate of the denoiser / regressor.")
    scale_lr: float = _f(1e-3, "Adam learning rate of the scale model.")
    ema_decay: float = _f(0.995, "EMA decay of the denoiser weights; sampling uses the EMA.")
    grad_clip: float = _f(1.0, "Gradient-norm clip.")
    checkpoint_every: int = _f(
        500,
        "With fit(checkpoint_dir=...), a resumable checkpoint every this many steps (0: never).",
        results=False,
    )
    seed: int = _f(
        0,
        "Seeds the initial weights, minibatch order, timesteps and noise (dropout, off by "
        "default, draws from torch's global generator).",
    )
    on_nonfinite: str = _f(
        "skip",
        "Stored rows or steps with NaN/Inf: 'skip' them (counted in the report) or 'raise'.",
        results=False,
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_positive("steps", "batch_size")
        self._check_positive("micro_batch_size", optional=True)
        if int(self.checkpoint_every) < 0:
            raise ConfigError(
                f"FitArgs.checkpoint_every={self.checkpoint_every!r} is not valid: 0 (never) or "
                "a number of steps."
            )
        for name in ("lr", "scale_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"FitArgs.{name} must be > 0, got {getattr(self, name)!r}.")

    @classmethod
    def paper(cls, **overrides: Any) -> FitArgs:
        """The paper's fit: 20,000 steps."""
        return cls(**{"steps": 20000, **overrides})


@dataclass
class SamplingConfig(_Settings):
    """The sampling defaults of a fitted adapter, saved beside it as ``ocd_sampling.json``
    (transformers' ``generation_config.json``); ``model.sampling(**overrides)`` changes them
    for the calls inside it.

    Example:
        >>> model = ocdwrap.wrap(net, "fc2", sampling=SamplingConfig(num_draws=5, seed=0))
        >>> with model.sampling(sampling_steps=10):
        ...     logits = model(x)
    """

    num_draws: int = _f(
        1,
        "Draws per input when the model is called; >1 returns the ensemble mean (the paper's OCD(5)).",
    )
    seed: int | None = _f(None, "Seed of the sampling noise; None draws fresh noise on every call.")
    task: str = _f(
        "auto",
        "How draws are averaged: 'classification' (probabilities), 'regression' (values), 'auto'.",
    )
    sampler: str = _f("ddim", "Sampler: 'ddim' (released code) or 'ddpm'.")
    sampling_steps: int = _f(
        2,
        "Denoising steps at inference (deterministic DDIM). 2 by measurement: on MNIST and "
        "California Housing two steps score as well as ten or better, at a fifth of the "
        "generator's cost (benchmarks.sampling_steps, docs/performance.md); the released code "
        "and SamplingConfig.paper(): 10.",
    )
    eta: float = _f(0.0, "DDIM eta (0 = deterministic given the initial noise).")
    scale: str | None = _f(
        None,
        "None: the adapter's scale (OCDConfig.scale); 'global': the training set's mean rho "
        "instead of the scale model's rho(I(x)) (the paper's 'no scaling' ablation); 'learned'.",
    )
    max_pass_batch: int | None = _f(
        None,
        "Most rows one prediction pass of the base model may take: an ensemble of num_draws=K "
        "draws runs K x B rows, and above this many it runs them in consecutive passes "
        "(same result). None: one pass.",
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_positive("num_draws", "sampling_steps")
        self._check_positive("max_pass_batch", optional=True)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"SamplingConfig.seed must be None or an int, got {self.seed!r}.")

    @classmethod
    def paper(cls, **overrides: Any) -> SamplingConfig:
        """The released code's sampling: 10 DDIM steps."""
        return cls(**{"sampling_steps": 10, **overrides})

    def check_schedule(self, config: OCDConfig) -> None:
        """A :class:`ConfigError` when more steps are asked than the schedule has."""
        if self.sampling_steps > config.num_train_timesteps:
            raise ConfigError(
                f"SamplingConfig.sampling_steps={self.sampling_steps} exceeds the adapter's "
                f"num_train_timesteps={config.num_train_timesteps}."
            )

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``ocd_sampling.json`` into ``directory`` (atomically) and return its path."""
        return _save(self, directory, SAMPLING_NAME)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SamplingConfig:
        """Read ``ocd_sampling.json`` from ``directory``."""
        from .io import read_json

        return cls.from_dict(read_json(os.path.join(os.fspath(directory), SAMPLING_NAME)))
