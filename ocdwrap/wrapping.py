"""``wrap()``: a trained model with OCD on one of its layers (PEFT's ``get_peft_model``), the
layer named or chosen by the paper's loss-entropy criterion (:func:`ocdwrap.select_layer`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import OCDConfig, SamplingConfig
from .errors import CalibrationRequiredError
from .layer import _candidate_layers
from .model import OCDModel

logger = logging.getLogger("ocdwrap")


def wrap(
    base: nn.Module,
    layer: str = "auto",
    config: OCDConfig | None = None,
    calibration: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    sampling: SamplingConfig | None = None,
    **select_kwargs: Any,
) -> OCDModel:
    """Wrap ``base`` for OCD on one layer; the base's parameters are frozen.

    Args:
        base: the trained base model.
        layer: a module name (``"fc2"``, ``"classifier.out_proj"``) or ``"auto"`` to pick it
            with the paper's loss-entropy criterion on ``calibration`` data.
        config: an :class:`OCDConfig` (what defines the adapter); defaults to ``OCDConfig()``.
        calibration: batches for ``layer="auto"`` (see :mod:`ocdwrap.batches`).
        loss_fn: per-sample loss ``loss_fn(output, target)``, needed for ``layer="auto"``.
        sampling: the sampling defaults, a :class:`SamplingConfig` (saved with the adapter).
        select_kwargs: the layer selection's settings, passed to :func:`ocdwrap.select_layer`
            (``perturbation``, ``draws``, ``noise_scale``, ``candidates``, ``max_samples``, ...).

    Example:
        >>> model = ocdwrap.wrap(lenet, layer="fc2")
        >>> model = ocdwrap.wrap(lenet, layer="auto", calibration=val_loader,
        ...                      loss_fn=nn.CrossEntropyLoss(reduction="none"), draws=16)
    """
    config = config or OCDConfig()
    if layer == "auto":
        if calibration is None or loss_fn is None:
            raise CalibrationRequiredError(
                'layer="auto" needs calibration data and a loss to score the candidate layers: '
                'wrap(base, layer="auto", calibration=loader, loss_fn=loss), or name the layer, '
                f"e.g. layer={(_candidate_layers(base) or ['fc'])[-1]!r}."
            )
        from .select import select_layer

        scores = select_layer(base, calibration, loss_fn, **select_kwargs)
        layer = scores.best
        config = config.replace(layer_ranking=scores.to_list())
        logger.info("ocdwrap: layer='auto' chose %r (highest loss entropy)\n%s", layer, scores)
    elif select_kwargs:
        raise TypeError(
            f"wrap() got {sorted(select_kwargs)}: layer-selection settings apply to "
            f'layer="auto" only (layer={layer!r} names the layer).'
        )
    return OCDModel(base, layer, config, sampling)
