"""Sobel edge maps of noise maps and the two RADAR image features computed from them.

The Sobel operator is kornia's (:func:`kornia.filters.sobel`); smoothing is anomalib's
:class:`~anomalib.models.components.GaussianBlur2d`. Both export to ONNX as convolutions.
"""

import torch
import torch.nn.functional as F  # noqa: N812
from kornia.filters import sobel


def sobel_edge_map(noise_map: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of a ``(B, 1, H, W)`` map (replicate padding; no epsilon, maps are not differentiated)."""
    return sobel(noise_map, normalized=True, eps=0.0)


def global_l2(edge_map: torch.Tensor) -> torch.Tensor:
    """Root-mean-square of the map per image, so the feature does not grow with image size."""
    return edge_map.pow(2).mean(dim=(1, 2, 3)).sqrt()


def max_window_l2(edge_map: torch.Tensor, window_size: int) -> torch.Tensor:
    """Largest root-mean-square over ``window_size`` squares slid at a quarter-window stride."""
    window = min(window_size, edge_map.shape[-2], edge_map.shape[-1])
    energy = F.avg_pool2d(edge_map.pow(2), kernel_size=window, stride=max(1, window // 4))
    return energy.flatten(1).amax(dim=1).sqrt()


def edge_features(edge_map: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, 2)``: the global L2 norm and the maximum sliding-window L2 norm of the edge map."""
    return torch.stack([global_l2(edge_map), max_window_l2(edge_map, window_size)], dim=1)
