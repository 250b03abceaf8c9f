"""ocdwrap: OCD, learning to overfit with conditional diffusion models, as a PyTorch plugin.

Lutati & Wolf, "OCD: Learning to Overfit with Conditional Diffusion Models", ICLR 2023.

The pipeline, one module each::

    wrap()          model.py      the base model with its target layer made dynamic
    capture         capture.py    I(x) = (layer input, layer output, model output) per sample
    DynamicLayer    layer.py      W + delta_b for every sample b of a batch
    collect()       collect.py    vectorized per-sample overfitting, stored by store.py
    fit()           fit.py        trains the hypernetwork of hypernet.py / diffusion.py
    select_layer()  select.py     the paper's loss-entropy layer selection
"""

from .capture import Conditioning
from .collect import collect, overfit_batch, overfit_one
from .config import OCDConfig
from .errors import OCDError
from .evaluation import evaluate_ocd
from .fit import FitReport, fit
from .layer import FullDelta, Rank1Delta
from .model import EnsembleOutput, OCDModel, wrap
from .select import LayerScores, select_layer
from .store import DeltaStore

__version__ = "0.1.0"

__all__ = [
    "Conditioning",
    "DeltaStore",
    "EnsembleOutput",
    "FitReport",
    "FullDelta",
    "LayerScores",
    "OCDConfig",
    "OCDError",
    "OCDModel",
    "Rank1Delta",
    "__version__",
    "collect",
    "evaluate_ocd",
    "fit",
    "overfit_batch",
    "overfit_one",
    "select_layer",
    "wrap",
]
