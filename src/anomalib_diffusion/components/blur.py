"""The Gaussian smoothing of RADAR's and GLAD's anomaly maps: kornia's separable blur.

anomalib's :class:`~anomalib.models.components.GaussianBlur2d` convolves with the whole ``K x K`` kernel. At
RADAR's sigma of 4 (``K = 25``) its two blurs were the two most expensive nodes of the exported model in
OpenVINO FP32 (12 ms of 88 ms on 2 cores, ``python benchmarks/radar_tuning.py profile``). A Gaussian is
separable: two 1-D passes of ``K`` taps give the same map (to 1e-6) for ``2K`` instead of ``K^2`` operations
per pixel.
"""

import math

import torch
from kornia.filters import GaussianBlur2d


class SeparableGaussianBlur(GaussianBlur2d):
    """Gaussian blur of ``(B, C, H, W)`` maps with kernel size ``2 * ceil(3 * sigma) + 1`` and reflected borders.

    Holds no state. Checkpoints written while the models used anomalib's blur carry its kernel as a buffer
    (``...blur.kernel``): it is dropped on loading, so they still load.
    """

    def __init__(self, sigma: float) -> None:
        size = 2 * math.ceil(3 * sigma) + 1
        super().__init__((size, size), (sigma, sigma), border_type="reflect", separable=True)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Each channel blurred on its own: kornia blurs ``C`` channels with one grouped convolution, which
        OpenVINO's CPU plugin computing in bf16 did not finish in 10 minutes for one 64x64 image of 2 channels
        (GLAD's two distances; one channel takes milliseconds)."""
        if maps.shape[1] == 1:
            return super().forward(maps)
        blur = super().forward
        return torch.cat([blur(channel) for channel in maps.split(1, dim=1)], dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        state_dict.pop(prefix + "kernel", None)
        super()._load_from_state_dict(state_dict, prefix, *args)
