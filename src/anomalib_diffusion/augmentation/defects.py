"""D-ADDA's Data Augmentation Module (DAM): a few real defects in, many (image, mask, defect type) triples out.

Coscia et al. (IEEE Systems Journal 2025) describe the DAM only as a multi-stage pipeline that turns
the few defective images a site has into many diverse defective samples; the stages below are this
package's design (see ``METHODS.md``):

1. **Cut out** (:meth:`DefectBank.from_images`): every connected region of a real defect mask is cut
   out with its bounding box, its mask and its defect type. With no real defects at hand,
   :meth:`DefectBank.procedural` cuts Perlin anomalies (:class:`PerlinAnomalySynthesis`) out of
   normal images instead, so the module also works in anomalib's one-class setting.
2. **Geometric and photometric augmentation** (:class:`CutoutAugmentation`): torchvision v2 flips,
   rotation with an expanded canvas, scaling, applied jointly to patch and mask; colour jitter on the
   patch only.
3. **Mask variation** (:class:`MaskVariation`): random dilation or erosion (kornia morphology), then
   edges modulated by Perlin noise so no two pasted masks share an outline.
4. **Paste** (:class:`DefectPaste`): onto a normal image, at a random place inside the foreground
   (Otsu, for object categories), with alpha blending (feathered mask) or Poisson blending (OpenCV's
   ``seamlessClone``).
5. **Quality filter** (:class:`QualityFilter`): rejects pastes that are too small, too large, or that
   blending made invisible; a rejected draw is retried.

:class:`DataAugmentationModule` chains them on a batch of normal images.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import cv2
import numpy as np
import torch
from anomalib.data.utils.generators.perlin import generate_perlin_noise
from kornia.filters import gaussian_blur2d
from kornia.morphology import dilation, erosion
from scipy import ndimage
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomalib_diffusion.components.validation import closed_share_problem

from .synthetic_anomalies import PerlinAnomalySynthesis, otsu_foreground

Blending = Literal["alpha", "poisson", "mixed"]
Foreground = Literal["none", "otsu"]

PROCEDURAL_TYPE = "procedural"
# A draw rejected by the quality filter is retried this many times before the sample stays clean.
MAX_PASTE_TRIES = 6
# Mask variation that leaves less than this share of the drawn mask is dropped.
MIN_KEPT_AREA = 0.3


@dataclass(frozen=True)
class DefectCutout:
    """One defect region: ``patch`` ``(3, h, w)`` in ``[0, 1]``, ``mask`` ``(1, h, w)`` in {0, 1}, its type index."""

    patch: torch.Tensor
    mask: torch.Tensor
    defect_type: int


class DefectBank:
    """The defect regions a site has, each with its defect type (stage 1 of the DAM).

    Args:
        cutouts: The regions.
        type_names: Defect type names; ``cutout.defect_type`` indexes this list.
    """

    def __init__(self, cutouts: Sequence[DefectCutout], type_names: Sequence[str]) -> None:
        if not cutouts:
            msg = (
                "A DefectBank needs at least one defect region. Give real defective images with non-empty masks, "
                "or seed the bank with DefectBank.procedural(normal_images) when no real defects are at hand."
            )
            raise ValueError(msg)
        self.cutouts = list(cutouts)
        self.type_names = list(type_names)
        unknown = sorted({c.defect_type for c in self.cutouts} - set(range(len(self.type_names))))
        if unknown:
            msg = f"Cutout defect types {unknown} are not indices of type_names {self.type_names}."
            raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.cutouts)

    def counts(self) -> dict[str, int]:
        """Regions per defect type."""
        counts = dict.fromkeys(self.type_names, 0)
        for cutout in self.cutouts:
            counts[self.type_names[cutout.defect_type]] += 1
        return counts

    def draw(self, generator: torch.Generator | None = None, defect_type: int | None = None) -> DefectCutout:
        """A random region (of one type, if given)."""
        pool = self.cutouts if defect_type is None else [c for c in self.cutouts if c.defect_type == defect_type]
        if not pool:
            msg = f"The defect bank holds no region of type {self.type_names[defect_type]!r}."  # type: ignore[index]
            raise ValueError(msg)
        return pool[int(torch.randint(len(pool), (), generator=generator))]

    @classmethod
    def from_images(
        cls,
        images: torch.Tensor,
        masks: torch.Tensor,
        defect_types: Sequence[str],
        min_area: int = 16,
        type_names: Sequence[str] | None = None,
    ) -> "DefectBank":
        """Cut every connected mask region (at least ``min_area`` pixels) out of real defective images.

        Args:
            images: ``(N, 3, H, W)`` defective images in ``[0, 1]``.
            masks: ``(N, 1, H, W)`` or ``(N, H, W)`` defect masks (non-zero = defect), same size as the images.
            defect_types: ``N`` defect type names, one per image.
            min_area: Smaller regions (annotation specks) are skipped.
            type_names: The bank's type names in index order (default: the given types, sorted); must
                contain every name in ``defect_types``.
        """
        masks = masks[:, None] if masks.ndim == 3 else masks  # noqa: PLR2004
        if images.ndim != 4 or images.shape[1] != 3:  # noqa: PLR2004
            msg = f"Defective images must be a (N, 3, H, W) tensor, got shape {tuple(images.shape)}."
            raise ValueError(msg)
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            msg = (
                f"Defect masks of shape {tuple(masks.shape)} do not match the images of shape {tuple(images.shape)}: "
                "every defective image needs a mask of its own height and width (resize both the same way)."
            )
            raise ValueError(msg)
        if len(defect_types) != images.shape[0]:
            msg = f"Got {len(defect_types)} defect types for {images.shape[0]} defective images; give one per image."
            raise ValueError(msg)
        missing = sorted(set(defect_types) - set(type_names or defect_types))
        if missing:
            msg = f"Defect types {missing} are not in type_names={list(type_names or [])}."
            raise ValueError(msg)
        type_names = list(type_names) if type_names is not None else sorted(set(defect_types))
        cutouts = []
        for image, mask, name in zip(images, masks, defect_types, strict=True):
            cutouts += _cut_regions(image, mask, type_names.index(name), min_area)
        if not cutouts:
            msg = (
                f"None of the {images.shape[0]} defective images has a mask region of at least {min_area} pixels: "
                "check that the masks are not empty (defective images need ground-truth masks), or lower min_area."
            )
            raise ValueError(msg)
        return cls(cutouts, type_names)

    @classmethod
    def procedural(
        cls,
        normal_images: torch.Tensor,
        count: int = 64,
        synthesis: PerlinAnomalySynthesis | None = None,
        generator: torch.Generator | None = None,
    ) -> "DefectBank":
        """Seed the bank with ``count`` Perlin anomalies cut out of normal images (one type, ``"procedural"``)."""
        if normal_images.ndim != 4 or normal_images.shape[0] == 0:  # noqa: PLR2004
            msg = f"Procedural seeding needs a (N, 3, H, W) batch of normal images, got shape {tuple(normal_images.shape)}."
            raise ValueError(msg)
        synthesis = synthesis or PerlinAnomalySynthesis(
            probability=1.0, scale_exponent_range=(2, 4), generator=generator
        )
        cutouts: list[DefectCutout] = []
        for _ in range(4 * count):
            pick = int(torch.randint(normal_images.shape[0], (), generator=generator))
            image, mask = synthesis(normal_images[pick : pick + 1])
            cutouts += _cut_regions(image[0], mask[0], defect_type=0, min_area=16)
            if len(cutouts) >= count:
                break
        return cls(cutouts[:count], [PROCEDURAL_TYPE])


def _cut_regions(image: torch.Tensor, mask: torch.Tensor, defect_type: int, min_area: int) -> list[DefectCutout]:
    """One cutout per connected region of ``mask`` with at least ``min_area`` pixels."""
    labels, _ = ndimage.label(mask[0].cpu().numpy() > 0.5)  # noqa: PLR2004
    cutouts = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        component = torch.from_numpy(labels[region] == index).float()[None]
        if component.sum() >= min_area:
            cutouts.append(DefectCutout(image[:, region[0], region[1]].cpu(), component, defect_type))
    return cutouts


class CutoutAugmentation(nn.Module):
    """Stage 2: flips, rotation (on an expanded canvas) and scaling of patch and mask together; colour jitter.

    Args:
        rotation: Rotation angle drawn from ``U(-rotation, rotation)`` degrees.
        scale_range: Side scale factor range.
        flip: Random horizontal and vertical flips.
        brightness, contrast, saturation, hue: torchvision ``ColorJitter`` strengths, on the patch only.
    """

    def __init__(
        self,
        rotation: float = 180.0,
        scale_range: Sequence[float] = (0.75, 1.25),
        flip: bool = True,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.02,
    ) -> None:
        super().__init__()
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:  # noqa: PLR2004
            msg = f"scale_range={list(scale_range)} must be [low, high] with 0 < low <= high."
            raise ValueError(msg)
        self.rotation = float(rotation)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def forward(self, cutout: DefectCutout) -> DefectCutout:
        patch, mask = tv_tensors.Image(cutout.patch), tv_tensors.Mask(cutout.mask)
        if self.flip and torch.rand(()) < 0.5:  # noqa: PLR2004
            patch, mask = v2.functional.horizontal_flip(patch), v2.functional.horizontal_flip(mask)
        if self.flip and torch.rand(()) < 0.5:  # noqa: PLR2004
            patch, mask = v2.functional.vertical_flip(patch), v2.functional.vertical_flip(mask)
        scale = _uniform(*self.scale_range)
        size = [max(2, round(side * scale)) for side in patch.shape[-2:]]
        patch = v2.functional.resize(patch, size, antialias=True)
        mask = v2.functional.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST)
        angle = _uniform(-self.rotation, self.rotation)
        patch = v2.functional.rotate(patch, angle, interpolation=v2.InterpolationMode.BILINEAR, expand=True)
        mask = v2.functional.rotate(mask, angle, interpolation=v2.InterpolationMode.NEAREST, expand=True)
        patch = self.jitter(patch).clamp(0, 1)
        return _crop_to_mask(
            DefectCutout(patch.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), cutout.defect_type)
        )


class MaskVariation(nn.Module):
    """Stage 3: random dilation or erosion, then Perlin-modulated edges.

    The mask is blurred, shifted by Perlin noise of amplitude ``edge_noise`` and thresholded at 0.5,
    so its outline wobbles while its core stays. The patch is edge-padded so a grown mask still
    covers defect content. A variation that would empty the mask is dropped.

    Args:
        max_kernel: Largest (odd) structuring element side of the morphology step.
        edge_noise: Amplitude of the Perlin modulation of the blurred mask.
        edge_sigma: Gaussian blur of the mask before the modulation, in pixels.
    """

    def __init__(self, max_kernel: int = 5, edge_noise: float = 0.35, edge_sigma: float = 1.5) -> None:
        super().__init__()
        if max_kernel < 1 or edge_noise < 0 or edge_sigma <= 0:
            msg = f"MaskVariation needs max_kernel >= 1, edge_noise >= 0 and edge_sigma > 0, got {max_kernel}, {edge_noise}, {edge_sigma}."
            raise ValueError(msg)
        self.max_kernel = max_kernel
        self.edge_noise = edge_noise
        self.edge_sigma = edge_sigma

    def forward(self, cutout: DefectCutout) -> DefectCutout:
        pad = self.max_kernel + 2
        patch = nn.functional.pad(cutout.patch[None], (pad,) * 4, mode="replicate")[0]
        mask = nn.functional.pad(cutout.mask[None], (pad,) * 4)
        side = 1 + 2 * int(torch.randint(self.max_kernel // 2 + 1, ()))
        if side > 1:
            kernel = torch.ones(side, side)
            mask = dilation(mask, kernel) if torch.rand(()) < 0.5 else erosion(mask, kernel)  # noqa: PLR2004
        height, width = mask.shape[-2:]
        blurred = gaussian_blur2d(mask, _odd(4 * self.edge_sigma), (self.edge_sigma, self.edge_sigma))
        scale = 2 ** int(torch.randint(1, 4, ()))
        noise = generate_perlin_noise(height, width, scale=(scale, scale), device=torch.device("cpu"))
        varied = (blurred[0] + self.edge_noise * noise[None] > 0.5).float()  # noqa: PLR2004
        if varied.sum() < MIN_KEPT_AREA * cutout.mask.sum():
            return cutout  # erosion and noise ate the defect: keep the drawn outline
        return _crop_to_mask(DefectCutout(patch, varied, cutout.defect_type))


class DefectPaste(nn.Module):
    """Stage 4: paste a cutout onto a normal image, inside its foreground, with alpha or Poisson blending.

    Args:
        blending: ``"alpha"`` (mask feathered by ``feather_sigma``), ``"poisson"`` (OpenCV
            ``seamlessClone``: the defect takes on the surrounding shading) or ``"mixed"`` (either, 50/50).
        foreground: ``"otsu"`` places defects on the object only (object categories); ``"none"`` anywhere.
        feather_sigma: Gaussian feathering of the alpha mask, in pixels.
    """

    def __init__(
        self, blending: Blending = "mixed", foreground: Foreground = "none", feather_sigma: float = 1.0
    ) -> None:
        super().__init__()
        if blending not in {"alpha", "poisson", "mixed"}:
            msg = f"blending={blending!r} must be 'alpha', 'poisson' or 'mixed'."
            raise ValueError(msg)
        if foreground not in {"none", "otsu"}:
            msg = f"foreground={foreground!r} must be 'none' (textures) or 'otsu' (objects)."
            raise ValueError(msg)
        self.blending = blending
        self.foreground = foreground
        self.feather_sigma = feather_sigma

    def forward(self, background: torch.Tensor, cutout: DefectCutout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` normal image -> the image with the defect and its ``(1, H, W)`` mask."""
        height, width = background.shape[-2:]
        cutout = _fit_inside(cutout, height - 4, width - 4)
        top, left = self._place(background, *cutout.mask.shape[-2:])
        mask = torch.zeros_like(background[:1])
        mask[:, top : top + cutout.mask.shape[-2], left : left + cutout.mask.shape[-1]] = cutout.mask
        canvas = background.clone()
        canvas[:, top : top + cutout.patch.shape[-2], left : left + cutout.patch.shape[-1]] = cutout.patch
        poisson = self.blending == "poisson" or (self.blending == "mixed" and torch.rand(()) < 0.5)  # noqa: PLR2004
        # OpenCV's solver needs an interior: masks thinner than 3 pixels are alpha-blended.
        if poisson and min(cutout.mask.shape[-2:]) >= 3:  # noqa: PLR2004
            return _poisson_blend(background, canvas, mask), mask
        alpha = gaussian_blur2d(mask[None], _odd(4 * self.feather_sigma), (self.feather_sigma,) * 2)[0] * mask
        alpha = torch.maximum(alpha, mask * 0.5) if self.feather_sigma else mask
        return background * (1 - alpha) + canvas * alpha, mask

    def _place(self, background: torch.Tensor, height: int, width: int) -> tuple[int, int]:
        """Top-left corner: the cutout's centre on a random foreground pixel, kept 2 pixels inside the image."""
        image_h, image_w = background.shape[-2:]
        low_y, high_y, low_x, high_x = 2, image_h - height - 2, 2, image_w - width - 2
        if self.foreground == "otsu":
            ys, xs = torch.nonzero(otsu_foreground(background)[0], as_tuple=True)
            if len(ys):
                pick = int(torch.randint(len(ys), ()))
                top = int(ys[pick]) - height // 2
                left = int(xs[pick]) - width // 2
                return min(max(top, low_y), high_y), min(max(left, low_x), high_x)
        return int(torch.randint(low_y, high_y + 1, ())), int(torch.randint(low_x, high_x + 1, ()))


