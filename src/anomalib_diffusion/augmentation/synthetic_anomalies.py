"""Synthetic anomalies on normal images: Perlin-shaped regions filled with foreign content.

GLAD's anomaly-aware training (ATP) and D-ADDA's procedural seed defects both need images that
carry an anomaly with an exact mask. :class:`PerlinAnomalySynthesis` makes them from a batch of
normal images, following GLAD's recipe (itself DRAEM's):

1. **Shape**: anomalib's Perlin noise (:func:`~anomalib.data.utils.generators.perlin.generate_perlin_noise`)
   at a random scale ``2**U{a..b}`` per axis, rotated by a random angle, thresholded. For object
   categories the mask can be limited to the object's foreground, found with Otsu's threshold
   (scikit-image) on the grey image; the background is the side that covers most of the border.
   With ``stroke_fraction`` above 0, that share of the masks is a thin, slightly bent stroke instead (the
   long thin "scar" of CutPaste, Li et al. 2021, longer and bent): Perlin blobs are compact, so a model
   trained on them alone never sees a thin, elongated anomaly such as a scratch or a crack.
2. **Fill**: a procedural colour texture (Perlin fields per channel, no image download) or the
   image's own blocks shuffled on a grid, so the anomaly has the image's colours but not its structure.
3. **Blend**: ``x_anom = (1 - m) x + m ((1 - beta) fill + beta x)`` with ``beta ~ U(blend_range)``:
   ``beta`` is how much of the normal image still shows through.

A fraction ``1 - probability`` of the samples stays clean (all-zero mask).
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import generate_perlin_noise
from skimage.filters import threshold_otsu
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import rotate

from anomalib_diffusion.components.validation import closed_share_problem

FillMode = Literal["texture", "shuffle"]
Foreground = Literal["none", "otsu"]

# A mask that comes out empty (noise below the threshold everywhere, or outside the object) is
# redrawn this many times before the sample is left clean.
MAX_MASK_TRIES = 4


class PerlinAnomalySynthesis(nn.Module):
    """Turn a batch of normal images into (anomalous images, masks).

    Args:
        probability: Fraction of samples that get an anomaly; the rest stay clean.
        scale_exponent_range: Perlin scale is ``2**e`` per axis with ``e`` drawn from this
            inclusive integer range (GLAD: 0..5); larger scales give smaller, busier blobs.
        threshold: Perlin values above this (noise is roughly in ``[-1, 1]``) form the mask.
        rotation_range: Rotation of the noise in degrees, drawn uniformly.
        blend_range: Range of ``beta``, the share of the normal image kept inside the mask.
        fill_modes: Fills to draw from, uniformly: ``"texture"`` and/or ``"shuffle"``.
        shuffle_grid: Blocks per side for the ``"shuffle"`` fill.
        foreground: ``"otsu"`` limits anomalies to the object (for object categories);
            ``"none"`` allows them anywhere (textures).
        generator: Optional ``torch.Generator`` for the draws made here (Perlin noise itself
            uses torch's global generator, as in anomalib).
        stroke_fraction: Share of the masks that are thin strokes instead of Perlin blobs, filled with the
            procedural texture (the image's shuffled blocks would hide a thin stroke). ``0``: none (and no
            extra random draw, so the random stream is as without the option).
        stroke_length_range: Stroke length as a share of the image's shorter side, drawn uniformly.
        stroke_width_range: Stroke width in pixels at 256 px (scaled with the image, at least 1 px), drawn
            uniformly.

    Example:
        >>> synthesis = PerlinAnomalySynthesis(probability=1.0)
        >>> images, masks = synthesis(torch.rand(2, 3, 64, 64))
        >>> images.shape, masks.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(
        self,
        probability: float = 0.5,
        scale_exponent_range: Sequence[int] = (0, 5),
        threshold: float = 0.3,
        rotation_range: Sequence[float] = (-90.0, 90.0),
        blend_range: Sequence[float] = (0.0, 0.8),
        fill_modes: Sequence[FillMode] = ("texture", "shuffle"),
        shuffle_grid: int = 8,
        foreground: Foreground = "none",
        generator: torch.Generator | None = None,
        stroke_fraction: float = 0.0,
        stroke_length_range: Sequence[float] = (0.1, 0.5),
        stroke_width_range: Sequence[float] = (2.0, 6.0),
    ) -> None:
        super().__init__()
        _check_settings(
            probability,
            scale_exponent_range,
            threshold,
            blend_range,
            fill_modes,
            shuffle_grid,
            foreground,
            (stroke_fraction, stroke_length_range, stroke_width_range),
        )
        self.stroke_fraction = float(stroke_fraction)
        self.stroke_length_range = (float(stroke_length_range[0]), float(stroke_length_range[1]))
        self.stroke_width_range = (float(stroke_width_range[0]), float(stroke_width_range[1]))
        self.probability = probability
        self.scale_exponent_range = (int(scale_exponent_range[0]), int(scale_exponent_range[1]))
        self.threshold = threshold
        self.rotation_range = (float(rotation_range[0]), float(rotation_range[1]))
        self.blend_range = (float(blend_range[0]), float(blend_range[1]))
        self.fill_modes = tuple(fill_modes)
        self.shuffle_grid = shuffle_grid
        self.foreground = foreground
        self.generator = generator

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` images in ``[0, 1]`` -> anomalous images and ``(B, 1, H, W)`` masks in {0, 1}."""
        if images.ndim != 4:  # noqa: PLR2004
            msg = f"PerlinAnomalySynthesis expects a (batch, channels, height, width) tensor, got shape {tuple(images.shape)}."
            raise ValueError(msg)
        outputs = images.clone()
        masks = torch.zeros_like(images[:, :1])
        for index in range(images.shape[0]):
            if self._uniform(0.0, 1.0) >= self.probability:
                continue
            stroke = self.stroke_fraction > 0 and self._uniform(0.0, 1.0) < self.stroke_fraction
            mask = self.draw_mask(images[index], stroke=stroke)
            if not mask.any():
                continue
            # A stroke of the image's own shuffled blocks is mostly invisible: strokes take the foreign texture.
            fill = self.procedural_texture(*images.shape[-2:]).to(images) if stroke else self.draw_fill(images[index])
            beta = self._uniform(*self.blend_range)
            anomaly = (1 - beta) * fill + beta * images[index]
            outputs[index] = torch.where(mask.bool(), anomaly, images[index])
            masks[index] = mask
        return outputs, masks

    def draw_mask(self, image: torch.Tensor, stroke: bool = False) -> torch.Tensor:
        """``(1, H, W)`` binary Perlin mask, or a stroke (inside the foreground if asked); may be empty."""
        height, width = image.shape[-2:]
        foreground = otsu_foreground(image) if self.foreground == "otsu" else None
        for _ in range(MAX_MASK_TRIES):
            shape = self.stroke_mask(height, width) if stroke else self.perlin_mask(height, width)
            mask = shape.to(image.device)
            if foreground is not None:
                mask = mask * foreground
            if mask.any():
                break
        return mask

    def perlin_mask(self, height: int, width: int) -> torch.Tensor:
        """``(1, H, W)`` thresholded Perlin noise at a random scale and angle."""
        noise = generate_perlin_noise(height, width, scale=self._perlin_scale(), device=torch.device("cpu"))
        angle = self._uniform(*self.rotation_range)
        noise = rotate(noise[None], angle, interpolation=InterpolationMode.BILINEAR, fill=[-1.0])
        return (noise > self.threshold).float()

    def stroke_mask(self, height: int, width: int) -> torch.Tensor:
        """``(1, H, W)`` thin stroke: a band of random width around a parabolic arc, anywhere, at any angle."""
        side = min(height, width)
        length = self._uniform(*self.stroke_length_range) * side
        thickness = max(1.0, self._uniform(*self.stroke_width_range) * side / 256)
        angle = self._uniform(0.0, float(np.pi))
        centre_y, centre_x = self._uniform(0.0, height), self._uniform(0.0, width)
        sagitta = self._uniform(-0.2, 0.2) * length  # how far the arc's middle leaves the chord
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32) + 0.5,
            torch.arange(width, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        along = (xs - centre_x) * np.cos(angle) + (ys - centre_y) * np.sin(angle)
        across = (ys - centre_y) * np.cos(angle) - (xs - centre_x) * np.sin(angle)
        position = along / (length / 2)
        arc = sagitta * (1 - position**2)
        mask = (position.abs() <= 1) & ((across - arc).abs() <= thickness / 2)
        return mask.float()[None]

    def draw_fill(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` foreign content: a procedural texture or the image's shuffled blocks."""
        mode = self.fill_modes[self._randint(len(self.fill_modes))]
        if mode == "shuffle":
            return shuffle_blocks(image, self.shuffle_grid, self.generator)
        return self.procedural_texture(*image.shape[-2:]).to(image)

    def procedural_texture(self, height: int, width: int) -> torch.Tensor:
        """Colour texture in ``[0, 1]``: one Perlin field per channel, random contrast and offset."""
        channels = []
        for _ in range(3):
            field = generate_perlin_noise(height, width, scale=self._perlin_scale(), device=torch.device("cpu"))
            contrast = self._uniform(0.3, 1.0)
            offset = self._uniform(0.0, 1.0)
            channels.append((offset + contrast * field).clamp(0, 1))
        return torch.stack(channels)

    def _perlin_scale(self) -> tuple[int, int]:
        low, high = self.scale_exponent_range
        return (2 ** (low + self._randint(high - low + 1)), 2 ** (low + self._randint(high - low + 1)))

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator).item())


