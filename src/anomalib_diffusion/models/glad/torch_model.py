"""PyTorch model of GLAD: adaptive-step diffusion reconstruction with anomaly-aware training.

Paper: H. Yao, M. Liu, Z. Yin, Z. Yan, X. Hong, W. Zuo, "GLAD: Towards Better Reconstruction with
Global and Local Adaptive Diffusion Models for Unsupervised Anomaly Detection", ECCV 2024,
arXiv:2406.07487.

Training (ATP, anomaly-aware training): a DDPM U-Net learns to denoise images that carry
synthetic anomalies *towards the normal image*. For timestep ``t`` the clean input is
``x_syn = (t/T) x_anom + (1 - t/T) x_normal`` and the regression target is
``eps* = eps + sqrt(abar_t) / sqrt(1 - abar_t) * (x_syn - x_normal)``, so that the clean-image
estimate ``x0_hat = (x_t - sqrt(1 - abar_t) eps*) / sqrt(abar_t)`` is exactly ``x_normal``.

Inference (ADS + SAFF): the image is noised to ``start_timestep`` with fixed seeded noise and
denoised with a fixed list of DDIM steps above 0 (the last step's clean estimate is the
reconstruction). At each search step (every DDIM step after the first, down to ``min_timestep``;
at the first the two estimates below coincide) the generated estimate ``x0_hat``
is compared with the input-anchored estimate ``x0_tilde = x + sqrt((1 - abar_t) / abar_t)(eps -
eps_theta)`` (the same step's formula applied to the input noised with the same ``eps``) by a
per-location feature distance. The first step whose top-k mean distance exceeds the calibrated
``tau`` is the sample's own step (ADS); there ``x0 = m x0_hat + (1 - m) x0_tilde`` with ``m`` a
calibrated ramp of the distance map (SAFF): generated content where the map is high, the input
where it is low. A sample that never exceeds ``tau`` is fused at the last search step (its map is
low, so it keeps the input). Every per-sample decision is a mask, so the whole reconstruction
unrolls into one exportable graph with a fixed number of U-Net calls.

Scoring: the feature distance between the input and the reconstruction (averaged over ``noise_draws``
reconstructions from differently seeded noise), Gaussian-blurred and
standardised per border band with held-out normal images' statistics (:class:`BorderStandardiser`: the
map is raised near the image border on normal images), is the ``anomaly_map``; the mean of its top pixels
is ``pred_score``. With ``extra_features`` the same reconstructions are also compared in those feature spaces
(the ImageNet EfficientNet-Lite0's, say); each distance is standardised on its own, and the map is their mean.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from diffusers import DDIMScheduler
from torch import nn

from anomalib_diffusion.components import (
    BorderStandardiser,
    FixedNoiseDraws,
    SeparableGaussianBlur,
    UNetConfig,
    build_unet,
    make_ddpm_scheduler,
)
from anomalib_diffusion.components.border import band_moments, border_bands_problem
from anomalib_diffusion.components.features import (
    EfficientNetLite0Features,
    UNetEncoderFeatures,
    neighbourhood_cosine_distance,
    pixel_gradient_distance,
    top_k_mean,
)
from anomalib_diffusion.components.noising import noise_draws_problem
from anomalib_diffusion.components.validation import share_problem

FeatureExtractorName = Literal["unet", "efficientnet_lite0"]
FEATURE_EXTRACTORS = ("unet", "efficientnet_lite0")
# The layers compared when a setting names none (and always for the extra_features distances).
DEFAULT_FEATURE_LAYERS: dict[str, tuple[int, ...]] = {"unet": (0, 1), "efficientnet_lite0": (1, 2)}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class GLADReconstruction:
    """What one adaptive reconstruction computed, per sample.

    Attributes:
        reconstruction: ``(B, 3, H, W)`` reconstructed images in ``[-1, 1]``.
        chosen_timestep: ``(B,)`` the search step where the sample crossed ``tau`` (its fusion
            step), or ``0`` if it never did (fused at the last search step, treated as normal).
        discrepancies: ``(B, S)`` top-k mean distance between ``x0_hat`` and ``x0_tilde`` at each
            of the ``S`` search steps.
        distance_maps: The ``S`` distance maps ``(B, 1, H, W)`` when recorded (calibration), else empty.
    """

    reconstruction: torch.Tensor
    chosen_timestep: torch.Tensor
    discrepancies: torch.Tensor
    distance_maps: list[torch.Tensor]


class GLADModel(nn.Module):
    """GLAD network: diffusion U-Net (trained and EMA copies), adaptive DDIM reconstruction, feature scoring.

    Args:
        unet: Shape of the U-Net (``sample_size`` is the training crop; inference is fully convolutional).
        num_inference_steps: DDIM steps over the full 1000-step schedule (their spacing).
        start_timestep: Inference starts at the largest DDIM timestep not above this.
        min_timestep: Search steps are the DDIM timesteps at or above this; later steps are plain DDIM.
        adaptive: ``False`` turns ADS and SAFF off: plain DDIM reconstruction from the start step.
        feature_extractor: ``"unet"`` (the EMA U-Net's encoder) or ``"efficientnet_lite0"``.
        feature_layers: U-Net down blocks, or EfficientNet feature stages, compared.
        feature_timestep: Timestep embedding at which the U-Net encoder is read.
        pixel_weight: Weight of the pixel/gradient distance added to the feature distance.
        neighbourhood_radius: Nearest-neighbour search radius, in feature-map cells.
        top_k_fraction: Share of the highest distance-map values averaged into a search step's discrepancy (ADS).
        score_top_k_fraction: Share of the anomaly map's highest values averaged into the image score.
        anomaly_map_sigma: Standard deviation of the Gaussian smoothing of the anomaly map.
        noise_seed: Seed of the fixed inference noise.
        noise_draws: Fixed noise draws (seeds ``noise_seed``, ``noise_seed + 1``, ...), each reconstructed; their
            distance maps are averaged (``noise_draws`` x the U-Net calls).
        border_bands: Border bands of the anomaly map's standardisation (``1``: one mean and spread).
        extra_features: Further feature spaces in which the input and its reconstruction are compared, at their
            default layers, without the pixel term (``feature_extractor``, if named, is skipped: its distance is
            the first). Each distance map is smoothed and standardised on its own; the anomaly map is the mean of
            all of them. The step search (ADS) keeps ``feature_extractor``'s distance.
    """

    def __init__(
        self,
        unet: UNetConfig,
        num_inference_steps: int = 5,
        start_timestep: int = 700,
        min_timestep: int = 200,
        adaptive: bool = True,
        feature_extractor: FeatureExtractorName = "unet",
        feature_layers: Sequence[int] = (0, 1),
        feature_timestep: int = 10,
        pixel_weight: float = 1.0,
        neighbourhood_radius: int = 1,
        top_k_fraction: float = 0.01,
        anomaly_map_sigma: float = 4.0,
        noise_seed: int = 0,
        border_bands: int = 16,
        noise_draws: int = 2,
        score_top_k_fraction: float = 0.05,
        extra_features: Sequence[FeatureExtractorName] = (),
    ) -> None:
        super().__init__()
        _check_inference_config(
            num_inference_steps,
            start_timestep,
            min_timestep,
            feature_extractor,
            top_k_fraction,
            neighbourhood_radius,
            border_bands,
            noise_draws,
            score_top_k_fraction,
            extra_features,
        )
        self.unet_config = unet
        self.unet = build_unet(unet)
        self.ema_unet = build_unet(unet)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_unet.requires_grad_(False)
        self.train_scheduler = make_ddpm_scheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        self.scheduler = DDIMScheduler.from_config(self.train_scheduler.config, clip_sample=True, set_alpha_to_one=True)
        self.scheduler.set_timesteps(num_inference_steps)
        # The last step returns its clean estimate, so DDIM's step at t = 0 (which would only remove the
        # sqrt(1 - abar_0) = 1 % of noise left) is not run: one U-Net call fewer per draw; on the tuning half
        # image and pixel AUROC moved by at most 0.003 (docs/glad.md, *Two noise draws*).
        self.timesteps = [int(t) for t in self.scheduler.timesteps if 0 < t <= start_timestep]
        if not self.timesteps:
            msg = (
                f"No DDIM step above 0 lies at or below start_timestep={start_timestep} with "
                f"num_inference_steps={num_inference_steps} (every {NUM_TRAIN_TIMESTEPS // num_inference_steps} "
                "timesteps); raise start_timestep or num_inference_steps."
            )
            raise ValueError(msg)
        # At the start step the trajectory *is* the noised input, so x0_hat == x0_tilde there and
        # the comparison is only float noise: the search starts one step later.
        self.search_timesteps = [t for t in self.timesteps[1:] if t >= min_timestep] if adaptive else []
        if adaptive and not self.search_timesteps:
            msg = (
                f"No DDIM step after the start lies between min_timestep={min_timestep} and "
                f"start_timestep={start_timestep} with num_inference_steps={num_inference_steps} "
                f"(steps: {self.timesteps}); lower min_timestep or raise start_timestep."
            )
            raise ValueError(msg)
        self.adaptive = adaptive
        self.pixel_weight = pixel_weight
        self.neighbourhood_radius = neighbourhood_radius
        self.top_k_fraction = top_k_fraction
        self.score_top_k_fraction = score_top_k_fraction
        self.feature_extractor_name = feature_extractor
        self.feature_timestep = feature_timestep
        self.features = self.feature_network(feature_extractor, feature_layers)
        self.extra_feature_names = tuple(name for name in extra_features if name != feature_extractor)
        try:
            extras = [self.feature_network(name, DEFAULT_FEATURE_LAYERS[name]) for name in self.extra_feature_names]
        except ImportError as error:
            msg = f"{error} Or score GLAD without them: extra_features=[] (the own encoder's distance alone)."
            raise ImportError(msg) from error
        self.extra_features = nn.ModuleList(extras)
        self.inference_noise = FixedNoiseDraws(unet.in_channels, noise_seed, noise_draws)
        self.blur = SeparableGaussianBlur(anomaly_map_sigma)
        # Mean 0 and spread 1 until calibration fits them: the plain blurred distances.
        self.map_statistics = BorderStandardiser(1 + len(self.extra_features), border_bands)
        steps = len(self.search_timesteps)
        # Calibrated at the end of fitting on held-out normal training images (see GLAD.calibrate).
        self.register_buffer("tau", torch.full((steps,), torch.inf))
        self.register_buffer("ramp_low", torch.zeros(steps))
        self.register_buffer("ramp_high", torch.ones(steps))
        self.register_buffer("fitted", torch.tensor(False))
        self.tau: torch.Tensor
        self.ramp_low: torch.Tensor
        self.ramp_high: torch.Tensor
        self.fitted: torch.Tensor

    def feature_network(self, name: str, layers: Sequence[int]) -> nn.Module:
        """The feature maps ``name`` compares: the EMA U-Net's encoder or the ImageNet EfficientNet-Lite0's."""
        if name == "unet":
            return UNetEncoderFeatures(self.ema_unet, layers, self.feature_timestep)
        return EfficientNetLite0Features(layers)

    def drop_extra_features(self) -> None:
        """Score with ``feature_extractor``'s distance alone (checkpoints fitted before ``extra_features`` existed)."""
        device = self.map_statistics.mean.device
        self.extra_feature_names = ()
        self.extra_features = nn.ModuleList()
        self.map_statistics = BorderStandardiser(1, self.map_statistics.bands).to(device)

    # -- training ----------------------------------------------------------------------------

    def training_pair(
        self,
        normal: torch.Tensor,
        anomalous: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps_theta(x_t, t), target)`` for random timesteps; images in ``[0, 1]``.

        With ``anomalous`` (ATP), ``x_t`` is noised from ``x_syn`` and the target is ``eps*``;
        without it this is the plain DDPM loss pair.
        """
        normal = normal * 2 - 1
        noise = torch.randn_like(normal)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (normal.shape[0],), device=normal.device)
        if anomalous is None:
            return self.unet(self.train_scheduler.add_noise(normal, noise, timesteps), timesteps).sample, noise
        synthetic = self.synthetic_input(normal, anomalous * 2 - 1, timesteps)
        noisy = self.train_scheduler.add_noise(synthetic, noise, timesteps)
        target = self.atp_target(noise, synthetic, normal, timesteps)
        return self.unet(noisy, timesteps).sample, target

    @staticmethod
    def synthetic_input(normal: torch.Tensor, anomalous: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_syn = (t/T) x_anom + (1 - t/T) x_normal``: the anomaly fades out as ``t`` goes to 0."""
        weight = (timesteps.float() / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1)
        return weight * anomalous + (1 - weight) * normal

    def atp_target(
        self,
        noise: torch.Tensor,
        synthetic: torch.Tensor,
        normal: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """``eps* = eps + sqrt(abar_t)/sqrt(1 - abar_t) (x_syn - x_normal)``: its ``x0`` estimate is ``x_normal``."""
        alpha_bar = self.train_scheduler.alphas_cumprod.to(noise.device)[timesteps].view(-1, 1, 1, 1)
        return noise + (alpha_bar.sqrt() / (1 - alpha_bar).sqrt()) * (synthetic - normal)

    # -- inference ---------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """``(B, 3, H, W)`` images in ``[0, 1]`` -> ``InferenceBatch(pred_score, anomaly_map)``."""
        anomaly_map = self.map_statistics(self.smoothed_distance(images)).mean(dim=1, keepdim=True)
        return InferenceBatch(pred_score=top_k_mean(anomaly_map, self.score_top_k_fraction), anomaly_map=anomaly_map)

    def smoothed_distance(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + len(extra_features), H, W)``: the blurred distances between the images (in ``[0, 1]``) and their
        reconstruction: ``feature_extractor``'s (with the pixel term), then each extra feature space's."""
        padded = self.pad(images * 2 - 1)
        # Every noise draw in one batch, draw-major: (draws * B, 3, H, W).
        samples, noise = self.inference_noise.batch(padded)
        reconstruction = self.reconstruct(samples, noise=noise).reconstruction
        height, width = images.shape[-2:]
        copies = len(self.inference_noise)
        distances = [self.distance_map(padded, reconstruction, copies=copies)]
        distances += [
            self.feature_distance(features, padded, reconstruction, copies=copies) for features in self.extra_features
        ]
        distance = torch.cat(distances, dim=1)[..., :height, :width]
        return self.blur(self.inference_noise.average(distance))

    def map_moments(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, border_bands, 2)``: :func:`band_moments` of the smoothed distances (what calibration fits on)."""
        return band_moments(self.smoothed_distance(images), self.map_statistics.bands)

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Checkpoints from before the border standardisation scored the plain blurred distance (mean 0, spread 1)."""
        if prefix + "tau" in state_dict and prefix + "map_statistics.mean" not in state_dict:
            state_dict[prefix + "map_statistics.mean"] = torch.zeros_like(self.map_statistics.mean)
            state_dict[prefix + "map_statistics.std"] = torch.ones_like(self.map_statistics.std)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def pad(self, samples: torch.Tensor) -> torch.Tensor:
        """Replicate-pad to a multiple of the U-Net's downsampling factor (crop the outputs back)."""
        factor = self.unet_config.downsampling_factor
        height, width = samples.shape[-2:]
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h == 0 and pad_w == 0:
            return samples
        return F.pad(samples, (0, pad_w, 0, pad_h), mode="replicate")

    def reconstruct(
        self,
        samples: torch.Tensor,
        record: bool = False,
        noise: torch.Tensor | None = None,
    ) -> GLADReconstruction:
        """Adaptive DDIM reconstruction of ``samples`` in ``[-1, 1]`` (sizes a multiple of the U-Net factor).

        ``noise`` (one per sample) defaults to the first fixed noise draw.
        """
        batch, _, height, width = samples.shape
        if noise is None:
            noise = self.inference_noise[0](height, width).expand(batch, -1, -1, -1)
        alphas = self.scheduler.alphas_cumprod
        start = self.timesteps[0]
        current = alphas[start].sqrt() * samples + (1 - alphas[start]).sqrt() * noise
        fused = torch.zeros_like(samples[:, :1, :1, :1], dtype=torch.bool)
        chosen = torch.zeros_like(samples[:, 0, 0, 0])
        discrepancies, maps = [], []
        for timestep in self.timesteps:
            predicted = self.ema_unet(current, timestep).sample
            if timestep in self.search_timesteps:
                step = self.search_timesteps.index(timestep)
                alpha = alphas[timestep]
                generated = ((current - (1 - alpha).sqrt() * predicted) / alpha.sqrt()).clamp(-1, 1)
                anchored = (samples + ((1 - alpha) / alpha).sqrt() * (noise - predicted)).clamp(-1, 1)
                distance = self.distance_map(generated, anchored)
                discrepancy = self.top_k_mean(distance)
                last = step == len(self.search_timesteps) - 1
                trigger = ~fused if last else ~fused & (discrepancy > self.tau[step]).view(-1, 1, 1, 1)
                ramp = ((distance - self.ramp_low[step]) / (self.ramp_high[step] - self.ramp_low[step])).clamp(0, 1)
                fusion = ramp * generated + (1 - ramp) * anchored
                # Re-noising x0 with the step's own eps makes DDIM's next step start from the fused x0.
                current = torch.where(trigger, alpha.sqrt() * fusion + (1 - alpha).sqrt() * predicted, current)
                crossed = trigger.view(-1) & (discrepancy > self.tau[step])
                chosen = torch.where(crossed, torch.full_like(chosen, timestep), chosen)
                fused = fused | trigger
                discrepancies.append(discrepancy)
                if record:
                    maps.append(distance)
            step_output = self.scheduler.step(predicted, timestep, current, eta=0.0)
            # The last step's clean estimate is the reconstruction (what a further step down to 0 returns).
            current = step_output.pred_original_sample if timestep == self.timesteps[-1] else step_output.prev_sample
        stacked = torch.stack(discrepancies, dim=1) if discrepancies else samples.new_zeros(batch, 0)
        return GLADReconstruction(current, chosen, stacked, maps)

    def distance_map(self, first: torch.Tensor, second: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """``(copies * B, 1, H, W)``: mean neighbourhood cosine distance of the feature layers + weighted pixel distance.

        The pixel distance is the neighbourhood L1 distance of pixels and Sobel gradients. ``second`` holds
        ``copies`` images per ``first`` image, draw-major (``copies * B``; the reconstructions of several noise
        draws): ``first``'s features are computed once and compared with each copy.
        """
        distance = self.feature_distance(self.features, first, second, copies)
        if self.pixel_weight:
            first = first.repeat(copies, 1, 1, 1) if copies > 1 else first
            distance = distance + self.pixel_weight * pixel_gradient_distance(first, second, self.neighbourhood_radius)
        return distance

    def feature_distance(
        self, features: nn.Module, first: torch.Tensor, second: torch.Tensor, copies: int = 1
    ) -> torch.Tensor:
        """``(copies * B, 1, H, W)``: mean over ``features``' layers of the neighbourhood cosine distance."""
        batch, _, height, width = first.shape
        both = features(torch.cat([first, second]))

        def tiled(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(copies, 1, 1, 1) if copies > 1 else tensor

        layers = [
            F.interpolate(
                # Slicing, not chunk(2): chunk's size arithmetic pins a dynamic batch during torch.export.
                neighbourhood_cosine_distance(
                    tiled(feature[:batch]), feature[batch:], radius=self.neighbourhood_radius
                ),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )
            for feature in both
        ]
        return torch.stack(layers).mean(dim=0)

    def top_k_mean(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` mean of the highest ``top_k_fraction`` of each map's values (a search step's discrepancy)."""
        return top_k_mean(maps, self.top_k_fraction)


def _check_inference_config(
    num_inference_steps: int,
    start_timestep: int,
    min_timestep: int,
    feature_extractor: str,
    top_k_fraction: float,
    neighbourhood_radius: int,
    border_bands: int = 1,
    noise_draws: int = 1,
    score_top_k_fraction: float = 0.05,
    extra_features: Sequence[str] = (),
) -> None:
    """Reject settings that would otherwise fail deep inside torch or diffusers, naming every problem."""
    problems = []
    if not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
        problems.append(f"num_inference_steps={num_inference_steps} must be in 1..{NUM_TRAIN_TIMESTEPS}")
    if not 0 <= min_timestep <= start_timestep < NUM_TRAIN_TIMESTEPS:
        problems.append(
            f"need 0 <= min_timestep ({min_timestep}) <= start_timestep ({start_timestep}) < {NUM_TRAIN_TIMESTEPS}"
        )
    if feature_extractor not in FEATURE_EXTRACTORS:
        problems.append(f"feature_extractor={feature_extractor!r} must be 'unet' or 'efficientnet_lite0'")
    extras = list(extra_features)
    if unknown := [name for name in extras if name not in FEATURE_EXTRACTORS]:
        problems.append(f"extra_features={extras!r}: {unknown!r} unknown (choose from {list(FEATURE_EXTRACTORS)})")
    elif len(set(extras)) != len(extras):
        problems.append(f"extra_features={extras!r} names a feature space twice")
    for name, fraction in (("top_k_fraction", top_k_fraction), ("score_top_k_fraction", score_top_k_fraction)):
        if problem := share_problem(name, fraction):
            problems.append(problem)
    if neighbourhood_radius < 0:
        problems.append(f"neighbourhood_radius={neighbourhood_radius} must be 0 or more")
    if problem := border_bands_problem(border_bands):
        problems.append(problem)
    if problem := noise_draws_problem(noise_draws):
        problems.append(problem)
    if problems:
        msg = "Invalid GLAD configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)
