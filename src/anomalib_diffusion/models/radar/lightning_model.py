"""RADAR as an anomalib model: training loop, Isolation Forest fitting, export guards.

Paper: M. Moradi, M. Grasso, B. M. Colosimo, K. Paynabar, "Single-Step Reconstruction-Free
Anomaly Detection and Segmentation via Diffusion Models", arXiv:2508.04818, 2025.

Example:
    >>> from anomalib.data import MVTecAD  # doctest: +SKIP
    >>> from anomalib.engine import Engine  # doctest: +SKIP
    >>> from anomalib_diffusion.models import RADAR  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.fit(model=RADAR(), datamodule=MVTecAD(root="datasets/demo", category="brick"))  # doctest: +SKIP
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib import LearningType
from anomalib import TaskType
from anomalib.data import AnomalibDataModule, Batch, InferenceBatch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchmetrics import Metric
from torchvision.transforms.v2 import Resize

from anomalib_diffusion.components import (
    CheckpointOwnerMixin,
    UNetConfig,
    as_int_tuple,
    check_image_batch,
    collect_training_features,
    random_patches,
)

from .torch_model import InferenceMode, RADARModel

if TYPE_CHECKING:
    import openvino as ov

__all__ = ["RADAR"]

DEFAULT_IMAGE_SIZE = (256, 256)


class RADAR(CheckpointOwnerMixin, AnomalibModule):
    """RADAR: Reconstruction-free Anomaly Detection with Attention-based diffusion models in Real-time.

    A DDPM noise-prediction U-Net is trained on random patches of normal images. At inference
    one forward diffusion step gives a noise map, its Sobel edge map is the anomaly map, and an
    Isolation Forest, fitted on the normal training images at the end of training, turns two
    edge-map features into the image score.

    Args:
        image_size: Size the default pre-processor resizes images to (height, width).
        patch_size: Side of the square training patches (and of the inference patches).
        stride: Step between overlapping inference patches.
        timestep: The single diffusion timestep ``t`` of inference (1..999).
        window_size: Side of the sliding window of the local L2 feature.
        inference_mode: ``"patch"`` (stitch overlapping patches, the paper's way) or ``"full"``
            (one pass of the fully convolutional U-Net over the whole image, faster).
        block_out_channels: U-Net channel width per resolution level.
        attention_resolutions: Patch-level feature-map sizes that get self-attention.
        layers_per_block: Residual blocks per U-Net level.
        train_timestep_range: ``[low, high)`` timesteps sampled for the DDPM loss.
        learning_rate: AdamW learning rate.
        max_steps: Optimiser steps; training stops here and the forest is fitted.
        patches_per_step: Random patches per optimiser step.
        n_estimators: Trees of the Isolation Forest.
        contamination: Isolation Forest contamination ("auto" or a fraction in (0, 0.5]).
        anomaly_map_sigma: Gaussian smoothing of the Sobel map.
        noise_seed: Seed of the fixed inference noise.
        inference_chunk_size: Patches per U-Net call during eager inference (bounds memory).
        pre_processor: ``True`` for the default (resize, no ImageNet normalisation), a
            pre-processor, or ``False``.
        post_processor: ``True`` for anomalib's default, a post-processor, or ``False``.
        evaluator: ``True`` for anomalib's default metrics, an evaluator, or ``False``.
        visualizer: ``True`` for anomalib's default visualiser, a visualiser, or ``False``.
    """

    # The U-Net weights depend on the first four; the fitted Isolation Forest on all of them.
    FITTED_HPARAMS = (
        "patch_size",
        "block_out_channels",
        "attention_resolutions",
        "layers_per_block",
        "stride",
        "timestep",
        "window_size",
        "inference_mode",
        "noise_seed",
    )

    def __init__(
        self,
        image_size: Sequence[int] | int = DEFAULT_IMAGE_SIZE,
        patch_size: int = 64,
        stride: int = 32,
        timestep: int = 50,
        window_size: int = 32,
        inference_mode: InferenceMode = "patch",
        block_out_channels: Sequence[int] = (32, 64, 64),
        attention_resolutions: Sequence[int] = (16,),
        layers_per_block: int = 1,
        train_timestep_range: Sequence[int] = (0, 1000),
        learning_rate: float = 1e-3,
        max_steps: int = 2000,
        patches_per_step: int = 16,
        n_estimators: int = 100,
        contamination: float | str = "auto",
        anomaly_map_sigma: float = 4.0,
        noise_seed: int = 0,
        inference_chunk_size: int = 64,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        image_size = _size_pair(image_size)
        _check_training_config(image_size, patch_size, max_steps, patches_per_step)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.learning_rate = learning_rate
        self.max_steps = max_steps
        self.patches_per_step = patches_per_step
        self.model: RADARModel = RADARModel(
            unet=UNetConfig(
                sample_size=patch_size,
                block_out_channels=as_int_tuple(block_out_channels),
                attention_resolutions=as_int_tuple(attention_resolutions),
                layers_per_block=layers_per_block,
            ),
            stride=stride,
            timestep=timestep,
            window_size=window_size,
            inference_mode=inference_mode,
            train_timestep_range=tuple(train_timestep_range),
            anomaly_map_sigma=anomaly_map_sigma,
            noise_seed=noise_seed,
            n_estimators=n_estimators,
            contamination=contamination,
            inference_chunk_size=inference_chunk_size,
        )

    @classmethod
    def configure_pre_processor(cls, image_size: Sequence[int] | int | None = None) -> PreProcessor:
        """Resize only: the U-Net is trained from scratch on ``[0, 1]`` RGB (mapped to ``[-1, 1]``).

        anomalib's default would also apply ImageNet normalisation, which only suits ImageNet
        backbones; the resize keeps exported graphs at a fixed size.
        """
        return PreProcessor(transform=Resize(_size_pair(image_size or DEFAULT_IMAGE_SIZE), antialias=True))

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Pre-process, score and post-process raw images (what exported models compute)."""
        if not torch.compiler.is_exporting():
            check_image_batch(batch, self.name, min_size=1)
        return super().forward(batch, *args, **kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.unet.parameters(), lr=self.learning_rate)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """DDPM loss on ``patches_per_step`` random patches of the batch's normal images."""
        del args, kwargs
        check_image_batch(batch.image, self.name, self.model.patch_size)
        patches = random_patches(batch.image, self.model.patch_size, self.patches_per_step)
        predicted_noise, noise = self.model(patches)
        loss = F.mse_loss(predicted_noise, noise)
        if not torch.isfinite(loss):
            msg = (
                f"{self.name} training loss became {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch}); lower learning_rate (now {self.learning_rate}) "
                "or check the training images for invalid values."
            )
            raise FloatingPointError(msg)
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=True, logger=True)
        return loss

    def on_validation_start(self) -> None:
        """Fit the Isolation Forest on the normal training images with the current U-Net."""
        if self.trainer.state.fn == TrainerFn.FITTING or not self.is_fitted():
            self.fit_forest()

    def on_test_start(self) -> None:
        self._require_fitted("test")

    def on_predict_start(self) -> None:
        self._require_fitted("predict")

    def fit_forest(self) -> None:
        """Fit the Isolation Forest on the two edge-map features of every training image."""
        features = collect_training_features(
            self,
            self.model.image_features,
            description="RADAR: Isolation Forest features of the training images",
            min_size=self.model.patch_size,
        )
        self.model.forest.fit(features)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        check_image_batch(batch.image, self.name, self.model.patch_size)
        return batch.update(**self.model(batch.image)._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        check_image_batch(batch.image, self.name, self.model.patch_size)
        return super().test_step(batch, batch_idx, *args, **kwargs)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        check_image_batch(batch.image, self.name, self.model.patch_size)
        return super().predict_step(batch, batch_idx, dataloader_idx)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Train for exactly ``max_steps`` steps and validate once, at the end.

        anomalib gives these precedence over the CLI's trainer flags, and its benchmark jobs set
        no epoch limit, so the training budget is the model's own ``max_steps``.
        """
        return {
            "max_steps": self.max_steps,
            "max_epochs": None,
            "val_check_interval": self.max_steps,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0,
        }

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    def is_fitted(self) -> bool:
        return self.model.forest.is_fitted

    def _require_fitted(self, action: str) -> None:
        if not self.is_fitted():
            msg = (
                f"{self.name} cannot {action} before it is fitted: its Isolation Forest is empty. "
                "Train it first (`anomalib train --model RADAR ...` or `engine.fit`) or load a trained "
                "checkpoint (`--ckpt_path` / `RADAR.load_from_checkpoint`)."
            )
            raise RuntimeError(msg)

    def _compress_ov_model(
        self,
        model: "ov.Model",
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> "ov.Model":
        """INT8_PTQ quantises the U-Net only, calibrated on normal training images (see ``quantize_network``)."""
        if compression_type != CompressionType.INT8_PTQ:
            return super()._compress_ov_model(model, compression_type, datamodule, metric, task, max_drop)
        from anomalib_diffusion.components.quantization import quantize_network  # imports openvino

        datamodule.setup("fit")
        images = (item.image[None].numpy() for item in datamodule.train_data)
        # The noise map's channel norm (ReduceL2) is where the U-Net ends and the scoring head begins.
        return quantize_network(model, images, head_start_type="ReduceL2")

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        # Checked before anything is written: anomalib would create the export folder first.
        self._require_fitted("export")
        if compression_type in {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ} and datamodule is None:
            msg = (
                f"{compression_type.name} needs a datamodule: RADAR calibrates on its normal training images "
                "(pass --data ... to `anomalib export`, or datamodule= to Engine.export)."
            )
            raise ValueError(msg)
        return super().to_openvino(export_root, model_file_name, input_size, compression_type, datamodule, **kwargs)

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        self._require_fitted("export")
        return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        self._require_fitted("export")
        # The dynamo exporter emits opset 18; asking for anomalib's default 14 only triggers a
        # failing down-conversion (Pad has no 18->17 adapter) that is then ignored.
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)


def _size_pair(size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    pair = tuple(int(value) for value in size)
    if len(pair) != 2:  # noqa: PLR2004
        msg = f"image_size must be one integer or [height, width], got {list(size)}."
        raise ValueError(msg)
    return pair


def _check_training_config(image_size: tuple[int, int], patch_size: int, max_steps: int, patches_per_step: int) -> None:
    """Reject training settings that would otherwise fail deep inside torch (the network checks its own)."""
    problems = []
    if min(image_size) < patch_size:
        problems.append(
            f"image_size {list(image_size)} is smaller than patch_size={patch_size}; raise image_size or lower patch_size",
        )
    if max_steps < 1:
        problems.append(f"max_steps={max_steps} must be at least 1")
    if patches_per_step < 1:
        problems.append(f"patches_per_step={patches_per_step} must be at least 1")
    if problems:
        msg = "Invalid RADAR configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)
