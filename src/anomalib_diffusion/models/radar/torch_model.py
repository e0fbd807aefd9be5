"""PyTorch model of RADAR: single-step, reconstruction-free diffusion anomaly detection.

Paper: M. Moradi, M. Grasso, B. M. Colosimo, K. Paynabar, "Single-Step Reconstruction-Free
Anomaly Detection and Segmentation via Diffusion Models", arXiv:2508.04818, 2025.

Training is DDPM epsilon-prediction on patches of normal images. Inference is ONE forward
diffusion step: the image is noised to timestep ``t`` with a fixed, seeded noise tensor ``eps``,
the U-Net predicts the noise, and the residual ``eps_theta(x_t, t) - eps`` is the noise map:
near zero where the image looks like the training data, structured where it does not.

The paper's maps and score: a Sobel filter on the noise map gives the pixel map; its global L2
norm and its largest sliding-window L2 norm are the two image features that an Isolation Forest
turns into the image score (``anomaly_map="sobel"``, ``image_score="forest"``). Our defaults
(measured in docs/radar.md): the smoothed noise map itself, or its maximum with the Sobel map,
each standardised by its mean and spread over held-out normal images per distance from the image
border (the U-Net's noise map is raised near the border), optionally joined by the noise maps of extra passes over
the image average-pooled by ``coarse_scales``, and the mean of the map's highest values as the image score, which
rises with the map everywhere.
"""

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_diffusion.components import (
    BorderStandardiser,
    FixedNoiseDraws,
    SeparableGaussianBlur,
    TensorIsolationForest,
    UNetConfig,
    band_moments,
    build_unet,
    edge_features,
    extract_patches,
    grid_size,
    make_ddpm_scheduler,
    noise_at_timestep,
    pad_to,
    sobel_edge_map,
    stitch_patches,
)
from anomalib_diffusion.components.border import border_bands_problem
from anomalib_diffusion.components.features import top_k_mean
from anomalib_diffusion.components.noising import noise_draws_problem
from anomalib_diffusion.components.validation import choice_problem, share_problem

InferenceMode = Literal["patch", "full"]
AnomalyMapName = Literal["noise", "sobel", "combined"]
ImageScoreName = Literal["top_k", "forest"]
ANOMALY_MAPS = get_args(AnomalyMapName)
IMAGE_SCORES = get_args(ImageScoreName)


