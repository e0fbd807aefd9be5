"""Patch extraction and stitching for models trained on patches of normal images.

Stitching uses ``F.unfold`` / ``F.fold``: overlapping patch predictions are summed by ``fold``
and divided by the per-pixel patch count, which exports to ONNX as plain tensor ops.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812


def random_patches(
    images: torch.Tensor,
    patch_size: int,
    num_patches: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop ``num_patches`` random ``patch_size`` squares from random images of the batch."""
    batch, _, height, width = images.shape
    device = images.device
    index = torch.randint(batch, (num_patches,), generator=generator, device="cpu").to(device)
    top = torch.randint(height - patch_size + 1, (num_patches,), generator=generator, device="cpu").to(device)
    left = torch.randint(width - patch_size + 1, (num_patches,), generator=generator, device="cpu").to(device)
    offsets = torch.arange(patch_size, device=device)
    rows = (top[:, None] + offsets[None, :])[:, None, :, None]
    cols = (left[:, None] + offsets[None, :])[:, None, None, :]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return images[index[:, None, None, None], channels, rows, cols]


def grid_size(length: int, patch_size: int, stride: int) -> int:
    """Smallest length >= ``length`` that a grid of ``patch_size`` patches at ``stride`` covers exactly."""
    steps = math.ceil(max(length - patch_size, 0) / stride)
    return patch_size + steps * stride


def pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad the bottom and right edges up to ``height`` x ``width``."""
    pad_h, pad_w = height - images.shape[-2], width - images.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="reflect")


def extract_patches(images: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * L, C, p, p)`` for the L grid positions (H, W already on the grid)."""
    batch, channels = images.shape[:2]
    columns = F.unfold(images, kernel_size=patch_size, stride=stride)
    return columns.transpose(1, 2).reshape(batch * columns.shape[-1], channels, patch_size, patch_size)


def stitch_patches(patches: torch.Tensor, batch: int, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Inverse of :func:`extract_patches`: average overlapping patches back into ``(B, C, H, W)``."""
    channels, patch_size = patches.shape[1], patches.shape[-1]
    columns = patches.reshape(batch, -1, channels * patch_size * patch_size).transpose(1, 2)
    summed = F.fold(columns, output_size=size, kernel_size=patch_size, stride=stride)
    ones = torch.ones(1, 1, *size, dtype=patches.dtype, device=patches.device)
    counts = F.fold(
        F.unfold(ones, kernel_size=patch_size, stride=stride),
        output_size=size,
        kernel_size=patch_size,
        stride=stride,
    )
    return summed / counts
