"""Capture of the conditioning I(x) = (layer input, layer output, model output), per sample.

One base forward pass with a forward hook on the target layer gives the layer's input and
output; the model's output is read from the pass's return value. Sequence and spatial
positions are pooled *per sample* (never across the batch):

* Linear input/output (B, ..., F): mean over every dimension between the batch and the features,
  ignoring padded tokens when the batch carries an ``attention_mask`` of matching length;
* Conv2d input/output (B, C, H, W): mean over H and W;
* model output: (B,) -> (B, 1); (B, F) as is; (B, T, F) mean over T; (B, C, H, W) mean over H, W,
  or (B, H, W, C) for ``OCDConfig(output_layout="channels_last")`` (a render), and with
  ``output_grid=g`` average-pooled to g x g cells per channel instead of one mean. A 3-D output
  read as a sequence, (B, C, T) for ``output_layout="sequence_channels_first"`` (a separator's
  (B, speakers, samples)) or (B, T, C) for ``"sequence_channels_last"``, is average-pooled over
  T to ``output_grid`` cells per channel, so its width does not depend on the length.

A layer reached several times in one forward pass is an error by default (a shared module
would mix two roles). With ``OCDConfig(layer_calls="chunks")`` (rays rendered in chunks, a
sequence in windows) every call counts as more positions of the same samples: each call must
carry the whole batch in dim 0, and the pooled input and output are the mean over all
positions of all calls.

The hook records only while a capture session of the calling thread is open, so a backward
pass that recomputes the forward (gradient checkpointing) cannot corrupt what was captured.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, LayerReachError
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


def pool_model_output(
    t: torch.Tensor,
    mask: torch.Tensor | None = None,
    layout: str = "channels_first",
    grid: int = 1,
) -> torch.Tensor:
    """Pool a model output to (B, F) per sample.

    A spatial output (4+ dimensions) is (B, C, *spatial) for ``layout="channels_first"`` or
    (B, *spatial, C) for ``"channels_last"``; each channel is averaged over the spatial
    positions (``grid=1``) or pooled to ``grid`` x ``grid`` cells (two spatial dimensions),
    flattened channel-major. Under those two layouts a 3-D output is (B, T, F) tokens, averaged
    over T (``mask`` counts only unpadded tokens). The sequence layouts read a 3-D output as
    (B, C, T) (``"sequence_channels_first"``) or (B, T, C) (``"sequence_channels_last"``) and pool
    each channel over T to ``grid`` cells (adaptive average pooling; a ``mask`` of shape (B, T)
    excludes padded positions), flattened channel-major: C * grid values whatever T is.

    Example:
        >>> render = torch.rand(2, 32, 32, 3)
        >>> pool_model_output(render, layout="channels_last").shape     # mean colour
        torch.Size([2, 3])
        >>> pool_model_output(render, layout="channels_last", grid=4).shape
        torch.Size([2, 48])
        >>> separated = torch.rand(2, 5, 8000)  # (B, speakers, samples)
        >>> pool_model_output(separated, layout="sequence_channels_first", grid=4).shape
        torch.Size([2, 20])
    """
    t = t.detach().float()
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t
    if layout in SEQUENCE_LAYOUTS:
        return _pool_sequence(t, mask, layout, grid)
    if t.dim() == 3:
        return _masked_mean(t, mask)
    if layout == "channels_last":
        t = t.movedim(-1, 1)  # (B, C, *spatial)
    if grid == 1:
        return t.flatten(2).mean(dim=2)
    if t.dim() != 4:
        raise ConfigError(
            f"OCDConfig.output_grid={grid} pools two spatial dimensions, but the model output has "
            f"shape {tuple(t.shape)} (after moving channels first). Use output_grid=1 (the mean "
            "over every position), or return (B, C, H, W) / (B, H, W, C) outputs."
        )
    if t.shape[2] < grid or t.shape[3] < grid:
        raise ConfigError(
            f"OCDConfig.output_grid={grid} asks for more cells than the model output's spatial size "
            f"{tuple(t.shape[2:])} (channels {t.shape[1]}, layout {layout!r}). Use output_grid <= "
            f"{min(t.shape[2:])}, or check output_layout: 'channels_last' reads (B, H, W, C)."
        )
    return torch.nn.functional.adaptive_avg_pool2d(t, grid).flatten(1)


SEQUENCE_LAYOUTS = ("sequence_channels_first", "sequence_channels_last")


def _pool_sequence(
    t: torch.Tensor, mask: torch.Tensor | None, layout: str, grid: int
) -> torch.Tensor:
    """(B, C, T) or (B, T, C) -> (B, C * grid): each channel pooled over T to ``grid`` cells."""
    if t.dim() != 3:
        raise ConfigError(
            f"OCDConfig.output_layout={layout!r} reads a 3-D model output (B, C, T) or (B, T, C), "
            f"but the model output has shape {tuple(t.shape)}. Use output_layout='channels_first' "
            "or 'channels_last' for image outputs (4+ dimensions), or return (B, C, T)."
        )
    if layout == "sequence_channels_last":
        t = t.transpose(1, 2)  # (B, C, T)
    if t.shape[2] < grid:
        raise ConfigError(
            f"OCDConfig.output_grid={grid} asks for more cells than the model output's length "
            f"{t.shape[2]} (channels {t.shape[1]}, layout {layout!r}). Use output_grid <= "
            f"{t.shape[2]}, or check output_layout: 'sequence_channels_first' reads (B, C, T), "
            "'sequence_channels_last' (B, T, C)."
        )
    pool = torch.nn.functional.adaptive_avg_pool1d
    if mask is None or mask.shape != (t.shape[0], t.shape[2]):
        return pool(t, grid).flatten(1)
    m = mask.to(t.dtype).unsqueeze(1)  # (B, 1, T)
    return (pool(t * m, grid) / pool(m, grid).clamp_min(1e-12)).flatten(1)


class LayerCapture:
    """A forward hook on the target layer that records its input and output per thread."""

    def __init__(self, layer: nn.Module, state: LayerState) -> None:
        self.state = state
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        records = self.state.capture
        if records is None:
            return
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


def _pool_calls(tensors: list[torch.Tensor], kind: str, batch: int, mask) -> torch.Tensor:
    """The per-sample mean over every position of every call (weighted by positions per call)."""
    if len(tensors) == 1:
        return pool_layer_tensor(tensors[0].detach(), kind, batch, mask)
    total, count = None, 0
    for i, t in enumerate(tensors):
        rows = t.shape[0]
        if rows % batch != 0:
            raise LayerReachError(
                f"The target layer was reached {len(tensors)} times in one forward pass, and call "
                f"{i + 1} got {rows} rows in dim 0, not the batch of {batch} (or a multiple of it). "
                "ocdwrap counts every call as more positions of the same samples (e.g. rays "
                "rendered in chunks), so each call must carry the whole batch in dim 0: chunk "
                "along positions (dim 1), not along samples."
            )
        positions = t[0].numel() // t.shape[-1] if kind == "linear" else t[0, 0].numel()
        positions *= rows // batch
        part = pool_layer_tensor(t.detach(), kind, batch, None) * positions
        total = part if total is None else total + part
        count += positions
    return total / count


def build_conditioning(
    records: list,
    model_output: torch.Tensor,
    kind: str,
    batch: int,
    mask: torch.Tensor | None = None,
    *,
    layout: str = "channels_first",
    grid: int = 1,
    calls: str = "once",
) -> Conditioning:
    """Turn what a capture session recorded into pooled per-sample conditioning.

    ``records`` holds one (input, output) pair per call of the target layer; several calls are
    pooled as one (see the module docstring). ``layout`` and ``grid`` are the config's
    ``output_layout`` and ``output_grid``, ``calls`` its ``layer_calls``.
    """
    if not records:
        raise LayerReachError(
            "The target layer was never reached in the forward pass, so no conditioning could be "
            "captured. Check that the layer named is used by the model's forward(), or pick another."
        )
    if len(records) > 1 and calls != "chunks":
        raise LayerReachError(
            f"The target layer was reached {len(records)} times in one forward pass, and OCD "
            "needs one input per sample. If the calls are chunks of the same samples' positions "
            "(rays rendered in chunks, a long sequence in windows; each call with the whole batch "
            "in dim 0), set OCDConfig(layer_calls='chunks'). If the layer is a shared module used "
            "more than once, choose a layer that runs once per forward pass."
        )
    if len(records) > 1 and mask is not None:
        mask = None if any(x.shape[:2] != mask.shape for x, _ in records) else mask
    return Conditioning(
        _pool_calls([x for x, _ in records], kind, batch, mask),
        _pool_calls([y for _, y in records], kind, batch, mask),
        pool_model_output(model_output, mask, layout, grid),
    )


def conditioning_options(config) -> dict:
    """The keyword arguments of :func:`build_conditioning` an :class:`OCDConfig` sets."""
    return {
        "layout": config.output_layout,
        "grid": int(config.output_grid),
        "calls": config.layer_calls,
    }


def attention_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``attention_mask`` of a call (a keyword, or a key of a dict first argument), else None."""
    mask = kwargs.get("attention_mask")
    if mask is None and args and isinstance(args[0], dict):
        mask = args[0].get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None
