"""ocdwrap: OCD, learning to overfit with conditional diffusion models, as a PyTorch plugin.

Lutati & Wolf, "OCD: Learning to Overfit with Conditional Diffusion Models", ICLR 2023.

The pipeline, one module each (docs/architecture.md has the whole map)::

    FullDelta ...   deltas.py     per-sample delta types and their math (rank one, scale, energy)
    DynamicLayer    layer.py      W + delta_b for every sample b of a batch
    capture         capture.py    I(x) = (layer input, layer output, model output) per sample
    OCDHyperNetwork hypernet.py   the diffusion process and the generator; networks.py its nets
    wrap()          model.py      the base model with its target layer made dynamic
    overfit_batch() overfit.py    every sample of a batch overfitted alone, vectorized
    collect()       collect.py    overfit the training set; store.py owns the on-disk format
    fit()           fit.py        trains the hypernetwork, on one process or several
    select_layer()  select.py     the paper's loss-entropy layer selection
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> the module that defines it; imported on first use (as transformers and
# diffusers do), so ``import ocdwrap`` and inference load neither collection nor fitting
_LAZY = {
    "Conditioning": "capture",
    "collect": "collect",
    "Comparison": "compare",
    "compare": "compare",
    "FitArgs": "config",
    "OCDConfig": "config",
    "SamplingConfig": "config",
    "FullDelta": "deltas",
    "LowRankDelta": "deltas",
    "Rank1Delta": "deltas",
    "OCDError": "errors",
    "evaluate_ocd": "evaluation",
    "FitReport": "fit",
    "fit": "fit",
    "DiffusionGenerator": "generators",
    "Generator": "generators",
    "RegressionGenerator": "generators",
    "HeadroomReport": "headroom",
    "headroom": "headroom",
    "EnsembleOutput": "ensemble",
    "OCDModel": "model",
    "wrap": "wrapping",
    "overfit_batch": "overfit",
    "overfit_one": "overfit",
    "LayerScores": "layer_scores",
    "select_layer": "select",
    "DeltaStore": "store",
}
# functions named like the module that defines them: ``ocdwrap.fit`` is the function, also after
# the submodule ``ocdwrap.fit`` was imported (the import system would set the module there)
_SHADOWED = {name for name, module in _LAZY.items() if name == module}

if TYPE_CHECKING:  # what static tools see: the same names, eagerly
    from .capture import Conditioning
    from .collect import collect
    from .compare import Comparison, compare
    from .config import FitArgs, OCDConfig, SamplingConfig
    from .deltas import FullDelta, LowRankDelta, Rank1Delta
    from .ensemble import EnsembleOutput
    from .errors import OCDError
    from .evaluation import evaluate_ocd
    from .fit import FitReport, fit
    from .generators import DiffusionGenerator, Generator, RegressionGenerator
    from .headroom import HeadroomReport, headroom
    from .layer_scores import LayerScores
    from .model import OCDModel
    from .overfit import overfit_batch, overfit_one
    from .select import select_layer
    from .store import DeltaStore
    from .wrapping import wrap


class _Package(types.ModuleType):
    """The ``ocdwrap`` module: public names and submodules load when first used."""

    def __getattr__(self, name: str) -> Any:
        if name in _LAZY:
            value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
            value = importlib.import_module(f".{name}", __name__)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_LAZY))


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Comparison",
    "Conditioning",
    "DeltaStore",
    "DiffusionGenerator",
    "EnsembleOutput",
    "FitArgs",
    "FitReport",
    "FullDelta",
    "Generator",
    "HeadroomReport",
    "LayerScores",
    "LowRankDelta",
    "OCDConfig",
    "OCDError",
    "OCDModel",
    "Rank1Delta",
    "RegressionGenerator",
    "SamplingConfig",
    "__version__",
    "collect",
    "compare",
    "evaluate_ocd",
    "fit",
    "headroom",
    "overfit_batch",
    "overfit_one",
    "select_layer",
    "wrap",
]