class RADARModel(nn.Module):
    """RADAR network: a diffusion U-Net, a one-step noise map and a tensor Isolation Forest.

    Args:
        unet: Shape of the noise-prediction U-Net (its ``sample_size`` is the patch size).
        stride: Step between overlapping patches at inference (``inference_mode="patch"``).
        timestep: The single diffusion timestep ``t`` used at inference.
        window_size: Side of the sliding window of the local L2 feature.
        inference_mode: ``"patch"`` stitches overlapping patch predictions (the paper's way);
            ``"full"`` runs the fully convolutional U-Net once on the whole image (faster).
        train_timestep_range: ``[low, high)`` range of timesteps sampled during training.
        anomaly_map_sigma: Standard deviation of the Gaussian that smooths the Sobel map.
        noise_seed: Seed of the fixed inference noise.
        n_estimators: Trees of the Isolation Forest.
        contamination: Isolation Forest contamination (moves only where its score crosses 0).
        inference_chunk_size: Patches (or images) per U-Net call in eager inference; bounds memory.
        anomaly_map: ``"noise"`` (the smoothed noise map), ``"sobel"`` (the smoothed Sobel map, the paper's)
            or ``"combined"`` (their maximum), each standardised on held-out normal images.
        image_score: ``"top_k"`` (mean of the anomaly map's highest ``top_k_fraction`` of pixels) or
            ``"forest"`` (the paper's Isolation Forest on the Sobel map's two L2 features).
        top_k_fraction: Share of pixels the ``"top_k"`` score averages.
        noise_draws: Fixed noise draws whose noise maps are averaged (one U-Net call on ``noise_draws`` x the batch).
        border_bands: Rings of pixels from the image edge inwards whose map statistics are fitted apart (the
            last band is the whole inside); ``1`` standardises every pixel alike. See :class:`BorderStandardiser`.
        coarse_scales: Down-sampling factors of extra U-Net passes, each over the whole image average-pooled by its
            factor (and at the same timestep); their noise maps, upsampled, smoothed and standardised like the
            full-resolution one, join the chosen anomaly map by a maximum. Each costs ``1 / factor**2`` of the
            full-resolution pass; ``()`` scores the full resolution only.
    """

    def __init__(
        self,
        unet: UNetConfig,
        stride: int = 32,
        timestep: int = 1,
        window_size: int = 32,
        inference_mode: InferenceMode = "full",
        train_timestep_range: tuple[int, int] = (0, 200),
        anomaly_map_sigma: float = 4.0,
        noise_seed: int = 0,
        n_estimators: int = 100,
        contamination: float | str = "auto",
        inference_chunk_size: int = 64,
        anomaly_map: AnomalyMapName = "combined",
        image_score: ImageScoreName = "top_k",
        top_k_fraction: float = 0.01,
        noise_draws: int = 1,
        border_bands: int = 16,
        coarse_scales: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        _check_inference_config(unet.sample_size, stride, timestep, window_size, inference_mode, train_timestep_range)
        _check_scoring_config(anomaly_map, image_score, top_k_fraction, noise_draws, border_bands, coarse_scales)
        self.unet_config = unet
        self.patch_size = unet.sample_size
        self.stride = stride
        self.timestep = timestep
        self.window_size = window_size
        self.inference_mode = inference_mode
        self.train_timestep_range = train_timestep_range
        self.inference_chunk_size = inference_chunk_size
        self.unet = build_unet(unet)
        self.scheduler = make_ddpm_scheduler()
        self.forest = TensorIsolationForest(n_estimators=n_estimators, contamination=contamination)
        self.blur = SeparableGaussianBlur(anomaly_map_sigma)
        self.anomaly_map = anomaly_map
        self.image_score = image_score
        self.top_k_fraction = top_k_fraction
        self.inference_noise = FixedNoiseDraws(unet.in_channels, noise_seed, noise_draws)
        self.coarse_scales = tuple(coarse_scales)
        # Mean and standard deviation of the smoothed noise (channel 0), Sobel (1) and coarse noise maps (2, ...)
        # over held-out normal pixels, per border band.
        self.map_statistics = BorderStandardiser(2 + len(self.coarse_scales), border_bands)
        self.register_buffer("fitted", torch.tensor(False))
        self.fitted: torch.Tensor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Training: ``patches -> (predicted noise, true noise)``. Eval: ``images -> InferenceBatch``.

        Images are RGB in ``[0, 1]``; the U-Net works in ``[-1, 1]`` as in DDPM.
        """
        if self.training:
            return self.predict_training_noise(images)
        noise_map = self.noise_map(images)
        edge_map = sobel_edge_map(noise_map)
        anomaly_map = self.standardised_map(noise_map, edge_map, self.coarse_noise_maps(images))
        if self.image_score == "forest":
            pred_score = self.forest(edge_features(edge_map, self.window_size))
        else:
            pred_score = top_k_mean(anomaly_map, self.top_k_fraction)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def standardised_map(
        self, noise_map: torch.Tensor, edge_map: torch.Tensor, coarse_maps: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The chosen anomaly map: smoothed, then standardised with the held-out normal images' statistics.

        The coarse noise maps (:meth:`coarse_noise_maps`, one per ``coarse_scales`` factor) join it by a maximum.
        """

        def standardised(raw_map: torch.Tensor, index: int) -> torch.Tensor:  # 0: noise, 1: Sobel, 2...: coarse
            return self.map_statistics(self.blur(raw_map), channel=index)

        if self.anomaly_map == "sobel":
            anomaly_map = standardised(edge_map, 1)
        else:
            anomaly_map = standardised(noise_map, 0)
            if self.anomaly_map == "combined":
                anomaly_map = torch.maximum(anomaly_map, standardised(edge_map, 1))
        for index, coarse_map in enumerate(coarse_maps or []):
            anomaly_map = torch.maximum(anomaly_map, standardised(coarse_map, 2 + index))
        return anomaly_map

    def coarse_noise_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One ``(B, 1, H, W)`` noise map per ``coarse_scales`` factor: the image average-pooled by the factor, one
        full pass of the U-Net at the inference timestep, the map upsampled bilinearly back to ``H x W``."""
        height, width = images.shape[-2:]
        maps = []
        for scale in self.coarse_scales:
            multiple = scale * self.unet_config.downsampling_factor
            padded = pad_to(images, math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)
            small_map = self.noise_map(F.avg_pool2d(padded, scale), inference_mode="full")
            upsampled = F.interpolate(small_map, scale_factor=float(scale), mode="bilinear", align_corners=False)
            maps.append(upsampled[..., :height, :width])
        return maps

    def head_statistics(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 2 * M * border_bands + 2)`` per image: the M smoothed maps' band moments, then the 2 forest features.

        The moments are :func:`band_moments` of the smoothed noise, Sobel and coarse noise maps (M = 2 + the number
        of ``coarse_scales``), flattened.
        """
        noise_map = self.noise_map(images)
        edge_map = sobel_edge_map(noise_map)
        maps = [noise_map, edge_map, *self.coarse_noise_maps(images)]
        smoothed = torch.cat([self.blur(raw_map) for raw_map in maps], dim=1)
        moments = band_moments(smoothed, self.map_statistics.bands).flatten(1)
        return torch.cat([moments, edge_features(edge_map, self.window_size).double()], dim=1)

    def fit_head(self, statistics: torch.Tensor) -> None:
        """Set the map statistics (and fit the forest, if it scores) from :meth:`head_statistics` of normal images."""
        channels, bands = self.map_statistics.mean.shape
        size = 2 * channels * bands
        self.map_statistics.fit(statistics[:, :size].reshape(-1, channels, bands, 2))
        if self.image_score == "forest":
            self.forest.fit(statistics[:, size:].float())
        self.fitted.fill_(True)

    def drop_coarse_scales(self) -> None:
        """Score with the full-resolution maps only (checkpoints fitted before ``coarse_scales`` existed)."""
        device = self.map_statistics.mean.device
        self.coarse_scales = ()
        self.map_statistics = BorderStandardiser(2, self.map_statistics.bands).to(device)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Checkpoints from before the border bands name the map statistics ``map_mean`` and ``map_std``."""
        for old, new in (("map_mean", "map_statistics.mean"), ("map_std", "map_statistics.std")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` Isolation Forest inputs: global and max-window L2 norms of the Sobel noise map."""
        return edge_features(sobel_edge_map(self.noise_map(images)), self.window_size)

    def predict_training_noise(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM training pair for random timesteps: ``(eps_theta(x_t, t), eps)``."""
        samples = patches * 2 - 1
        noise = torch.randn_like(samples)
        low, high = self.train_timestep_range
        timesteps = torch.randint(low, high, (samples.shape[0],), device=samples.device)
        noisy = self.scheduler.add_noise(samples, noise, timesteps)
        return self.unet(noisy, timesteps).sample, noise

    def noise_map(self, images: torch.Tensor, inference_mode: InferenceMode | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, 1, H, W)`` per-pixel norm of ``eps_theta(x_t, t) - eps``.

        ``inference_mode`` overrides the model's (the coarse passes always run on the whole image).
        """
        height, width = images.shape[-2:]
        inference_mode = inference_mode or self.inference_mode
        if inference_mode == "patch":
            padded_size = (
                grid_size(height, self.patch_size, self.stride),
                grid_size(width, self.patch_size, self.stride),
            )
        else:
            factor = self.unet_config.downsampling_factor
            padded_size = (math.ceil(height / factor) * factor, math.ceil(width / factor) * factor)
        samples = pad_to(images * 2 - 1, *padded_size)
        # Every draw of the fixed noise in one U-Net call: (draws * B, C, H, W), draw-major.
        samples, noise = self.inference_noise.batch(samples)
        noisy = noise_at_timestep(self.scheduler, samples, noise, self.timestep)
        if inference_mode == "patch":
            patches = extract_patches(noisy, self.patch_size, self.stride)
            predicted = stitch_patches(self.predict_noise(patches), noisy.shape[0], padded_size, self.stride)
        else:
            predicted = self.predict_noise(noisy)
        residual = (predicted - noise)[..., :height, :width]
        norms = torch.linalg.vector_norm(residual, dim=1, keepdim=True)
        return self.inference_noise.average(norms)

    def predict_noise(self, samples: torch.Tensor) -> torch.Tensor:
        """``eps_theta(x_t, t)`` at the inference timestep, in chunks when running eagerly."""
        # A symbolic batch size means torch.export is tracing: one call, no shape-dependent branch.
        if isinstance(samples.shape[0], torch.SymInt) or samples.shape[0] <= self.inference_chunk_size:
            return self.unet(samples, self.timestep).sample
        chunks = samples.split(self.inference_chunk_size)
        return torch.cat([self.unet(chunk, self.timestep).sample for chunk in chunks])


def _check_scoring_config(
    anomaly_map: str,
    image_score: str,
    top_k_fraction: float,
    noise_draws: int,
    border_bands: int,
    coarse_scales: tuple[int, ...],
) -> None:
    choices = (
        choice_problem("anomaly_map", anomaly_map, ANOMALY_MAPS),
        choice_problem("image_score", image_score, IMAGE_SCORES),
    )
    problems = [problem for problem in choices if problem]
    if problem := share_problem("top_k_fraction", top_k_fraction):
        problems.append(problem)
    if problem := noise_draws_problem(noise_draws):
        problems.append(problem)
    if problem := border_bands_problem(border_bands):
        problems.append(problem)
    if problem := coarse_scales_problem(coarse_scales):
        problems.append(problem)
    if problems:
        msg = "Invalid RADAR configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)


def coarse_scales_problem(coarse_scales: object) -> str | None:
    """Why ``coarse_scales`` is not a list of distinct down-sampling factors of at least 2, or ``None``."""
    scales = list(coarse_scales) if isinstance(coarse_scales, list | tuple) else None
    if scales is None or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in scales):  # noqa: PLR2004
        shown = coarse_scales if scales is None else scales
        return f"coarse_scales={shown!r} must be a list of integer down-sampling factors of at least 2 (or [])"
    if len(set(scales)) != len(scales):
        return f"coarse_scales={scales} names a factor twice"
    return None


def _check_inference_config(
    patch_size: int,
    stride: int,
    timestep: int,
    window_size: int,
    inference_mode: str,
    train_timestep_range: tuple[int, ...],
) -> None:
    """Reject settings that would otherwise fail deep inside torch, naming every problem at once."""
    problems = []
    if not 0 < stride <= patch_size:
        problems.append(f"stride={stride} must be in 1..patch_size ({patch_size}) so that patches overlap or touch")
    if not 0 < timestep < 1000:  # noqa: PLR2004
        problems.append(f"timestep={timestep} must be in 1..999 (the paper sweeps 50-250)")
    if window_size < 1:
        problems.append(f"window_size={window_size} must be positive")
    if inference_mode not in {"patch", "full"}:
        problems.append(f"inference_mode={inference_mode!r} must be 'patch' or 'full'")
    low_high = tuple(train_timestep_range)
    if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= 1000:  # noqa: PLR2004
        problems.append(f"train_timestep_range={list(low_high)} must be [low, high) with 0 <= low < high <= 1000")
    if problems:
        msg = "Invalid RADAR configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)
