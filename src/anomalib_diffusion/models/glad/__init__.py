"""GLAD: global and local adaptive diffusion reconstruction (Yao et al., ECCV 2024)."""

from .lightning_model import GLAD
from .torch_model import GLADModel, GLADReconstruction

__all__ = ["GLAD", "GLADModel", "GLADReconstruction"]
