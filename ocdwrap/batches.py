"""How ocdwrap reads batches, calls the base model and reads its output.

A batch is one of:

* ``(inputs, target)`` where ``inputs`` is a tensor (the model is called as ``base(inputs)``)
  or a dict (called as ``base(**inputs)``; a sentence-transformers model is called with the
  feature dict itself, as ``SentenceTransformer.forward`` expects);
* a Hugging Face dict batch with a ``"labels"`` key: the labels are the target, the rest
  are the inputs.

The model's output is read as a tensor: a tensor as is, a ``ModelOutput`` (or dict) through
its ``logits``, a sentence-transformers feature dict through its ``sentence_embedding``,
a tuple through its first element.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import BatchFormatError, DeviceDtypeError, LossShapeError

Inputs = Any  # a tensor or a dict of tensors


def split_batch(batch: Any) -> tuple[Inputs, Any]:
    """Split a batch into ``(inputs, target)``.

    Example:
        >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise BatchFormatError(
                f"This dict batch has no 'labels' key (keys: {sorted(batch)}); ocdwrap needs a target "
                "for every training sample. Add 'labels', or yield (inputs, target) pairs."
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            if batch[1] is None:
                raise BatchFormatError(
                    "This batch's target is None; ocdwrap overfits every sample on its own loss, so it "
                    "needs labels. Yield (inputs, target) pairs with a real target."
                )
            return batch[0], batch[1]
        if len(batch) == 1:
            raise BatchFormatError(
                f"This batch is a {type(batch).__name__} with one element: inputs without labels "
                "(e.g. TensorDataset(x) instead of TensorDataset(x, y))? ocdwrap needs a target for every "
                "training sample: yield (inputs, target) pairs."
            )
        raise BatchFormatError(
            f"A batch must be an (inputs, target) pair or a dict with 'labels'; got a {type(batch).__name__} "
            f"of length {len(batch)}. Yield (inputs, target) from your data loader."
        )
    raise BatchFormatError(
        f"A batch must be an (inputs, target) pair or a dict with 'labels'; got {type(batch).__name__}. "
        "A batch without labels cannot be used to overfit: yield (inputs, target)."
    )


def batch_size(inputs: Inputs) -> int:
    """Number of samples in ``inputs`` (the size of the first dimension)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0].shape[0]
    raise BatchFormatError(
        f"Cannot find the batch dimension of inputs of type {type(inputs).__name__}."
    )


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tensor / dict / tuple / list."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        d = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(d)
        except Exception:
            return d
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``obj`` to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


def index_batch(obj: Any, index: torch.Tensor | slice) -> Any:
    """Select samples ``index`` (along dim 0) of every tensor in ``obj``."""
    return map_tensors(obj, lambda t: t[index])


def repeat_batch(obj: Any, k: int) -> Any:
    """Repeat every sample ``k`` times, sample-major: (B, ...) -> (B*k, ...)."""
    if k == 1:
        return obj
    return map_tensors(obj, lambda t: t.repeat_interleave(k, dim=0))


def _is_sentence_transformer(model: nn.Module) -> bool:
    if type(model).__name__ == "OCDModel":  # called like the model it wraps
        model = model.base_model
    return any(c.__name__ == "SentenceTransformer" for c in type(model).__mro__)


def call_model(model: nn.Module, inputs: Inputs, *args: Any, **kwargs: Any) -> Any:
    """Call ``model`` on ``inputs`` the way the batch convention says."""
    with explain_device_dtype_errors(model, inputs):
        if isinstance(inputs, Mapping) and not _is_sentence_transformer(model):
            return model(*args, **inputs, **kwargs)
        return model(inputs, *args, **kwargs)


# what torch says when an input is on another device or of a dtype a layer cannot take
_MISMATCH = re.compile(
    r"same dtype|scalar type|same device|two devices|Input type|should be the same|"
    r"Expected tensor for argument|expected device|is on device|device type",
    re.IGNORECASE,
)


def _describe(obj: Any) -> str:
    seen: list[str] = []
    map_tensors(obj, lambda t: seen.append(f"{str(t.dtype)[6:]} on {t.device}") or t)
    return ", ".join(dict.fromkeys(seen)) or "no tensors"


@contextmanager
def explain_device_dtype_errors(model: nn.Module, inputs: Any) -> Iterator[None]:
    """Turn torch's device/dtype ``RuntimeError`` inside ``model`` into :class:`DeviceDtypeError`.

    Only the error type and message change (the original stays chained as ``__cause__``);
    calls that work are not touched, so models that cast or move inputs themselves keep working.
    """
    try:
        yield
    except DeviceDtypeError:
        raise
    except RuntimeError as e:
        if not _MISMATCH.search(str(e)):
            raise
        params = {f"{str(p.dtype)[6:]} on {p.device}" for p in model.parameters()}
        raise DeviceDtypeError(
            f"The base model could not run on these inputs ({_describe(inputs)}); its parameters are "
            f"{', '.join(sorted(params)) or 'none'}. Torch said: {e}. Move and cast the batch to match: "
            "x.to(device) for the device, x.float() (or the model's dtype) for float inputs, and keep "
            "token ids as integers (ocdwrap.batches.to_device moves nested batches)."
        ) from e


def read_output(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (logits, sentence embedding, or the tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "sentence_embedding", "prediction", "predictions"):
            if key in output and isinstance(output[key], torch.Tensor):
                return output[key]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BatchFormatError(
        f"Cannot read a prediction tensor from a model output of type {type(output).__name__}: "
        "expected a tensor, a ModelOutput with 'logits', or a dict with 'sentence_embedding'."
    )


def replace_output(output: Any, new: torch.Tensor) -> Any:
    """A copy of ``output`` whose prediction tensor (see :func:`read_output`) is ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, Mapping):
        for key in ("logits", "sentence_embedding", "prediction", "predictions"):
            if key in output and isinstance(output[key], torch.Tensor):
                out = output.copy() if hasattr(output, "copy") else dict(output)
                out[key] = new
                return out
    if hasattr(output, "logits"):
        import copy

        out = copy.copy(output)
        out.logits = new
        return out
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise BatchFormatError(
        f"Cannot replace the prediction in an output of type {type(output).__name__}."
    )


