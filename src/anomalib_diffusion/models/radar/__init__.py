"""RADAR: single-step, reconstruction-free diffusion anomaly detection (Moradi et al., 2025)."""

from .lightning_model import RADAR
from .torch_model import RADARModel

__all__ = ["RADAR", "RADARModel"]