def change_inside(images: torch.Tensor, backgrounds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the mean absolute difference of ``images`` from ``backgrounds`` inside ``masks``, over channels."""
    difference = ((images - backgrounds).abs() * masks).sum(dim=(1, 2, 3))
    return (difference / (masks.sum(dim=(1, 2, 3)) * images.shape[1]).clamp_min(1e-12)).cpu()


class QualityFilter(nn.Module):
    """Stage 5: keep a pasted defect only if its size is plausible and it is visible.

    Args:
        min_area: Fewest defect pixels.
        max_area_fraction: Largest share of the image the defect may cover.
        min_contrast: Least mean absolute change (``[0, 1]`` scale) inside the mask; Poisson
            blending of a defect whose colours match the surroundings can make it vanish.
    """

    def __init__(self, min_area: int = 16, max_area_fraction: float = 0.4, min_contrast: float = 0.03) -> None:
        super().__init__()
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self.min_contrast = min_contrast

    def forward(self, normal: torch.Tensor, defective: torch.Tensor, mask: torch.Tensor) -> bool:
        area = float(mask.sum())
        if area < self.min_area or area > self.max_area_fraction * mask.numel():
            return False
        return float(change_inside(defective[None], normal[None], mask[None])[0]) >= self.min_contrast


class DefectSamples(NamedTuple):
    """What the DAM returns for a batch of ``B`` normal images."""

    images: torch.Tensor
    """``(B, 3, H, W)`` images in ``[0, 1]``, with a defect where ``defect_types >= 0``."""
    masks: torch.Tensor
    """``(B, 1, H, W)`` defect masks in {0, 1} (all zero for clean samples)."""
    defect_types: torch.Tensor
    """``(B,)`` index into the bank's ``type_names``; -1 for a clean sample."""


class DataAugmentationModule(nn.Module):
    """D-ADDA's DAM: the five stages chained on a batch of normal images.

    Args:
        bank: The defect regions to draw from (real, or procedural seeds).
        probability: Share of the output samples that carry a defect; the rest stay clean.
        augmentation: Stage 2 (default :class:`CutoutAugmentation`).
        mask_variation: Stage 3 (default :class:`MaskVariation`).
        paste: Stage 4 (default :class:`DefectPaste`).
        quality_filter: Stage 5 (default :class:`QualityFilter`).

    Seed with ``torch.manual_seed`` (or Lightning's ``seed_everything``) for repeatable draws.

    Example:
        >>> bank = DefectBank.procedural(torch.rand(4, 3, 64, 64), count=8)
        >>> samples = DataAugmentationModule(bank, probability=1.0)(torch.rand(2, 3, 64, 64))
        >>> samples.images.shape, samples.masks.shape, samples.defect_types.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 1, 64, 64]), torch.Size([2]))
    """

    def __init__(
        self,
        bank: DefectBank,
        probability: float = 1.0,
        augmentation: CutoutAugmentation | None = None,
        mask_variation: MaskVariation | None = None,
        paste: DefectPaste | None = None,
        quality_filter: QualityFilter | None = None,
    ) -> None:
        super().__init__()
        if problem := closed_share_problem("probability", probability):
            msg = f"{problem}."
            raise ValueError(msg)
        self.bank = bank
        self.probability = probability
        self.augmentation = augmentation or CutoutAugmentation()
        self.mask_variation = mask_variation or MaskVariation()
        self.paste = paste or DefectPaste()
        self.quality_filter = quality_filter or QualityFilter()

    @property
    def type_names(self) -> list[str]:
        return self.bank.type_names

    def forward(self, normal_images: torch.Tensor, defect_types: torch.Tensor | None = None) -> DefectSamples:
        """Defects on ``(B, 3, H, W)`` normal images; ``defect_types`` (``(B,)``, -1 = any) fixes each sample's type."""
        if normal_images.ndim != 4 or normal_images.shape[1] != 3:  # noqa: PLR2004
            msg = f"The DAM expects a (batch, 3, height, width) tensor of normal images, got shape {tuple(normal_images.shape)}."
            raise ValueError(msg)
        images, masks = normal_images.clone(), torch.zeros_like(normal_images[:, :1])
        types = torch.full((normal_images.shape[0],), -1, dtype=torch.long)
        for index, normal in enumerate(normal_images):
            if torch.rand(()) >= self.probability:
                continue
            wanted = None if defect_types is None or defect_types[index] < 0 else int(defect_types[index])
            for _ in range(MAX_PASTE_TRIES):
                cutout = self.mask_variation(self.augmentation(self.bank.draw(defect_type=wanted)))
                defective, mask = self.paste(normal.cpu(), cutout)
                if self.quality_filter(normal.cpu(), defective, mask):
                    images[index], masks[index], types[index] = (
                        defective.to(normal),
                        mask.to(normal),
                        cutout.defect_type,
                    )
                    break
        return DefectSamples(images, masks, types)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _odd(size: float) -> tuple[int, int]:
    side = max(3, int(size) // 2 * 2 + 1)
    return (side, side)


def _crop_to_mask(cutout: DefectCutout) -> DefectCutout:
    rows = torch.nonzero(cutout.mask[0].any(dim=1)).flatten()
    cols = torch.nonzero(cutout.mask[0].any(dim=0)).flatten()
    if len(rows) == 0:
        return cutout
    region = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    return DefectCutout(cutout.patch[region], (cutout.mask[region] > 0.5).float(), cutout.defect_type)  # noqa: PLR2004


def _fit_inside(cutout: DefectCutout, height: int, width: int) -> DefectCutout:
    """Shrink a cutout that is larger than ``height x width`` (keeping its aspect ratio)."""
    scale = min(1.0, height / cutout.mask.shape[-2], width / cutout.mask.shape[-1])
    if scale == 1.0:
        return cutout
    size = [max(1, int(side * scale)) for side in cutout.mask.shape[-2:]]
    patch = v2.functional.resize(cutout.patch, size, antialias=True)
    mask = v2.functional.resize(cutout.mask, size, interpolation=v2.InterpolationMode.NEAREST)
    return DefectCutout(patch, mask, cutout.defect_type)


def _poisson_blend(background: torch.Tensor, canvas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenCV's seamless cloning of ``canvas`` into ``background`` inside ``mask`` (all ``[0, 1]`` tensors)."""
    binary = (mask[0].numpy() > 0.5).astype(np.uint8) * 255  # noqa: PLR2004
    x, y, w, h = cv2.boundingRect(binary)
    blended = cv2.seamlessClone(
        _to_uint8(canvas), _to_uint8(background), binary, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE
    )
    return torch.from_numpy(blended).permute(2, 0, 1).float() / 255


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
