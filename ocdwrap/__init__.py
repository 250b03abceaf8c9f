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

from .capture import Conditioning
from .collect import collect
from .config import OCDConfig
from .deltas import FullDelta, LowRankDelta, Rank1Delta
from .errors import OCDError
from .evaluation import evaluate_ocd
from .fit import FitReport, fit
from .headroom import HeadroomReport, headroom
from .model import EnsembleOutput, OCDModel, wrap
from .overfit import overfit_batch, overfit_one
from .select import LayerScores, select_layer
from .store import DeltaStore

__version__ = "0.1.0"

__all__ = [
    "Conditioning",
    "DeltaStore",
    "EnsembleOutput",
    "FitReport",
    "FullDelta",
    "HeadroomReport",
    "LayerScores",
    "LowRankDelta",
    "OCDConfig",
    "OCDError",
    "OCDModel",
    "Rank1Delta",
    "__version__",
    "collect",
    "evaluate_ocd",
    "fit",
    "headroom",
    "overfit_batch",
    "overfit_one",
    "select_layer",
    "wrap",
]
