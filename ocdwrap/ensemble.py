"""OCD(K): the predictions of K generated networks per input, combined (the paper's ensemble),
with the spread between them as an uncertainty."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batches import map_tensors, read_output, replace_output
from .errors import ConfigError

PROB_FLOOR = 1e-30
"""The smallest probability an ensemble's prediction holds: the log of the mean probability is
taken after clamping at it, so one sample's cross-entropy is at most -log(1e-30) = 69.08. One
rule for :meth:`OCDModel.ensemble`, :func:`ocdwrap.evaluate_ocd` and every classification row of
:func:`ocdwrap.compare` (one draw included), so a single extreme sample cannot decide a mean."""


def floored_log(probs: torch.Tensor) -> torch.Tensor:
    """log of probabilities clamped at :data:`PROB_FLOOR`."""
    return probs.clamp_min(PROB_FLOOR).log()


def log_mean_probability(logits: torch.Tensor) -> torch.Tensor:
    """(K, B, C) logits of K draws -> (B, C): the log of their mean softmax, floored at
    :data:`PROB_FLOOR` (K = 1: one draw's log-probabilities under the same floor)."""
    return floored_log(logits.float().softmax(dim=-1).mean(0))


def scored_prediction(pred: torch.Tensor, task: str) -> torch.Tensor:
    """What a loss is computed on when ocdwrap scores a prediction: for classification, one
    network's logits as log-probabilities under :data:`PROB_FLOOR` (cross-entropy then caps at
    69.08, as it does for an ensemble); for regression, the prediction itself."""
    return log_mean_probability(pred.unsqueeze(0)) if task == "classification" else pred


@dataclass
class EnsembleOutput:
    """What :meth:`OCDModel.ensemble` returns.

    Attributes:
        output: the base model's output type, its prediction replaced by the ensemble's
            (log of the mean probability for classification, mean value for regression).
        mean: (B, ...) mean probabilities (classification) or mean values (regression).
        std: (B, ...) standard deviation across draws of the same quantity.
        draws: (K, B, ...) every draw's raw prediction (logits or values).
        uncertainty: (B,) the spread between draws, ``std`` averaged over output dimensions.
    """

    output: Any
    mean: torch.Tensor
    std: torch.Tensor
    draws: torch.Tensor
    uncertainty: torch.Tensor


def combine_draws(
    out: Any,
    B: int,
    num_draws: int,
    task: str,
    align: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EnsembleOutput:
    """The :class:`EnsembleOutput` of ``out``, the base model's output on B x ``num_draws``
    rows (sample-major): probabilities averaged for ``task="classification"``, values for
    regression; ``align`` reorders the draws first (see :meth:`OCDModel.ensemble`)."""
    pred = read_output(out)
    draws = pred.reshape(B, num_draws, *pred.shape[1:]).transpose(0, 1)  # (K, B, ...)
    if align is not None:
        aligned = align(draws)
        if not isinstance(aligned, torch.Tensor) or aligned.shape != draws.shape:
            got = tuple(aligned.shape) if isinstance(aligned, torch.Tensor) else type(aligned)
            raise ConfigError(
                f"ensemble(align=...) returned {got}, but it must return the draws "
                f"{tuple(draws.shape)} (K, B, ...) reordered, as one tensor of the same "
                "shape: permute within each draw, never across draws or samples."
            )
        draws = aligned
    if task == "classification":
        probs = draws.float().softmax(dim=-1)
        mean, std = probs.mean(0), probs.std(0, unbiased=False)
        combined = floored_log(mean).to(pred.dtype)
    else:
        mean, std = draws.float().mean(0), draws.float().std(0, unbiased=False)
        combined = mean.to(pred.dtype)
    uncertainty = std.reshape(B, -1).mean(1)
    # the rest of the output (hidden states etc.) is that of the first draw
    first = map_tensors(
        out, lambda t: t[::num_draws] if t.dim() and t.shape[0] == B * num_draws else t
    )
    return EnsembleOutput(replace_output(first, combined), mean, std, draws, uncertainty)
