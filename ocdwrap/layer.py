"""The dynamic layer: the target layer computing with W + delta_b for every sample b of a batch.

``DynamicLayer`` keeps the original module as ``base_layer`` and adds, when a delta is set
for the current call, a per-sample term with no Python loop over the batch:

* Linear, vector or sequence inputs:  y_b = base(x_b) + x_b @ delta_bᵀ          (one bmm)
* Linear, rank-one delta u_b v_bᵀ:     y_b = base(x_b) + u_b (v_bᵀ x_b)          (no matrix formed)
* Linear, low-rank sum_k s_k u_k v_kᵀ: y_b = base(x_b) + ((x_b V_bᵀ) * s_b) U_b   (two bmm, r wide)
* Conv2d (groups=1):                   y_b = base(x_b) + conv(x_b, delta_b)       (one grouped conv)
* Conv2d, low-rank:                    a grouped conv with r output channels per sample (the
  kernels v_k), then a 1x1 mixing of those r channels by s_k u_k (no kernel formed)

With no delta set the layer is exactly the base layer; a zero delta adds exact zeros.
The delta is set per thread through :class:`LayerState`, so concurrent calls do not mix.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .deltas import DeltaSpec, FullDelta, LowRankDelta, OutputProbe, Rank1Delta
from .errors import LayerNotFoundError, LayerReachError, UnsupportedLayerError

__all__ = [
    "DeltaSpec",
    "DynamicLayer",
    "FullDelta",
    "LayerState",
    "LowRankDelta",
    "OutputProbe",
    "Rank1Delta",
    "layer_kind",
]


def layer_kind(module: nn.Module) -> str:
    """'linear' or 'conv2d'; raises :class:`UnsupportedLayerError` for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"Conv2d with groups={module.groups} is not supported (only groups=1); "
                "choose another layer, e.g. a pointwise or dense convolution or a Linear layer."
            )
        return "conv2d"
    raise UnsupportedLayerError(
        f"Layer type {type(module).__name__} is not supported; ocdwrap targets nn.Linear and nn.Conv2d "
        "(groups=1). Choose one of those (ocdwrap.select_layer lists the candidates)."
    )


class LayerState(threading.local):
    """Per-thread state shared by an OCDModel and its dynamic layer."""

    def __init__(self) -> None:
        self.delta: DeltaSpec | None = None
        self.capture: list | None = None  # [(layer input, layer output)] while capturing
        self.disabled: bool = False
        self.overrides: dict = {}

    @contextmanager
    def setting(self, name: str, value: Any) -> Iterator[None]:
        """``name`` set to ``value`` inside the context, restored after it (also on error)."""
        previous = getattr(self, name)
        setattr(self, name, value)
        try:
            yield
        finally:
            setattr(self, name, previous)


