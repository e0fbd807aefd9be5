"""D-ADDA networks: the mask- and type-conditioned defect generator, the detector, the defect-type head.

Paper: S. Coscia et al., "D-ADDA: distributed anomaly detection with client-side defect generation",
IEEE Systems Journal, 2025. Only the abstract is public; the networks below are this package's design
(``METHODS.md``):

- :class:`DefectGenerator`: an inpainting diffusion U-Net with self-attention (diffusers
  ``UNet2DModel``). Its input is the noisy defective crop concatenated with the normal crop outside
  the mask and the mask itself; the defect type enters through the U-Net's class embedding (added to
  the timestep embedding). It learns the DAM's defects and samples new ones with DDIM inside a mask.
- :class:`DefectDetector`: anomalib's DRAEM segmentation network (``DiscriminativeSubNetwork``) on
  the image alone, trained on generated and DAM (image, mask) pairs. Softmax of its defect channel
  is the anomaly map; the mean of the map's top pixels is the image score. It is the only part in
  the forward pass, so exports contain the detector alone.
- Defect-type head: a linear classifier (scikit-learn's shrunk linear discriminant, or its logistic regression,
  fitted on DAM pastes and generated defects) over the detector's encoder features averaged inside a defect mask.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork
from diffusers import DDIMScheduler
from torch import nn
from torchvision.ops import masks_to_boxes

from anomalib_diffusion.components import UNetConfig, build_unet, make_ddpm_scheduler
from anomalib_diffusion.components.features import top_k_mean
from anomalib_diffusion.components.validation import choice_problem, share_problem

NUM_TRAIN_TIMESTEPS = 1000
# What the generator's U-Net predicts (diffusers' ``prediction_type``).
GENERATOR_TARGETS = ("epsilon", "sample", "v_prediction")
# Share of training crops whose defect type is dropped (the null type) when the generator uses guidance.
TYPE_DROPOUT = 0.1
# DRAEM's segmentation network halves its input five times.
DETECTOR_FACTOR = 32


def generator_problems(
    target: str,
    guidance: float,
    target_name: str = "prediction_type",
    guidance_name: str = "guidance_scale",
) -> list[str]:
    """What is wrong with a generator's prediction target and guidance scale, under the caller's argument names."""
    problems = []
    if problem := choice_problem(target_name, target, GENERATOR_TARGETS):
        problems.append(problem)
    if not guidance >= 1:
        problems.append(f"{guidance_name}={guidance} must be at least 1 (1: no guidance)")
    return problems


class DefectGenerator(nn.Module):
    """Synthesises a defect of a given type inside a mask on a normal image (crops in ``[0, 1]``).

    Training is the weighted DDPM loss on the defective crop ``x0``:
    ``L = E || w * (y - f_theta([x_t, (1 - m) * b, m], t, c)) ||^2`` with ``b`` the normal crop,
    ``m`` the mask, ``c`` the defect type, ``w = 1 + defect_weight * m`` (outside the mask the
    answer is the given background, so the defect pixels carry the loss) and ``y`` the target:
    the noise ``eps`` (``"epsilon"``), the clean crop ``x0`` (``"sample"``) or the velocity
    ``sqrt(abar) eps - sqrt(1 - abar) x0`` (``"v_prediction"``).

    With ``guidance_scale`` above 1 (classifier-free guidance, Ho and Salimans, 2022) the U-Net has one more
    class embedding, the null type; training replaces the type by it on ``TYPE_DROPOUT`` of the crops, and
    sampling follows ``f(null) + guidance_scale * (f(c) - f(null))``, which strengthens what sets a type apart.

    Args:
        unet: Shape of the U-Net; ``in_channels``/``out_channels`` are set here (7 in, or 7 + types with
            ``type_channels``; 3 out) and
            ``num_class_embeds`` must be the number of defect types it can be conditioned on.
        num_inference_steps: DDIM steps when sampling.
        defect_weight: Extra loss weight inside the mask.
        prediction_type: What the U-Net predicts, one of ``GENERATOR_TARGETS``.
        repaint: After every sampling step put the pixels outside the mask back on the background's own
            noising path (``sqrt(abar) b + sqrt(1 - abar) eps`` with the sampling's starting noise ``eps``;
            Lugmayr et al., RePaint, 2022), so that the U-Net sees around the defect what it saw in training.
            Without it only the U-Net's own prediction carries the surroundings from step to step.
        guidance_scale: Classifier-free guidance scale; ``1.0`` is plain conditional sampling (no null type).
        residual: Diffuse the defect's change from the background (``x0 = defective - b``, zero where nothing
            changed) instead of the defective crop (``x0 = 2 * defective - 1``). A U-Net that has learnt little
            then draws a small change on the given background, not mid-grey noise, and what sets a type apart
            (darker, lighter, another colour) is a shift of the change's mean.
        type_channels: Also give the type as input planes: one per type, the mask in its type's plane and zeros
            in the others (the null type of guidance: all zeros). The class embedding only shifts the U-Net's
            features everywhere; the planes put the type at the defect's pixels, into the first convolution.
    """

    def __init__(
        self,
        unet: UNetConfig,
        num_inference_steps: int = 20,
        defect_weight: float = 4.0,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
        repaint: bool = False,
        residual: bool = False,
        type_channels: bool = False,
    ) -> None:
        super().__init__()
        if not unet.num_class_embeds:
            msg = "The defect generator's UNetConfig needs num_class_embeds (the number of defect types)."
            raise ValueError(msg)
        problems = generator_problems(prediction_type, guidance_scale)
        if problems:
            msg = "; ".join(problems) + "."
            raise ValueError(msg)
        self.unet_config = unet
        self.guidance_scale = guidance_scale
        self.repaint = repaint
        self.residual = residual
        self.type_planes = unet.num_class_embeds if type_channels else 0
        # The null type of classifier-free guidance is one more class embedding, after the real types.
        self.null_type = unet.num_class_embeds if guidance_scale > 1 else None
        if self.null_type is not None:
            unet = replace(unet, num_class_embeds=unet.num_class_embeds + 1)
        unet = replace(unet, in_channels=7 + self.type_planes, out_channels=3)
        self.unet = build_unet(unet)
        self.train_scheduler = make_ddpm_scheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=prediction_type
        )
        self.scheduler = DDIMScheduler.from_config(self.train_scheduler.config, clip_sample=True, set_alpha_to_one=True)
        self.scheduler.set_timesteps(num_inference_steps)
        self.defect_weight = defect_weight
        self.prediction_type = prediction_type

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor | int,
        background: torch.Tensor,
        masks: torch.Tensor,
        defect_types: torch.Tensor,
    ) -> torch.Tensor:
        """The U-Net's prediction (see ``prediction_type``); ``noisy`` and ``background`` in ``[-1, 1]``, ``masks`` in {0, 1}."""
        inputs = [noisy, background * (1 - masks), masks]
        if self.type_planes:
            # One-hot over the types and the null type, whose column is dropped: the null type has no plane.
            one_hot = F.one_hot(defect_types, self.type_planes + 1)[:, : self.type_planes].to(masks.dtype)
            inputs.append(one_hot[:, :, None, None] * masks)
        return self.unet(torch.cat(inputs, dim=1), timesteps, class_labels=defect_types).sample

    def _clean(self, defective: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """What the generator diffuses, from crops in ``[0, 1]``: the defective crop in ``[-1, 1]``, or its change."""
        return defective - background if self.residual else defective * 2 - 1

    def _known_region(
        self, sample: torch.Tensor, known: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor, timestep: int
    ) -> torch.Tensor:
        """``sample`` inside the mask; outside, ``known`` noised to ``timestep`` with ``noise`` (RePaint)."""
        step = torch.full((sample.shape[0],), timestep, device=sample.device)
        return masks * sample + (1 - masks) * self.train_scheduler.add_noise(known, noise, step)

    def guided(
        self,
        noisy: torch.Tensor,
        timestep: int,
        background: torch.Tensor,
        masks: torch.Tensor,
        defect_types: torch.Tensor,
    ) -> torch.Tensor:
        """The prediction sampling follows: conditional, or classifier-free guided when ``guidance_scale`` > 1."""
        if self.null_type is None:
            return self(noisy, timestep, background, masks, defect_types)
        null = torch.full_like(defect_types, self.null_type)
        both = self(
            noisy.repeat(2, 1, 1, 1),
            timestep,
            background.repeat(2, 1, 1, 1),
            masks.repeat(2, 1, 1, 1),
            torch.cat([defect_types, null]),
        )
        conditional, unconditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def loss(
        self,
        defective: torch.Tensor,
        background: torch.Tensor,
        masks: torch.Tensor,
        defect_types: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted loss on ``(B, 3, h, w)`` crops in ``[0, 1]`` against the ``prediction_type`` target."""
        clean = self._clean(defective, background)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (clean.shape[0],), device=clean.device)
        noisy = self.train_scheduler.add_noise(clean, noise, timesteps)
        if self.null_type is not None:
            dropped = torch.rand(defect_types.shape, device=defect_types.device) < TYPE_DROPOUT
            defect_types = defect_types.masked_fill(dropped, self.null_type)
        predicted = self(noisy, timesteps, background * 2 - 1, masks, defect_types)
        if self.prediction_type == "sample":
            target = clean
        elif self.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = noise
        weight = 1 + self.defect_weight * masks
        return (weight * (predicted - target) ** 2).mean() / weight.mean()

    @torch.no_grad()
    def generate(
        self,
        background: torch.Tensor,
        masks: torch.Tensor,
        defect_types: torch.Tensor,
        generator: torch.Generator | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """New defects of ``defect_types`` inside ``masks`` on ``background`` crops (``[0, 1]``; outside kept).

        With ``init`` (crops holding a defect already, e.g. a DAM paste) and ``strength < 1``, sampling starts
        from ``init`` noised to the ``strength`` share of the noise schedule and runs the DDIM steps below it
        (SDEdit): the defect is redrawn, keeping the coarse look of the one in ``init``. ``strength`` 1 (or no
        ``init``) samples from pure noise.
        """
        if problem := share_problem("strength", strength):
            msg = f"{problem}."
            raise ValueError(msg)
        condition = background * 2 - 1
        noise = torch.randn(background.shape, generator=generator, dtype=background.dtype).to(background.device)
        timesteps = self.scheduler.timesteps
        if init is None or strength >= 1:
            sample = noise
        else:
            timesteps = timesteps[timesteps < strength * NUM_TRAIN_TIMESTEPS]
            start = timesteps[:1].expand(background.shape[0]).to(background.device)
            sample = self.train_scheduler.add_noise(self._clean(init, background), noise, start)
        following = [*timesteps[1:].tolist(), 0]
        # Outside the mask the clean sample is the background itself, or no change at all.
        known = torch.zeros_like(condition) if self.residual else condition
        if self.repaint:
            sample = self._known_region(sample, known, noise, masks, int(timesteps[0]))
        for timestep, next_timestep in zip(timesteps, following, strict=True):
            predicted = self.guided(sample, int(timestep), condition, masks, defect_types)
            sample = self.scheduler.step(predicted, timestep, sample, eta=0.0).prev_sample
            if self.repaint:
                sample = self._known_region(sample, known, noise, masks, next_timestep)
        if self.residual:
            return (background + masks * sample).clamp(0, 1)
        composed = masks * sample + (1 - masks) * condition
        return ((composed + 1) / 2).clamp(0, 1)


class DefectDetector(nn.Module):
    """anomalib's DRAEM segmentation network on the image alone: ``(B, 3, H, W)`` in ``[0, 1]`` -> 2-class logits.

    Sizes that are not a multiple of 32 are replicate-padded and the logits cropped back.

    Args:
        base_width: Channel width of the first level (DRAEM uses 64; 16 suits a CPU).
    """

    def __init__(self, base_width: int = 16) -> None:
        super().__init__()
        self.network = DiscriminativeSubNetwork(in_channels=3, out_channels=2, base_width=base_width)
        self.feature_dim = base_width * (1 + 2 + 4 + 8 + 8 + 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        return self.network(_pad(images * 2 - 1))[..., :height, :width]

    def mask_features(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)``: every encoder level's activations averaged inside each mask."""
        activations = self.network.encoder_segment(_pad(images * 2 - 1))
        padded_masks = _pad(masks, mode="constant")
        pooled = []
        for activation in activations:
            weights = F.interpolate(padded_masks, size=activation.shape[-2:], mode="area")
            weights = weights / weights.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            pooled.append((activation * weights).sum(dim=(-2, -1)))
        return torch.cat(pooled, dim=1)


class DADDAModel(nn.Module):
    """The D-ADDA networks; the forward pass is the detector (what gets exported).

    Args:
        generator_unet: Shape of the generator's U-Net (``num_class_embeds`` = ``max_defect_types``).
        detector_width: Base width of the detector.
        max_defect_types: Size of the defect-type tables (class embedding, classifier).
        generation_steps: DDIM steps of the generator.
        defect_weight: Generator loss weight inside the mask.
        generator_target: What the generator's U-Net predicts (``DefectGenerator``'s ``prediction_type``).
        generator_guidance: The generator's classifier-free guidance scale (1: none).
        generation_repaint: Sample with RePaint's known-region replacement (``DefectGenerator``'s ``repaint``).
        generator_residual: Diffuse the change from the background (``DefectGenerator``'s ``residual``).
        generator_type_channels: Give the type as input planes too (``DefectGenerator``'s ``type_channels``).
        top_k_fraction: Share of the highest anomaly-map values averaged into the image score.
    """

    def __init__(
        self,
        generator_unet: UNetConfig,
        detector_width: int = 16,
        max_defect_types: int = 16,
        generation_steps: int = 20,
        defect_weight: float = 4.0,
        top_k_fraction: float = 0.001,
        generator_target: str = "sample",
        generator_guidance: float = 1.0,
        generation_repaint: bool = False,
        generator_residual: bool = True,
        generator_type_channels: bool = False,
    ) -> None:
        super().__init__()
        self.generator = DefectGenerator(
            generator_unet,
            generation_steps,
            defect_weight,
            generator_target,
            generator_guidance,
            generation_repaint,
            generator_residual,
            generator_type_channels,
        )
        self.detector = DefectDetector(detector_width)
        self.max_defect_types = max_defect_types
        self.top_k_fraction = top_k_fraction
        # Fitted at the end of training (see DADDA.fit_defect_type_head); buffers so checkpoints
        # and federated rounds carry them.
        self.register_buffer("type_weight", torch.zeros(max_defect_types, self.detector.feature_dim))
        self.register_buffer("type_bias", torch.zeros(max_defect_types))
        self.register_buffer("type_count", torch.tensor(0))
        self.register_buffer("fitted", torch.tensor(False))
        self.type_weight: torch.Tensor
        self.type_bias: torch.Tensor
        self.type_count: torch.Tensor
        self.fitted: torch.Tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: detector logits ``(B, 2, H, W)``. Eval: ``InferenceBatch(pred_score, anomaly_map)``."""
        logits = self.detector(images)
        if self.training:
            return logits
        anomaly_map = logits.softmax(dim=1)[:, 1:]
        return InferenceBatch(pred_score=self.top_k_mean(anomaly_map), anomaly_map=anomaly_map)

    def top_k_mean(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` mean of the highest ``top_k_fraction`` of each map's values."""
        return top_k_mean(maps, self.top_k_fraction)

    @torch.no_grad()
    def classify_defects(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B,)`` defect-type index of the defect inside each mask (the fitted head's argmax)."""
        features = self.detector.mask_features(images, masks)
        logits = features @ self.type_weight.T + self.type_bias
        known = torch.arange(self.max_defect_types, device=logits.device) < self.type_count
        return logits.masked_fill(~known, -torch.inf).argmax(dim=1)


def defect_crop_boxes(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 2)`` top-left corners of ``size x size`` crops centred on each mask's bounding box (clamped inside)."""
    height, width = masks.shape[-2:]
    boxes = torch.zeros(masks.shape[0], 4, device=masks.device)
    present = masks.flatten(1).any(dim=1)
    if present.any():
        boxes[present] = masks_to_boxes(masks[present, 0] > 0.5)  # noqa: PLR2004
    centre_y = torch.where(present, (boxes[:, 1] + boxes[:, 3]) / 2, torch.full_like(boxes[:, 1], height / 2))
    centre_x = torch.where(present, (boxes[:, 0] + boxes[:, 2]) / 2, torch.full_like(boxes[:, 0], width / 2))
    top = (centre_y - size / 2).round().clamp(0, height - size).long()
    left = (centre_x - size / 2).round().clamp(0, width - size).long()
    return torch.stack([top, left], dim=1)


def crop_at(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, size, size)`` crops of ``images`` at ``corners``."""
    return torch.stack(
        [
            image[:, top : top + size, left : left + size]
            for image, (top, left) in zip(images, corners.tolist(), strict=True)
        ]
    )


def paste_at(images: torch.Tensor, crops: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """``images`` with ``crops`` written back at ``corners``."""
    output = images.clone()
    size = crops.shape[-1]
    for index, (top, left) in enumerate(corners.tolist()):
        output[index, :, top : top + size, left : left + size] = crops[index]
    return output


def _pad(images: torch.Tensor, mode: str = "replicate") -> torch.Tensor:
    """Pad to a multiple of the detector's down-sampling factor (outputs are cropped back)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % DETECTOR_FACTOR, (-width) % DETECTOR_FACTOR
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
