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

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib import TaskType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchmetrics import Metric

from anomalib_diffusion.components import (
    CheckpointOwnerMixin,
    FittedModuleMixin,
    HoldoutMixin,
    UNetConfig,
    as_int_tuple,
    calibration_fraction_problem,
    check_training_config,
    collect_training_features,
    int8_network_only,
    random_patches,
    resize_pre_processor,
    size_pair,
)

from .torch_model import AnomalyMapName, ImageScoreName, InferenceMode, RADARModel

if TYPE_CHECKING:
    import openvino as ov

__all__ = ["RADAR"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (256, 256)


class RADAR(CheckpointOwnerMixin, FittedModuleMixin, HoldoutMixin, AnomalibModule):
    """RADAR: Reconstruction-free Anomaly Detection with Attention-based diffusion models in Real-time.

    A DDPM noise-prediction U-Net is trained on random patches of normal images. At inference
    one forward diffusion step gives a noise map. The anomaly map is that map smoothed (or its
    Sobel edge map, the paper's), standardised with statistics of normal images that the U-Net
    did not train on (``calibration_fraction`` of the training split, held out), per distance from the
    image border; the image score is the mean of its highest values (or the paper's Isolation Forest
    on two edge-map norms, fitted on the same held-out images).

    Args:
        image_size: Size the default pre-processor resizes images to (height, width).
        patch_size: Side of the square training patches (and of the inference patches).
        stride: Step between overlapping inference patches.
        timestep: The single diffusion timestep ``t`` of inference (1..999).
        window_size: Side of the sliding window of the local L2 feature.
        inference_mode: ``"patch"`` (stitch overlapping patches, the paper's way) or ``"full"``
            (one pass of the fully convolutional U-Net over the whole image, faster).
        block_out_channels: U-Net channel width per resolution level.
        attention_resolutions: Patch-level feature-map sizes that get self-attention (the paper's U-Net has some).
        mid_attention: Whether the U-Net's middle block has self-attention (the paper's does).
        layers_per_block: Residual blocks per U-Net level.
        train_timestep_range: ``[low, high)`` timesteps sampled for the DDPM loss.
        learning_rate: AdamW learning rate.
        max_steps: Optimiser steps; training stops here and the score head is fitted.
        patches_per_step: Random patches per optimiser step.
        n_estimators: Trees of the Isolation Forest (``image_score="forest"``).
        contamination: Isolation Forest contamination ("auto" or a fraction in (0, 0.5]).
        anomaly_map_sigma: Gaussian smoothing of the Sobel map.
        noise_seed: Seed of the fixed inference noise (draw ``k`` uses ``noise_seed + k``) and of the hold-out draw.
        inference_chunk_size: Patches per U-Net call during eager inference (bounds memory).
        anomaly_map: ``"noise"``, ``"sobel"`` (the paper's) or ``"combined"`` (see :class:`RADARModel`).
        image_score: ``"top_k"`` (mean of the map's highest ``top_k_fraction``) or ``"forest"`` (the paper's).
        top_k_fraction: Share of pixels the ``"top_k"`` score averages.
        noise_draws: Fixed noise draws averaged into the noise map (each costs one more U-Net pass).
        border_bands: Rings of pixels from the image edge inwards whose map statistics are fitted apart (the
            U-Net's noise map is raised near the border on normal images); ``1`` fits one mean and spread.
        coarse_scales: Down-sampling factors of extra U-Net passes over the average-pooled image, whose noise maps
            join the anomaly map by a maximum (each costs ``1 / factor**2`` of the full pass); ``[]`` for none.
        calibration_fraction: Share of the training images held out of training, to fit the score head on.
        pre_processor: ``True`` for the default (resize, no ImageNet normalisation), a
            pre-processor, or ``False``.
        post_processor: ``True`` for anomalib's default, a post-processor, or ``False``.
        evaluator: ``True`` for anomalib's default metrics, an evaluator, or ``False``.
        visualizer: ``True`` for anomalib's default visualiser, a visualiser, or ``False``.
    """

    FITTED_PART = "its score head (anomaly-map statistics and, if it scores, the Isolation Forest)"

    # The U-Net weights depend on the first five; the fitted score head on all of them.
    FITTED_HPARAMS = (
        "patch_size",
        "block_out_channels",
        "attention_resolutions",
        "mid_attention",
        "layers_per_block",
        "stride",
        "timestep",
        "window_size",
        "inference_mode",
        "noise_seed",
        "anomaly_map",
        "image_score",
        "anomaly_map_sigma",
        "noise_draws",
        "border_bands",
        "coarse_scales",
        "calibration_fraction",
    )

    def __init__(
        self,
        image_size: Sequence[int] | int = DEFAULT_IMAGE_SIZE,
        patch_size: int = 64,
        stride: int = 32,
        timestep: int = 1,
        window_size: int = 32,
        inference_mode: InferenceMode = "full",
        block_out_channels: Sequence[int] = (8, 8),
        attention_resolutions: Sequence[int] = (),
        mid_attention: bool = False,
        layers_per_block: int = 1,
        train_timestep_range: Sequence[int] = (0, 200),
        learning_rate: float = 1e-3,
        max_steps: int = 2000,
        patches_per_step: int = 16,
        n_estimators: int = 100,
        contamination: float | str = "auto",
        anomaly_map_sigma: float = 4.0,
        noise_seed: int = 0,
        inference_chunk_size: int = 64,
        anomaly_map: AnomalyMapName = "combined",
        image_score: ImageScoreName = "top_k",
        top_k_fraction: float = 0.01,
        noise_draws: int = 1,
        border_bands: int = 16,
        coarse_scales: Sequence[int] = (),
        calibration_fraction: float = 0.2,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        image_size = size_pair(image_size)
        check_training_config(self.__class__.__name__, image_size, patch_size, max_steps, patches_per_step)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if problem := calibration_fraction_problem(calibration_fraction):
            msg = f"Invalid RADAR configuration: {problem}."
            raise ValueError(msg)
        self.calibration_fraction = calibration_fraction
        self.holdout_seed = noise_seed
        self.learning_rate = learning_rate
        self.max_steps = max_steps
        self.patches_per_step = patches_per_step
        self.min_image_size = patch_size
        self.model: RADARModel = RADARModel(
            unet=UNetConfig(
                sample_size=patch_size,
                block_out_channels=as_int_tuple(block_out_channels),
                attention_resolutions=as_int_tuple(attention_resolutions),
                mid_attention=mid_attention,
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
            anomaly_map=anomaly_map,
            image_score=image_score,
            top_k_fraction=top_k_fraction,
            noise_draws=noise_draws,
            border_bands=border_bands,
            coarse_scales=as_int_tuple(coarse_scales),
        )

    @classmethod
    def configure_pre_processor(cls, image_size: Sequence[int] | int | None = None) -> PreProcessor:
        """Resize only: the U-Net is trained from scratch on ``[0, 1]`` RGB (mapped to ``[-1, 1]``).

        anomalib's default would also apply ImageNet normalisation, which only suits ImageNet
        backbones; the resize keeps exported graphs at a fixed size.
        """
        return resize_pre_processor(image_size or DEFAULT_IMAGE_SIZE)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.unet.parameters(), lr=self.learning_rate)

    def on_fit_start(self) -> None:
        """Hold out a share of the normal training images: the score head is fitted on them."""
        self.draw_holdout()
        super().on_fit_start()  # last: a resumed run restores its random generators here

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """DDPM loss on ``patches_per_step`` random patches of the batch's normal, not held-out images."""
        del args, kwargs
        self.check_batch(batch)
        images = self.training_images(batch)
        if images is None:
            return None  # the whole batch is held out: Lightning skips the step
        patches = random_patches(images, self.model.patch_size, self.patches_per_step)
        predicted_noise, noise = self.model(patches)
        loss = F.mse_loss(predicted_noise, noise)
        self.check_loss(loss)
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=True, logger=self.logger is not None)
        return loss

    def on_validation_start(self) -> None:
        """Fit the score head on the held-out normal images with the current U-Net."""
        if self.trainer.state.fn == TrainerFn.FITTING or not self.is_fitted():
            self.fit_head()

    def fit_head(self) -> None:
        """Fit the anomaly-map statistics (and the Isolation Forest, if it scores) on the held-out images."""
        statistics = collect_training_features(
            self,
            self.model.head_statistics,
            description="RADAR: fitting the score head on held-out normal images",
            min_size=self.model.patch_size,
            indices=self._holdout_indices,
        )
        self.model.fit_head(statistics)

    def is_fitted(self) -> bool:
        return bool(self.model.fitted)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints saved before ``coarse_scales`` existed were fitted on the full-resolution maps: they score so."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        if saved and "coarse_scales" not in saved and self.model.coarse_scales:
            logger.warning(
                "This RADAR checkpoint was saved before coarse_scales existed and its score head was fitted on the "
                "full-resolution maps only: it scores with coarse_scales=[] (train again to score with %s).",
                list(self.model.coarse_scales),
            )
            self.model.drop_coarse_scales()
            self.hparams["coarse_scales"] = []

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
        # The noise maps' channel norms (ReduceL2, one per pass) are where the U-Net ends and the scoring head begins.
        return int8_network_only(model, datamodule, head_start_type="ReduceL2")