class DynamicLayer(nn.Module):
    """Wraps ``base_layer`` (nn.Linear or nn.Conv2d) and adds a per-sample delta when one is set."""

    def __init__(self, base_layer: nn.Module, state: LayerState) -> None:
        super().__init__()
        self.kind = layer_kind(base_layer)
        self.base_layer = base_layer
        self._ocd_state = state

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        spec = self._ocd_state.delta
        if spec is None or self._ocd_state.disabled:
            return out
        if isinstance(spec, OutputProbe):
            if spec.delta is not None:
                out = self.add_delta_term(out, x, spec.delta)
            if spec.probe is None:
                spec.probe = torch.zeros_like(out, requires_grad=True)
            if spec.probe.shape != out.shape:  # a later chunk of a chunked pass: see overfit.py
                return out
            return out + spec.probe
        return self.add_delta_term(out, x, spec)

    def add_delta_term(self, out: torch.Tensor, x: torch.Tensor, spec: DeltaSpec) -> torch.Tensor:
        """``out`` plus the per-sample contribution of ``spec`` for input ``x``.

        For factored deltas on a Linear layer the last product is accumulated into ``out``
        (``baddbmm``): no second output-sized tensor and no separate addition, which on a layer
        that sees many positions per sample (a NeRF's first layer: thousands of ray points) is
        a memory-bound pass over the whole activation.
        """
        if self.kind == "linear" and isinstance(spec, (Rank1Delta, LowRankDelta)):
            B = spec.batch
            if out.dtype == x.dtype and x.shape[0] % B == 0:
                xs = x.reshape(B, -1, x.shape[-1])  # (B, T, in)
                z, u = self._factored(xs, spec)  # (B, T, r), (B, r, out)
                return torch.baddbmm(out.reshape(B, -1, out.shape[-1]), z, u).reshape(out.shape)
        return out + self.delta_term(x, spec).to(out.dtype)

    @staticmethod
    def _factored(
        xs: torch.Tensor, spec: Rank1Delta | LowRankDelta
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, u) with delta_b x_t = z_bt u_b for inputs xs (B, T, in): z (B, T, r), u (B, r, out)."""
        if isinstance(spec, Rank1Delta):
            v, u = spec.v.to(xs.dtype), spec.u.to(xs.dtype)
            return torch.bmm(xs, v.unsqueeze(2)), u.unsqueeze(1)  # (B, T, 1), (B, 1, out)
        v, s = spec.v.to(xs.dtype), spec.s.to(xs.dtype)
        return torch.bmm(xs, v.transpose(1, 2)) * s.unsqueeze(1), spec.u.to(xs.dtype)

    # ------------------------------------------------------------------------------------
    def delta_term(self, x: torch.Tensor, spec: DeltaSpec) -> torch.Tensor:
        """The per-sample contribution of ``spec`` for input ``x``."""
        if self.kind == "linear":
            return self._linear_term(x, spec)
        return self._conv_term(x, spec)

    def _linear_term(self, x: torch.Tensor, spec: DeltaSpec) -> torch.Tensor:
        B = spec.batch
        if x.shape[0] % B != 0:
            raise LayerReachError(
                f"The target Linear got an input of shape {tuple(x.shape)}, whose first dimension is not "
                f"a multiple of the batch size {B}; ocdwrap needs the batch (sample-major) in dim 0."
            )
        xs = x.reshape(B, -1, x.shape[-1])  # (B, T, in)
        if isinstance(spec, (Rank1Delta, LowRankDelta)):  # z_bt = s_k v_kᵀ x_t, then times u
            z, u = self._factored(xs, spec)
            term = torch.bmm(z, u)  # (B, T, out)
        else:
            d = spec.delta.to(x.dtype)
            term = torch.bmm(xs, d.transpose(1, 2))  # (B, T, out)
        return term.reshape(*x.shape[:-1], term.shape[-1])

    def _conv_term(self, x: torch.Tensor, spec: DeltaSpec) -> torch.Tensor:
        if isinstance(spec, Rank1Delta):
            raise UnsupportedLayerError(
                "A rank-one delta applies to Linear layers only, not Conv2d."
            )
        conv = self.base_layer
        B = x.shape[0]
        if spec.batch != B:
            raise LayerReachError(
                f"Conv2d input batch {B} does not match the delta batch {spec.batch}."
            )
        if isinstance(spec, LowRankDelta):  # r kernels v_k per sample, then mixed by s_k u_k
            C, kh, kw = conv.weight.shape[1:]
            kernels = spec.v.to(x.dtype).reshape(B, spec.rank, C, kh, kw)  # (B, r, C, kh, kw)
            y = self._per_sample_conv(x, kernels)  # (B, r, H', W')
            mix = (spec.u * spec.s.unsqueeze(2)).to(x.dtype)  # (B, r, out)
            return torch.einsum("brhw,bro->bohw", y, mix)  # (B, out, H', W')
        return self._per_sample_conv(x, spec.delta.to(x.dtype))  # (B, out, H', W')

    def _per_sample_conv(self, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """conv(x_b, kernels_b) for every b: x (B, C, H, W), kernels (B, K, C, kh, kw)."""
        conv = self.base_layer
        B = x.shape[0]
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        # every sample's own kernel: the batch folded into the channels, one group per sample
        y = F.conv2d(
            rearrange(x, "b c h w -> 1 (b c) h w"),
            rearrange(kernels, "b o c kh kw -> (b o) c kh kw"),
            None,
            conv.stride,
            padding,
            conv.dilation,
            groups=B,
        )
        return rearrange(y, "1 (b o) h w -> b o h w", b=B)  # (B, K, H', W')

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


# --- finding the target layer in a model --------------------------------------------------------
def _candidate_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` in ``model``; a clear error listing candidates when absent."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        candidates = _candidate_layers(model)
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise LayerNotFoundError(
            f"Target layer {name!r} not found in the base model.{hint} "
            f"Linear/Conv2d layers it has: {candidates[:40]}{' ...' if len(candidates) > 40 else ''}"
        )
    module = modules[name]
    if isinstance(module, DynamicLayer):
        raise UnsupportedLayerError(
            f"Layer {name!r} is already wrapped by ocdwrap; call unload() first."
        )
    try:
        layer_kind(module)
    except UnsupportedLayerError as e:
        raise UnsupportedLayerError(
            f"Layer {name!r} is a {type(module).__name__}. {e} Candidates: {_candidate_layers(model)[:40]}"
        ) from None
    return module
