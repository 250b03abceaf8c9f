"""``wrap()`` and ``OCDModel``: the base model with its target layer made dynamic.

``OCDModel(*args, **kwargs)`` is called exactly like the base model and returns the same
type. Under the hood one call is two passes over the base model:

1. a capture pass (no delta) that records I(x) = (layer input, layer output, model output);
2. the prediction pass, where the target layer computes with W + rho(I(x)) * delta_hat for every
   sample, delta_hat drawn by the fitted hypernetwork (``num_draws`` per input: the batch is
   repeated, all draws run in one pass, and the draws are averaged).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .batches import (
    concat_outputs,
    explain_device_dtype_errors,
    first_tensor,
    map_tensors,
    read_output,
)
from .capture import (
    Conditioning,
    LayerCapture,
    attention_mask,
    build_conditioning,
    conditioning_options,
)
from .card import base_model_name
from .config import OCDConfig, SamplingConfig
from .ensemble import EnsembleOutput, combine_draws
from .errors import (
    BaseModelMismatchError,
    NotFittedError,
)
from .io import (
    tensor_fingerprint,
)
from .layer import (
    DeltaSpec,
    DynamicLayer,
    LayerState,
    _get_parent,
    resolve_layer,
)
from .split import split_for

logger = logging.getLogger("ocdwrap")


class OCDModel(nn.Module):
    """A base model whose target layer gets per-input weights from a fitted OCD hypernetwork.

    Create it with :func:`ocdwrap.wrap` or :meth:`OCDModel.from_pretrained`.

    Example:
        >>> model = ocdwrap.wrap(base, layer="fc2")
        >>> store = ocdwrap.collect(model, train_loader, loss_fn, out_dir="deltas/")
        >>> ocdwrap.fit(model, store)
        >>> logits = model(images)                      # same call as base(images)
        >>> with model.disable_adapter():
        ...     base_logits = model(images)
    """

    def __init__(
        self,
        base: nn.Module,
        layer: str,
        config: OCDConfig | None = None,
        sampling: SamplingConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or OCDConfig()
        if not isinstance(config, OCDConfig):
            raise TypeError(f"config must be an ocdwrap.OCDConfig, got {type(config).__name__}.")
        config = config.replace(
            layer=layer,
            base_model_class=config.base_model_class or type(base).__name__,
            base_model_name_or_path=config.base_model_name_or_path or base_model_name(base),
        )
        sampling = sampling or SamplingConfig()
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(
                f"sampling must be an ocdwrap.SamplingConfig, got {type(sampling).__name__}."
            )
        sampling.check_schedule(config)
        original = resolve_layer(base, layer)
        if config.delta == "lowrank":  # a rank the layer cannot have: say so now, not at collect
            config.lowrank_rank(tuple(original.weight.shape), layer)
        self.config = config
        self.sampling_config = sampling  # the defaults model.sampling(...) overrides
        self.layer_name = layer
        self._state = LayerState()
        self._requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_model = base
        dynamic = DynamicLayer(original, self._state)
        parent, attr = _get_parent(base, layer)
        setattr(parent, attr, dynamic)
        self._capture = LayerCapture(dynamic, self._state)
        self.hypernet: nn.Module | None = None
        # fit continues from the loaded hypernetwork (from_pretrained(is_trainable=True))
        self.is_trainable = False
        # what the model card reports: set by ocdwrap.fit, headroom and compare on this model
        self.fit_report: Any = None
        self.headroom_report: Any = None
        self.compare_report: Any = None

    # --- the target layer --------------------------------------------------------------------
    @property
    def target_layer(self) -> DynamicLayer:
        """The dynamic layer (its original module is ``.base_layer``)."""
        parent, attr = _get_parent(self.base_model, self.layer_name)
        return getattr(parent, attr)

    @property
    def layer_kind(self) -> str:
        return self.target_layer.kind

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.target_layer.weight.shape)

    def layer_fingerprint(self) -> str:
        """A hash of the target layer's base weight and bias, to tell base models apart."""
        layer = self.target_layer
        return tensor_fingerprint(layer.weight, layer.bias)

    @property
    def device(self) -> torch.device:
        return self.target_layer.weight.device

    # --- state switches ------------------------------------------------------------------------
    @contextmanager
    def disable_adapter(self) -> Iterator[OCDModel]:
        """Inside this context the model behaves exactly like the base model."""
        with self._state.setting("disabled", True):
            yield self

    @contextmanager
    def use_deltas(self, spec: DeltaSpec) -> Iterator[OCDModel]:
        """Run the base model with explicit per-sample deltas (no capture, no generation)."""
        with self._state.setting("delta", spec):
            yield self

    @contextmanager
    def sampling(self, **overrides: Any) -> Iterator[OCDModel]:
        """Temporarily change sampling settings for calls in this thread.

        Accepts the fields of :class:`~ocdwrap.SamplingConfig` (the defaults, saved with the
        adapter as ``model.sampling_config``): ``num_draws``, ``seed``, ``sampler``,
        ``sampling_steps``, ``eta``, ``task``, ``scale`` (``"global"``: the training set's mean rho instead of the scale model's
        rho(I(x)), the paper's "no scaling" ablation; ``"learned"``: the scale model) and
        ``max_pass_batch`` (the most rows one prediction pass takes: K draws of B inputs run
        K x B rows, in consecutive passes above it; the result is the same).

        Example:
            >>> with model.sampling(num_draws=5, seed=0):
            ...     logits = model(x)        # OCD(5): the mean of five generated networks
            >>> with model.sampling(scale="global"):
            ...     logits = model(x)        # the same generator with one global scale
            >>> with model.sampling(num_draws=5, max_pass_batch=64):
            ...     images = model(poses)    # 5 x B renders, at most 64 per pass
        """
        allowed = {f.name for f in dataclasses.fields(SamplingConfig)}
        bad = set(overrides) - allowed
        if bad:
            raise TypeError(
                f"sampling() got unknown settings {sorted(bad)}; allowed: {sorted(allowed)} "
                "(the fields of ocdwrap.SamplingConfig)."
            )
        self.sampling_config.replace(**overrides).check_schedule(self.config)  # validate
        with self._state.setting("overrides", {**self._state.overrides, **overrides}):
            yield self

    def _setting(self, name: str) -> Any:
        return self._state.overrides.get(name, getattr(self.sampling_config, name))

    # --- passes --------------------------------------------------------------------------------
    def _call_base(self, args: tuple, kwargs: dict) -> Any:
        with explain_device_dtype_errors(self.base_model, (args, kwargs)):
            return self.base_model(*args, **kwargs)

    def conditioning(self, *args: Any, **kwargs: Any) -> tuple[Conditioning, Any]:
        """One base pass: the per-sample conditioning I(x) and the base model's output."""
        return self._conditioning(args, kwargs, lambda: self._call_base(args, kwargs))

    def _conditioning(
        self, args: tuple, kwargs: dict, run: Callable[[], Any]
    ) -> tuple[Conditioning, Any]:
        tensor = first_tensor((args, kwargs))
        if tensor is None:
            raise TypeError(
                "OCDModel got no tensor inputs; call it the way the base model is called."
            )
        B = tensor.shape[0]
        with self._state.setting("delta", None), self._capture.session() as records:
            out = run()
        cond = build_conditioning(
            records,
            read_output(out),
            self.layer_kind,
            B,
            attention_mask(args, kwargs),
            **conditioning_options(self.config),
        )
        return cond, out

    def _require_hypernet(self) -> nn.Module:
        if self.hypernet is None:
            raise NotFittedError(
                "This OCDModel has no fitted hypernetwork yet: run ocdwrap.collect(...) and "
                "ocdwrap.fit(model, store), or load one with OCDModel.from_pretrained(base, dir). "
                "For the base model's behaviour use `with model.disable_adapter():`."
            )
        return self.hypernet

    def _rng(self, rng: torch.Generator | None) -> torch.Generator | None:
        if rng is not None:
            return rng
        seed = self._setting("seed")
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def generate(
        self,
        cond: Conditioning,
        *,
        num_draws: int = 1,
        rng: torch.Generator | None = None,
    ) -> DeltaSpec:
        """Per-sample deltas for conditioning ``cond``: ``num_draws`` per sample, sample-major.

        ``rng`` (a ``torch.Generator``) fixes the initial noise.
        """
        hypernet = self._require_hypernet()
        expected = getattr(hypernet, "dims", None)
        if expected is not None and tuple(cond.dims) != tuple(expected):
            raise BaseModelMismatchError(
                f"The conditioning has widths {tuple(cond.dims)} (layer input, layer output, model "
                f"output) but the hypernetwork was fitted on {tuple(expected)}. The model output is "
                "pooled by OCDConfig.output_layout and output_grid (now "
                f"{self.config.output_layout!r}, {self.config.output_grid}): use the values the "
                "collection was made with, or collect and fit again."
            )
        with _no_autocast(self.device):  # OCD's networks keep their own dtype (float32)
            return hypernet.generate(
                cond.to(self.device),
                num_draws=num_draws,
                rng=self._rng(rng),
                sampler=self._setting("sampler"),
                steps=self._setting("sampling_steps"),
                eta=self._setting("eta"),
                scale=self._setting("scale"),  # None: the adapter's (OCDConfig.scale)
            )

    def _draws(self, args: tuple, kwargs: dict, num_draws: int, rng: torch.Generator | None):
        split = (
            split_for(self, args, kwargs, lambda: self._call_base(args, kwargs))
            if num_draws == 1
            else None
        )
        if split is not None:  # the part upstream of the layer once, not once per pass
            with explain_device_dtype_errors(self.base_model, (args, kwargs)):
                boundary = split.prefix(args, kwargs)

            def suffix() -> Any:
                with explain_device_dtype_errors(self.base_model, (args, kwargs)):
                    return split.suffix(boundary)

            cond, _ = self._conditioning(args, kwargs, suffix)
            spec = self.generate(cond, num_draws=1, rng=rng)
            with self.use_deltas(spec):
                return suffix(), cond.layer_input.shape[0]
        cond, _ = self.conditioning(*args, **kwargs)
        spec = self.generate(cond, num_draws=num_draws, rng=rng)
        B = cond.layer_input.shape[0]
        if num_draws > 1:
            args, kwargs = map_tensors(
                (args, kwargs),
                lambda t: t.repeat_interleave(num_draws, 0) if t.dim() and t.shape[0] == B else t,
            )
        out = self._predict_pass(args, kwargs, spec, B * num_draws)
        return out, B

    def _predict_pass(self, args: tuple, kwargs: dict, spec: DeltaSpec, rows: int) -> Any:
        """The base model with ``spec`` on ``rows`` rows, in passes of at most
        ``max_pass_batch`` rows (the outputs concatenated along dim 0)."""
        limit = self._setting("max_pass_batch")
        if limit is None or rows <= int(limit):
            with self.use_deltas(spec):
                return self._call_base(args, kwargs)
        outs = []
        for start in range(0, rows, int(limit)):
            part = slice(start, min(start + int(limit), rows))
            a, kw = map_tensors(
                (args, kwargs),
                lambda t, part=part: t[part] if t.dim() and t.shape[0] == rows else t,
            )
            with self.use_deltas(spec.index(part)):
                outs.append(self._call_base(a, kw))
        return concat_outputs(outs, rows)

    def _task(self, pred: torch.Tensor) -> str:
        task = self._setting("task")
        if task != "auto":
            return task
        return (
            "classification"
            if pred.dim() == 2 and pred.shape[1] > 1 and pred.is_floating_point()
            else "regression"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._state.disabled or self._state.delta is not None:
            return self._call_base(args, kwargs)
        num_draws = int(self._setting("num_draws"))
        if num_draws == 1:
            out, _ = self._draws(args, kwargs, 1, None)
            return out
        return self.ensemble(*args, num_draws=num_draws, **kwargs).output

    def ensemble(
        self,
        *args: Any,
        num_draws: int = 5,
        rng: torch.Generator | None = None,
        align: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> EnsembleOutput:
        """Run ``num_draws`` generated networks per input and combine them (the paper's OCD(K)).

        Classification averages probabilities; regression averages values. ``std`` and
        ``uncertainty`` give the spread between draws. ``rng`` (a ``torch.Generator``) fixes the
        initial noise.

        ``align``, for outputs with an order inside that the draws need not share (a
        separator's speakers): called with the draws' raw predictions (K, B, ...), it returns
        them reordered to one common order (same shape) before they are combined; ``draws``,
        ``mean``, ``std`` and ``output`` are then those of the aligned draws.

        Example:
            >>> ens = model.ensemble(images, num_draws=5, rng=torch.Generator().manual_seed(0))
            >>> ens.mean.argmax(1), ens.uncertainty
        """
        out, B = self._draws(args, kwargs, num_draws, rng)
        return combine_draws(out, B, num_draws, self._task(read_output(out)), align)

    def _apply(self, fn: Callable, recurse: bool = True) -> OCDModel:
        # .to(dtype) / .half() / .bfloat16() cast the base model only: the hypernetwork follows
        # the device but keeps its dtype (float32 unless cast on purpose via model.hypernet.to()).
        hyper = self._modules.pop("hypernet", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if hyper is not None:
                self._modules["hypernet"] = hyper
        if hyper is not None:
            probe = next(iter(hyper.buffers()), None)
            if probe is not None:
                hyper.to(fn(probe.detach()[:0]).device)
        return self

    # --- size ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of that name returns them.

        Trainable: what :func:`ocdwrap.fit` trains, the hypernetwork's generator and scale model
        (0 before a hypernetwork is fitted or loaded); all: those plus the frozen base model
        (the generator's EMA copy, which sampling uses, is counted in neither: it is an average,
        not trained).
        """
        base = sum(p.numel() for p in self.base_model.parameters())
        if self.hypernet is None:
            return 0, base
        trainable = sum(
            p.numel()
            for part in (self.hypernet.net, self.hypernet.scale)
            for p in part.parameters()
        )
        return trainable, base + trainable

    def print_trainable_parameters(self) -> None:
        """Print the counts of :meth:`get_nb_trainable_parameters`, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
        )

    # --- undo ------------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove ocdwrap from the base model and return it untouched (original layer, flags)."""
        self._capture.remove()
        parent, attr = _get_parent(self.base_model, self.layer_name)
        setattr(parent, attr, self.target_layer.base_layer)
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        base = self.base_model
        return base

    # --- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Save the adapter (never the base model): ``ocd_config.json`` (the adapter's
        :class:`OCDConfig`, with the ocdwrap version and the base model's class and name),
        ``ocd_model.safetensors``, ``ocd_sampling.json`` (its :class:`SamplingConfig`), a
        ``README.md`` model card, and ``ocd_files.json``, which names them with their checksums.

        The card (:mod:`ocdwrap.card`) names the base model, the layer, the delta and generator,
        the ocdwrap version, the fit and, when ``ocdwrap.headroom`` was run on this model, its
        verdict. A ``README.md`` already in ``directory`` that ocdwrap did not write is left as
        it is (the card is then not written).

        ``ocd_files.json`` is the commit point: a save killed at any moment leaves the adapter
        that was there before or the new one (``from_pretrained`` loads whole adapters only),
        and a damaged file is refused when loaded. Refuses to replace an existing adapter unless
        ``overwrite=True``.
        """
        from .saving import save_adapter

        return save_adapter(self, directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        base: nn.Module,
        directory: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        is_trainable: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> OCDModel:
        """Wrap ``base`` and load a saved adapter into it (frozen, eval mode).

        With ``is_trainable=True`` (PEFT's name) a later :func:`ocdwrap.fit` continues from the
        loaded hypernetwork (its weights, EMA and the data statistics it was fitted with)
        instead of starting a fresh one; ``steps`` then counts the steps of that call (extra
        steps, as a new ``transformers.Trainer`` on a loaded model does). An adapter holds no
        optimizer state (it would triple its size, and transformers keeps it in training
        checkpoints, not in the model): Adam's moments start afresh. For an exact continuation
        of an interrupted fit use ``fit(checkpoint_dir=...)``, whose checkpoints hold them.

        ``directory`` is a local directory written by :meth:`save_pretrained`, or the id of a
        Hugging Face Hub repository holding one (``"owner/name"``, fetched with
        ``huggingface_hub.snapshot_download`` with ``revision``, ``cache_dir``,
        ``local_files_only`` and ``token``; ``HF_HUB_OFFLINE=1`` reads the local cache only). A
        path that does not exist and is not of that form (``./adapter``, ``/abs/path``,
        ``a/b/c``) is an :class:`AdapterNotFoundError` naming it, never a network call.

        Raises :class:`BaseModelMismatchError` when ``base``'s target layer is not the one the
        adapter was fitted on.
        """
        from .saving import load_adapter

        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        return load_adapter(cls, base, directory, device, is_trainable, token=token, **hub)


@contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    available = getattr(torch.amp, "is_autocast_available", lambda _: device.type == "cuda")
    if not available(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield
