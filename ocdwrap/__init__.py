"""ocdwrap: OCD, learning to overfit with conditional diffusion models, as a PyTorch plugin.

Lutati & Wolf, "OCD: Learning to Overfit with Conditional Diffusion Models", ICLR 2023.
"""

from .config import OCDConfig
from .errors import OCDError

__version__ = "0.1.0"

__all__ = ["OCDConfig", "OCDError", "__version__"]
