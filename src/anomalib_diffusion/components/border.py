"""Standardising anomaly maps per distance from the image border.

A fully convolutional network sees less image (and more zero padding) near the border. RADAR's noise map
is raised there on normal images: on the devbench's paper-torchon texture the highest 1 % of a normal
image's map, which is its image score, lay on the border, as high as the holes and scratches of defective
images (docs/radar.md). One mean and spread per map cannot remove that. :class:`BorderStandardiser` fits
them per *band* instead: pixel ``(y, x)`` belongs to band ``min(y, x, H - 1 - y, W - 1 - x)``, clipped to
``bands - 1``, so the outermost ``bands - 1`` rings of pixels each get their own statistics and the inside
shares one. ``bands=1`` is the plain standardisation. The band of a pixel follows from the map's size alone,
so one fitted profile serves any image size, and the band map is a few tensor ops in an exported graph.
"""

import torch
from torch import nn


def border_bands_problem(bands: int) -> str | None:
    """What is wrong with a ``border_bands`` setting, or ``None``."""
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        return f"border_bands={bands!r} must be an integer of at least 1 (1 standardises every pixel alike)"
    return None


def border_bands(height: int, width: int, bands: int, device: torch.device | None = None) -> torch.Tensor:
    """``(H, W)`` band index of every pixel: its distance to the nearest image edge, clipped to ``bands - 1``."""
    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    row_distance = torch.minimum(rows, height - 1 - rows)
    column_distance = torch.minimum(columns, width - 1 - columns)
    return torch.minimum(row_distance[:, None], column_distance[None, :]).clamp(max=bands - 1)


def band_moments(maps: torch.Tensor, bands: int) -> torch.Tensor:
    """``(B, C, bands, 2)``: each map's mean and mean square over the pixels of every band (float64; NaN where empty)."""
    band = border_bands(maps.shape[-2], maps.shape[-1], bands, maps.device).flatten()
    counts = torch.bincount(band, minlength=bands).double()
    flat = maps.flatten(2).double()
    sums = [flat.new_zeros(*flat.shape[:2], bands).index_add_(2, band, values) for values in (flat, flat.pow(2))]
    return torch.stack(sums, dim=-1) / counts[:, None]


class BorderStandardiser(nn.Module):
    """Standardise ``(B, C, H, W)`` maps with normal images' mean and spread per channel and border band.

    Args:
        channels: Maps standardised side by side (RADAR: the noise map and its Sobel map).
        bands: Border bands with their own statistics; ``1`` standardises every pixel alike.
    """

    def __init__(self, channels: int, bands: int) -> None:
        super().__init__()
        if problem := border_bands_problem(bands):
            msg = f"{problem}."
            raise ValueError(msg)
        self.bands = bands
        self.register_buffer("mean", torch.zeros(channels, bands))
        self.register_buffer("std", torch.ones(channels, bands))
        self.mean: torch.Tensor
        self.std: torch.Tensor

    def fit(self, moments: torch.Tensor) -> None:
        """Set the statistics from :func:`band_moments` of normal maps, ``(N, C, bands, 2)``."""
        if moments.shape[1:] != (*self.mean.shape, 2):
            msg = f"Expected band moments of shape (N, {self.mean.shape[0]}, {self.bands}, 2), got {tuple(moments.shape)}."
            raise ValueError(msg)
        mean = moments[..., 0].double().mean(dim=0)
        variance = moments[..., 1].double().mean(dim=0) - mean.pow(2)
        # Maps narrower than 2 * bands have no pixels in the inner bands: those take the innermost fitted band's
        # statistics, so larger images scored later are standardised like the inside of the fitted ones.
        for band in range(1, self.bands):
            empty = torch.isnan(mean[:, band])
            mean[empty, band], variance[empty, band] = mean[empty, band - 1], variance[empty, band - 1]
        self.mean.copy_(mean.float())
        self.std.copy_(variance.clamp_min(1e-12).sqrt().float())

    def forward(self, maps: torch.Tensor, channel: int | None = None) -> torch.Tensor:
        """``(maps - mean[band]) / std[band]`` at every pixel; ``channel`` picks one channel's statistics."""
        band = border_bands(maps.shape[-2], maps.shape[-1], self.bands, maps.device)
        channels = slice(None) if channel is None else slice(channel, channel + 1)
        return (maps - self.mean[channels, band]) / self.std[channels, band]

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Checkpoints from before the bands hold one mean and spread per channel: they apply to every band."""
        for name in ("mean", "std"):
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == 1:
                state_dict[key] = state_dict[key][:, None].expand(-1, self.bands).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)
