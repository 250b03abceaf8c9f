"""Capture of the conditioning I(x) = (layer input, layer output, model output), per sample.

One base forward pass with a forward hook on the target layer gives the layer's input and
output; the model's output is read from the pass's return value. Sequence and spatial
positions are pooled *per sample* (never across the batch):

* Linear input/output (B, ..., F): mean over every dimension between the batch and the features,
  ignoring padded tokens when the batch carries an ``attention_mask`` of matching length;
* Conv2d input/output (B, C, H, W): mean over H and W;
* model output: (B,) -> (B, 1); (B, F) as is; (B, T, F) mean over T; (B, C, H, W) mean over H, W.

The hook records only while a capture session of the calling thread is open, so a backward
pass that recomputes the forward (gradient checkpointing) cannot corrupt what was captured.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerReachError
from .layer import LayerState


@dataclass
class Conditioning:
    """Per-sample conditioning signals, each (B, d), float32."""

    layer_input: torch.Tensor
    layer_output: torch.Tensor
    model_output: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            "cond_in": self.layer_input,
            "cond_act": self.layer_output,
            "cond_out": self.model_output,
        }

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Conditioning:
        return cls(d["cond_in"], d["cond_act"], d["cond_out"])

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(
            *(t.to(device) for t in (self.layer_input, self.layer_output, self.model_output))
        )

    def index(self, idx: torch.Tensor | slice) -> Conditioning:
        return Conditioning(self.layer_input[idx], self.layer_output[idx], self.model_output[idx])

    def repeat(self, k: int) -> Conditioning:
        """Each sample repeated ``k`` times, sample-major."""
        if k == 1:
            return self
        return Conditioning(
            *(
                t.repeat_interleave(k, 0)
                for t in (self.layer_input, self.layer_output, self.model_output)
            )
        )

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer_input, layer_output, model_output)."""
        return (self.layer_input, self.layer_output, self.model_output)

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.layer_input.shape[1], self.layer_output.shape[1], self.model_output.shape[1])


def _masked_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T, F) over T, counting only positions where ``mask`` (B, T) is non-zero."""
    if mask is None or mask.shape != t.shape[:2]:
        return t.mean(dim=1)
    m = mask.to(t.dtype).unsqueeze(-1)
    return (t * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool_layer_tensor(
    t: torch.Tensor, kind: str, batch: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Pool a layer input or output to (B, F) per sample."""
    if kind == "conv2d":
        return t.float().mean(dim=(2, 3))
    t = t.float()
    if t.shape[0] != batch:  # flattened (B*T, F), sample-major
        t = t.reshape(batch, -1, t.shape[-1])
    if t.dim() == 2:
        return t
    return _masked_mean(t.reshape(batch, -1, t.shape[-1]), mask)


def pool_model_output(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool a model output to (B, F) per sample."""
    t = t.detach().float()
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return _masked_mean(t, mask)
    return t.flatten(2).mean(dim=2)


class LayerCapture:
    """A forward hook on the target layer that records its input and output per thread."""

    def __init__(self, layer: nn.Module, state: LayerState) -> None:
        self.state = state
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        records = self.state.capture
        if records is None:
            return
        if records:
            raise LayerReachError(
                "The target layer was reached more than once in one forward pass (a shared module?). "
                "OCD needs one input per sample: choose a layer that runs once per forward pass."
            )
        records.append((args[0], output))

    def remove(self) -> None:
        self.handle.remove()

    @contextmanager
    def session(self):
        """Record the target layer's input and output during the enclosed forward pass."""
        previous = self.state.capture
        records: list = []
        self.state.capture = records
        try:
            yield records
        finally:
            self.state.capture = previous


def build_conditioning(
    records: list,
    model_output: torch.Tensor,
    kind: str,
    batch: int,
    mask: torch.Tensor | None = None,
) -> Conditioning:
    """Turn what a capture session recorded into pooled per-sample conditioning."""
    if not records:
        raise LayerReachError(
            "The target layer was never reached in the forward pass, so no conditioning could be "
            "captured. Check that the layer named is used by the model's forward(), or pick another."
        )
    x, y = records[0]
    return Conditioning(
        pool_layer_tensor(x.detach(), kind, batch, mask),
        pool_layer_tensor(y.detach(), kind, batch, mask),
        pool_model_output(model_output, mask),
    )


def attention_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``attention_mask`` of a call (a keyword, or a key of a dict first argument), else None."""
    mask = kwargs.get("attention_mask")
    if mask is None and args and isinstance(args[0], dict):
        mask = args[0].get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None