def otsu_foreground(image: torch.Tensor) -> torch.Tensor:
    """``(1, H, W)`` float mask of the object: the Otsu class of the grey image that covers less of the border."""
    grey = image.mean(dim=0).detach().cpu().numpy()
    if np.ptp(grey) == 0:
        return torch.ones_like(image[:1])
    above = grey > threshold_otsu(grey)
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    foreground = ~above if border.mean() > 0.5 else above  # noqa: PLR2004
    return torch.from_numpy(foreground).to(image)[None]


def shuffle_blocks(image: torch.Tensor, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The image with its ``grid x grid`` blocks permuted (pixels past the last full block are kept)."""
    channels, height, width = image.shape
    block_h, block_w = height // grid, width // grid
    if block_h == 0 or block_w == 0:
        msg = f"Cannot shuffle a {height}x{width} image on a {grid}x{grid} grid; lower shuffle_grid."
        raise ValueError(msg)
    core = image[:, : grid * block_h, : grid * block_w]
    blocks = (
        core.reshape(channels, grid, block_h, grid, block_w)
        .permute(1, 3, 0, 2, 4)
        .reshape(-1, channels, block_h, block_w)
    )
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    shuffled = blocks.reshape(grid, grid, channels, block_h, block_w).permute(2, 0, 3, 1, 4)
    output = image.clone()
    output[:, : grid * block_h, : grid * block_w] = shuffled.reshape(channels, grid * block_h, grid * block_w)
    return output


def _check_settings(
    probability: float,
    scale_exponent_range: Sequence[int],
    threshold: float,
    blend_range: Sequence[float],
    fill_modes: Sequence[str],
    shuffle_grid: int,
    foreground: str,
    strokes: tuple[float, Sequence[float], Sequence[float]],
) -> None:
    problems = []
    if problem := closed_share_problem("probability", probability):
        problems.append(problem)
    if len(scale_exponent_range) != 2 or not 0 <= scale_exponent_range[0] <= scale_exponent_range[1] <= 8:  # noqa: PLR2004
        problems.append(
            f"scale_exponent_range={list(scale_exponent_range)} must be [low, high] with 0 <= low <= high <= 8"
        )
    if not -1 < threshold < 1:
        problems.append(f"threshold={threshold} must be in (-1, 1) (Perlin noise is roughly in [-1, 1])")
    if len(blend_range) != 2 or not 0 <= blend_range[0] <= blend_range[1] < 1:  # noqa: PLR2004
        problems.append(f"blend_range={list(blend_range)} must be [low, high] with 0 <= low <= high < 1")
    unknown = sorted(set(fill_modes) - {"texture", "shuffle"})
    if not fill_modes or unknown:
        problems.append(f"fill_modes={list(fill_modes)} must be a non-empty subset of ['texture', 'shuffle']")
    if shuffle_grid < 2:  # noqa: PLR2004
        problems.append(f"shuffle_grid={shuffle_grid} must be at least 2")
    if foreground not in {"none", "otsu"}:
        problems.append(f"foreground={foreground!r} must be 'none' (textures) or 'otsu' (objects)")
    stroke_fraction, length_range, width_range = strokes
    if problem := closed_share_problem("stroke_fraction", stroke_fraction):
        problems.append(problem)
    if len(length_range) != 2 or not 0 < length_range[0] <= length_range[1] <= 1:  # noqa: PLR2004
        problems.append(f"stroke_length_range={list(length_range)} must be [low, high] with 0 < low <= high <= 1")
    if len(width_range) != 2 or not 0 < width_range[0] <= width_range[1]:  # noqa: PLR2004
        problems.append(f"stroke_width_range={list(width_range)} must be [low, high] pixels with 0 < low <= high")
    if problems:
        msg = "Invalid PerlinAnomalySynthesis settings: " + "; ".join(problems) + "."
        raise ValueError(msg)