def per_sample_loss(
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    prediction: torch.Tensor,
    target: Any,
    n: int,
) -> torch.Tensor:
    """Per-sample losses, shape (n,), or their sum (a scalar) when ``loss_fn`` returns one.

    Returns a tensor of shape (n,) when the loss is per sample, else a 0-dim tensor that is
    the sum over samples. Any other shape raises :class:`LossShapeError`.
    """
    loss = loss_fn(prediction, target)
    if not isinstance(loss, torch.Tensor):
        raise LossShapeError(f"loss_fn returned {type(loss).__name__}; it must return a tensor.")
    if loss.dim() == 0:
        return loss
    if loss.dim() > 1 and loss.shape[0] == n:
        return loss.reshape(n, -1).sum(dim=1)
    if loss.shape == (n,):
        return loss
    raise LossShapeError(
        f"loss_fn returned shape {tuple(loss.shape)} for a batch of {n}; it must return per-sample losses "
        f"of shape ({n},) or their sum. Use e.g. nn.CrossEntropyLoss(reduction='none')."
    )


def sample_losses(
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    prediction: torch.Tensor,
    target: Any,
    n: int,
) -> torch.Tensor:
    """Per-sample losses (n,) as float, calling ``loss_fn`` once per sample when it returns
    only their sum (a scalar). Gradients flow; detach the result where none are needed.

    Example:
        >>> sample_losses(nn.CrossEntropyLoss(reduction="sum"), logits, labels, 4).shape
        torch.Size([4])
    """
    loss = per_sample_loss(loss_fn, prediction, target, n)
    if loss.dim() == 0 and n > 1:
        loss = torch.stack(
            [
                per_sample_loss(
                    loss_fn, prediction[i : i + 1], index_batch(target, slice(i, i + 1)), 1
                ).reshape(())
                for i in range(n)
            ]
        )
    return loss.reshape(n).float()


def check_loss_is_sum(
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    prediction: torch.Tensor,
    target: Any,
    total: torch.Tensor,
) -> None:
    """When ``loss_fn`` returns a scalar, check it is the sum (not the mean) of per-sample losses."""
    n = prediction.shape[0]
    if n < 2 or not isinstance(target, torch.Tensor) or target.shape[:1] != (n,):
        return
    with torch.no_grad():
        parts = sum(
            loss_fn(prediction[i : i + 1], target[i : i + 1]).sum() for i in range(min(n, 4))
        )
        first = loss_fn(prediction[: min(n, 4)], target[: min(n, 4)]).sum()
    if not torch.allclose(parts, first, rtol=1e-3, atol=1e-6):
        raise LossShapeError(
            "loss_fn returns a scalar that is not the sum of per-sample losses (a mean?). Each sample "
            "must be overfitted on its own loss: use reduction='none' (preferred) or reduction='sum'."
        )
    del total


def check_inputs(inputs: Inputs, device: torch.device) -> None:
    """Raise :class:`DeviceDtypeError` if an input tensor is on another device than the model."""

    def check(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != device.type or (
            device.index is not None
            and t.device.index is not None
            and t.device.index != device.index
        ):
            raise DeviceDtypeError(
                f"An input tensor is on {t.device} but the model is on {device}; move the batch with "
                f".to({str(device)!r}) (ocdwrap.batches.to_device does it for nested batches)."
            )
        return t

    map_tensors(inputs, check)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a nest of inputs (None without one)."""
    found: list[torch.Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found[0] if found else None


def concat_outputs(outs: list, rows: int) -> Any:
    """The outputs of consecutive passes as one: tensors with ``rows`` rows in all are
    concatenated along dim 0, dicts, tuples and lists element by element, anything else is
    taken from the first pass."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() and sum(o.shape[0] for o in outs) == rows:
            return torch.cat(outs, 0)
        return first
    if isinstance(first, dict):
        joined = {k: concat_outputs([o[k] for o in outs], rows) for k in first}
        try:
            return type(first)(joined)
        except Exception:
            return joined
    if isinstance(first, (tuple, list)):
        return type(first)(concat_outputs(list(parts), rows) for parts in zip(*outs))
    return first
