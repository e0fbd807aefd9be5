"""Input checks shared by the models: catch bad images before they crash deep inside torch."""

from collections.abc import Collection

import torch


def choice_problem(name: str, value: object, choices: Collection[object]) -> str | None:
    """``"name=value must be one of 'a', 'b'"`` when ``value`` is none of ``choices``, else ``None``."""
    if value in choices:
        return None
    return f"{name}={value!r} must be one of {', '.join(map(repr, choices))}"


def share_problem(name: str, value: float) -> str | None:
    """``"name=value must be in (0, 1]"`` when ``value`` is not a share of a whole, else ``None``."""
    if 0 < value <= 1:
        return None
    return f"{name}={value} must be in (0, 1]"


def closed_share_problem(name: str, value: float) -> str | None:
    """``"name=value must be in [0, 1]"`` when ``value`` is not a probability or a share (0 allowed), else ``None``."""
    if 0 <= value <= 1:
        return None
    return f"{name}={value} must be in [0, 1]"


def check_image_batch(images: torch.Tensor, model_name: str, min_size: int, channels: int = 3) -> None:
    """Raise a one-sentence ``ValueError`` if ``images`` is not a ``(B, C, H, W)`` batch the model can use."""
    if not isinstance(images, torch.Tensor):
        msg = f"{model_name} expects a torch.Tensor batch of images, got {type(images).__name__}."
        raise TypeError(msg)
    if images.ndim != 4:  # noqa: PLR2004 - (B, C, H, W)
        msg = (
            f"{model_name} expects images shaped (batch, channels, height, width), got shape "
            f"{tuple(images.shape)}; add a batch dimension with images.unsqueeze(0)."
        )
        raise ValueError(msg)
    if images.shape[1] != channels:
        hint = {
            1: "grayscale: repeat it to 3 channels (image.expand(-1, 3, -1, -1)) or read it with anomalib's "
            "read_image, which converts to RGB",
            4: "RGBA: drop the alpha channel (image[:, :3]) or read it with anomalib's read_image, "
            "which converts to RGB",
        }.get(images.shape[1], "convert the images to RGB")
        msg = f"{model_name} expects {channels}-channel RGB images, got {images.shape[1]} channels ({hint})."
        raise ValueError(msg)
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        msg = (
            f"{model_name} got {height}x{width} images, smaller than its patch_size={min_size}; "
            f"resize them to at least {min_size}x{min_size} (e.g. with the pre-processor's image_size) "
            "or choose a smaller patch_size."
        )
        raise ValueError(msg)
    if not torch.is_floating_point(images):
        msg = f"{model_name} expects float images scaled to [0, 1], got dtype {images.dtype}; use image.float() / 255."
        raise ValueError(msg)
