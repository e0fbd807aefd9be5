"""D-ADDA as an anomalib model: DAM, defect generator, detector and defect-type head, trained in one fit.

Paper: S. Coscia et al., "D-ADDA: distributed anomaly detection with client-side defect generation",
IEEE Systems Journal, 2025.

Fitting runs two phases on the datamodule's normal training images, then one fitting pass:

1. ``generator_steps`` steps: the DAM pastes defects from the defect bank (real defects lent by
   :class:`~anomalib_diffusion.data.MVTecADFewDefects`, or procedural seeds) onto the batch, and the
   generator learns to inpaint them from crops around each mask.
2. ``detector_steps`` steps: the generator first makes ``generated_pool`` defects of every type
   (DDIM inside DAM masks on normal images; one that barely changes its crop, against the DAM
   pastes it started from, is drawn again: ``generated_min_change``), which are cut out along
   their masks into a second bank. Then each training image (a ``detector_crop`` crop of it, if
   set) gets, with probability ``defect_probability``, a defect: a generated one (share
   ``generated_fraction``), pasted from that bank by the DAM's augmentation, mask variation and
   blending, or a DAM paste of a real (or procedural) one; the detector learns to segment it
   (focal loss, as DRAEM).
3. At the end of fitting, the defect-type head is fitted (a linear discriminant with a shrunk covariance) on
   ``type_samples_per_type`` defects of every known type: with ``type_head_source="both"`` (default)
   half are DAM pastes of the site's real defects of that type and half generated defects of that
   type in masks of that type; types the site holds no real example of (federated) get generated
   defects only. ``"generated"`` is the paper's protocol (generated defects only); ``"dam"`` uses
   the DAM pastes only.

Example:
    >>> from anomalib.engine import Engine  # doctest: +SKIP
    >>> from anomalib_diffusion.data import MVTecADFewDefects  # doctest: +SKIP
    >>> from anomalib_diffusion.models import DADDA  # doctest: +SKIP
    >>> data = MVTecADFewDefects(root="datasets/demo", category="brick", defects_per_type=3)  # doctest: +SKIP
    >>> Engine().fit(model=DADDA(), datamodule=data)  # doctest: +SKIP
"""

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import AnomalibDataModule, Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from kornia.losses import focal_loss
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from anomalib_diffusion.augmentation import (
    DataAugmentationModule,
    DefectBank,
    DefectPaste,
    PerlinAnomalySynthesis,
)
from anomalib_diffusion.augmentation.defects import change_inside
from anomalib_diffusion.components import (
    CheckpointOwnerMixin,
    FittedModuleMixin,
    UNetConfig,
    as_int_tuple,
    check_training_config,
    resize_pre_processor,
    size_pair,
    training_images_loader,
)
from anomalib_diffusion.components.validation import choice_problem, closed_share_problem, share_problem
from anomalib_diffusion.data.few_defects import defect_type_of

from .torch_model import DADDAModel, crop_at, defect_crop_boxes, generator_problems, paste_at
from .type_head import DefectTypeStatistics, pooled_type_head

__all__ = ["DADDA"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (256, 256)
TYPE_NAMES_KEY = "dadda_defect_types"
POOL_SEED_KEY = "dadda_generated_pool_seed"
# Normal training images kept for procedural seeding and for generating the head's training set.
MAX_NORMAL_IMAGES = 64
TYPE_HEAD_SOURCES = ("both", "generated", "dam")
TYPE_HEAD_CLASSIFIERS = ("lda", "logistic")
DETECTOR_SCHEDULES = ("constant", "cosine")


class DADDA(CheckpointOwnerMixin, FittedModuleMixin, AnomalibModule):
    """D-ADDA: a detector trained on defects that a diffusion model generates from a site's few real ones.

    Args:
        image_size: Size the default pre-processor resizes images to (height, width).
        patch_size: Side of the square crops around each defect that the generator works on.
        block_out_channels: Generator U-Net channel width per level.
        attention_resolutions: Crop-level feature-map sizes with self-attention in the generator.
        layers_per_block: Residual blocks per generator level.
        generation_steps: DDIM steps when the generator samples a defect.
        generation_strength: Where in the noise schedule sampling starts. ``1.0``: from pure noise
            inside the DAM's mask. Below 1: from the DAM's paste of a real defect of the same type,
            noised to that share of the schedule (SDEdit), so only the steps below it run; the
            generator redraws the defect keeping its coarse look. Types the site holds no real
            example of are always drawn from pure noise.
        generation_repaint: After every sampling step put the pixels outside the mask back on the
            background's own noising path (RePaint's known-region replacement). ``False``: the U-Net's
            own prediction carries them from step to step.
        defect_weight: Extra generator loss weight inside the defect mask.
        generator_target: What the generator's U-Net learns to predict: ``"sample"`` (the clean change, or
            the clean defective crop without ``generator_residual``), ``"epsilon"`` (the noise; the default
            before 2026-12-06) or ``"v_prediction"`` (the velocity).
        generator_guidance: Classifier-free guidance scale of the generator. ``1.0``: none. Above 1 the
            generator also learns a null type (the type is dropped on 10 % of its training crops) and
            samples ``f(null) + generator_guidance * (f(type) - f(null))``, which strengthens what sets a
            type apart, at twice the U-Net calls per sampling step.
        generator_residual: The generator diffuses the defect's change from the normal crop (defective minus
            normal) instead of the defective crop itself: an undertrained generator then draws a faint change
            on the real background, not mid-grey noise, and a type's darker or lighter look is a shift of the
            change's mean. ``False``: the defective crop itself (the default before 2026-12-06).
        generator_type_channels: Give the generator the defect type as input planes too (the mask in its type's
            plane, zeros in the others), beside the class embedding: the type reaches the defect's pixels at the
            first convolution instead of only shifting the U-Net's features everywhere.
        detector_width: Base channel width of the detector (anomalib's DRAEM segmentation network).
        defect_types: Defect type names in index order. ``None`` takes the types of the real
            defects found at fit time (sorted); federated sites pass the same list so indices agree.
        max_defect_types: Size of the type tables (generator class embedding, type head).
        procedural_seeds: Procedural defects seeded into the bank when no real defects are lent.
        procedural_stroke_fraction: Share of those seeds that are thin, bent strokes (CutPaste's "scar", longer)
            instead of Perlin blobs, so the detector also learns thin, elongated defects (scratches, cracks).
        defect_foreground: ``"none"`` (textures) or ``"otsu"`` (objects: defects on the object only).
        blending: DAM paste blending: ``"alpha"``, ``"poisson"`` or ``"mixed"``.
        defect_probability: Share of detector training images that carry a defect.
        generated_fraction: Share of those defects made by the generator (the rest: DAM pastes).
        generated_pool: Defects per type the generator makes once, when the detector phase starts; the
            detector's generated defects are DAM pastes of them. ``0``: the generator samples a new
            defect inside every detector step (20 DDIM U-Net calls each, several times slower).
        generated_min_change: The pool's bar for a generated defect: its mean absolute change from the normal
            crop it was drawn on, inside its mask, at least this share of the median change that the DAM's
            pastes make in the same masks (the pastes the generator starts from). The generator draws a type
            again (up to three times the pool) until ``generated_pool`` pass; a type with fewer keeps those
            and the most visible of the rest (logged). ``0``: keep the first draws (before 2026-12-07).
        detector_crop: Side of the random square crops the detector trains on (it is fully
            convolutional and scores whole images); ``None``, or a side as large as the image, trains
            on whole images.
        generator_steps: Optimiser steps of phase 1 (generator).
        detector_steps: Optimiser steps of phase 2 (detector).
        type_samples_per_type: Defects per type that the type head is fitted on (512 since 2026-12-06; 32 before).
        type_head_classifier: ``"lda"``: scikit-learn's linear discriminant with Ledoit-Wolf shrinkage of the
            shared covariance (the default since 2026-12-06); ``"logistic"``: logistic regression (before).
        type_head_source: What the type head is fitted on: ``"both"`` (DAM pastes and generated
            defects), ``"generated"`` (generated only, the paper's protocol) or ``"dam"``.
        top_k_fraction: Share of the highest anomaly-map values averaged into the image score.
        learning_rate: AdamW learning rate of both networks.
        detector_schedule: The detector's learning rate over its steps: ``"constant"``, or ``"cosine"`` (half a cosine
            from ``learning_rate`` down to 0 at the last detector step; the generator's rate stays constant).
        pre_processor: ``True`` for the default (resize only), a pre-processor, or ``False``.
        post_processor: ``True`` for anomalib's default, a post-processor, or ``False``.
        evaluator: ``True`` for anomalib's default metrics, an evaluator, or ``False``.
        visualizer: ``True`` for anomalib's default visualiser, a visualiser, or ``False``.
    """

    FITTED_PART = "its trained detector"
    FITTED_HPARAMS = (
        "patch_size",
        "block_out_channels",
        "attention_resolutions",
        "layers_per_block",
        "detector_width",
        "max_defect_types",
        "generator_target",
        "generator_guidance",
        "generator_residual",
        "generator_type_channels",
    )

    def __init__(
        self,
        image_size: Sequence[int] | int = DEFAULT_IMAGE_SIZE,
        patch_size: int = 64,
        block_out_channels: Sequence[int] = (32, 64, 64),
        attention_resolutions: Sequence[int] = (16,),
        layers_per_block: int = 1,
        generation_steps: int = 20,
        generation_strength: float = 1.0,
        generation_repaint: bool = False,
        defect_weight: float = 4.0,
        generator_target: str = "sample",
        generator_guidance: float = 1.0,
        generator_residual: bool = True,
        generator_type_channels: bool = False,
        detector_width: int = 16,
        defect_types: Sequence[str] | None = None,
        max_defect_types: int = 16,
        procedural_seeds: int = 64,
        procedural_stroke_fraction: float = 0.5,
        defect_foreground: str = "none",
        blending: str = "mixed",
        defect_probability: float = 0.7,
        generated_fraction: float = 0.5,
        generated_pool: int = 32,
        generated_min_change: float = 0.5,
        detector_crop: int | None = 128,
        generator_steps: int = 1000,
        detector_steps: int = 1000,
        type_samples_per_type: int = 512,
        type_head_source: str = "both",
        type_head_classifier: str = "lda",
        top_k_fraction: float = 0.001,
        learning_rate: float = 1e-3,
        detector_schedule: str = "constant",
        pre_processor: PreProcessor | bool = True,
        post_processor: bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        image_size = size_pair(image_size)
        max_steps = generator_steps + detector_steps
        check_training_config(self.__class__.__name__, image_size, patch_size, max_steps, 1)
        _check_dadda_config(
            generator_steps,
            detector_steps,
            defect_probability,
            generated_fraction,
            defect_types,
            max_defect_types,
            type_head_source,
            generated_pool,
            detector_crop,
            generation_strength,
            patch_size,
            generator_target,
            generator_guidance,
            procedural_stroke_fraction,
            detector_schedule,
            top_k_fraction,
            type_head_classifier,
            generated_min_change,
        )
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(image_size)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.automatic_optimization = False
        self.learning_rate = learning_rate
        self.detector_schedule = detector_schedule
        self.max_steps = max_steps
        self.generator_steps = generator_steps
        self.detector_steps = detector_steps
        self.min_image_size = patch_size
        self.patch_size = patch_size
        self.procedural_seeds = procedural_seeds
        self.procedural_stroke_fraction = procedural_stroke_fraction
        self.defect_foreground = defect_foreground
        self.blending = blending
        self.defect_probability = defect_probability
        self.generated_fraction = generated_fraction
        self.generated_pool = generated_pool
        self.generated_min_change = generated_min_change
        self.generation_strength = generation_strength
        self.detector_crop = detector_crop
        self.type_samples_per_type = type_samples_per_type
        self.type_head_source = type_head_source
        self.type_head_classifier = type_head_classifier
        self.type_names: list[str] = list(defect_types or [])
        self.model = DADDAModel(
            generator_unet=UNetConfig(
                sample_size=patch_size,
                block_out_channels=as_int_tuple(block_out_channels),
                attention_resolutions=as_int_tuple(attention_resolutions),
                layers_per_block=layers_per_block,
                in_channels=7,
                out_channels=3,
                num_class_embeds=max_defect_types,
            ),
            detector_width=detector_width,
            max_defect_types=max_defect_types,
            generation_steps=generation_steps,
            defect_weight=defect_weight,
            top_k_fraction=top_k_fraction,
            generator_target=generator_target,
            generator_guidance=generator_guidance,
            generation_repaint=generation_repaint,
            generator_residual=generator_residual,
            generator_type_channels=generator_type_channels,
        )
        self.dam: DataAugmentationModule | None = None
        # The generator's defects that the detector trains on (built when the detector phase starts).
        self.generated_dam: DataAugmentationModule | None = None
        # A federated site leaves the head to the server, which fits one against the global detector.
        self.fit_type_head_at_end = True
        self._typed_regions = True
        self._normal_images: torch.Tensor | None = None
        self._pool_seed: int | None = None
        self._resumed_pool_seed: int | None = None
        # Defect-type counts: [correct in the true region, images scored; correct in the model's own region, scored].
        self._type_hits = torch.zeros(4, dtype=torch.long)

    @classmethod
    def configure_pre_processor(cls, image_size: Sequence[int] | int | None = None) -> PreProcessor:
        """Resize only: both networks are trained from scratch on ``[0, 1]`` RGB."""
        return resize_pre_processor(image_size or DEFAULT_IMAGE_SIZE)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        # Two optimisers step by hand, so Lightning may not clip (it refuses with manual optimisation).
        arguments = dict(super().trainer_arguments)
        arguments.pop("gradient_clip_val")
        return arguments

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.AdamW(self.model.generator.parameters(), lr=self.learning_rate),
            torch.optim.AdamW(self.model.detector.parameters(), lr=self.learning_rate),
        ]

    # -- training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        """Build the DAM's defect bank from the lent real defects, or from procedural seeds."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self._build_defect_bank(
            self._collect_normal_images(training_images_loader(self)),
            self._load_real_defects(getattr(datamodule, "defect_data", None)),
        )
        # The generated pool's seed: drawn from the run's random stream (so the run's seed fixes it), kept in
        # checkpoints (so a run resumed in the detector phase rebuilds the same pool).
        resumed, self._resumed_pool_seed = self._resumed_pool_seed, None
        drawn = int(torch.randint(2**31 - 1, ()))
        self._pool_seed = resumed if resumed is not None and self.trainer.ckpt_path is not None else drawn
        super().on_fit_start()  # last: a resumed run restores its random generators here

    def prepare_defect_bank(self, datamodule: AnomalibDataModule) -> None:
        """Build the DAM from ``datamodule`` outside a fit (the DAM is not saved in checkpoints).

        What a federated site does to score the *global* model on its own defects: it loads the
        global weights, builds its DAM from its own training images and lent defects as a fit would,
        then calls :meth:`defect_type_statistics`.
        """
        datamodule.setup("fit")
        dataset = datamodule.train_data
        loader = DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0, collate_fn=dataset.collate_fn)
        self._build_defect_bank(
            self._collect_normal_images(loader), self._load_real_defects(getattr(datamodule, "defect_data", None))
        )

    def _build_defect_bank(
        self, normal_images: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor, list[str]] | None
    ) -> None:
        self._normal_images = normal_images
        self.generated_dam = None
        if real is None:
            bank = DefectBank.procedural(
                normal_images,
                count=self.procedural_seeds,
                synthesis=PerlinAnomalySynthesis(
                    probability=1.0,
                    scale_exponent_range=(2, 4),
                    foreground=self.defect_foreground,  # type: ignore[arg-type]
                    stroke_fraction=self.procedural_stroke_fraction,
                ),
            )
            logger.info("D-ADDA: no real defects lent; the defect bank holds %d procedural seeds.", len(bank))
        else:
            images, masks, names = real
            bank = DefectBank.from_images(images, masks, names)
            logger.info("D-ADDA: defect bank from real defects: %s regions per type.", bank.counts())
        self._set_type_names(bank, procedural=real is None)
        self.dam = DataAugmentationModule(
            bank,
            paste=DefectPaste(blending=self.blending, foreground=self.defect_foreground),  # type: ignore[arg-type]
        )

    def _set_type_names(self, bank: DefectBank, procedural: bool = False) -> None:
        """Index the bank's types by ``defect_types`` (if given) so every site uses the same indices.

        A procedural bank (no real defects) with ``defect_types`` given holds masks only: it has no region of any
        of those types, and the generator (trained elsewhere, e.g. at federated defect sites) draws each type.
        """
        self._typed_regions = not procedural
        if self.type_names and procedural:
            pass
        elif self.type_names:
            missing = sorted(set(bank.type_names) - set(self.type_names))
            if missing:
                msg = (
                    f"The lent real defects include types {missing} that are not in defect_types={self.type_names}; "
                    "add them to defect_types (every federated site must list the same types in the same order)."
                )
                raise ValueError(msg)
            remap = {index: self.type_names.index(name) for index, name in enumerate(bank.type_names)}
            bank.cutouts = [
                type(cutout)(cutout.patch, cutout.mask, remap[cutout.defect_type]) for cutout in bank.cutouts
            ]
            bank.type_names = list(self.type_names)
        else:
            self.type_names = list(bank.type_names)
        if len(self.type_names) > self.model.max_defect_types:
            msg = (
                f"{len(self.type_names)} defect types ({self.type_names}) exceed max_defect_types="
                f"{self.model.max_defect_types}; raise max_defect_types."
            )
            raise ValueError(msg)
        self.model.type_count.fill_(len(self.type_names))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimiser step of the current phase (generator, then detector)."""
        del args, kwargs
        self.check_batch(batch)
        generator_optimizer, detector_optimizer = self.optimizers()  # type: ignore[misc]
        if self.global_step < self.generator_steps:
            loss = self._generator_loss(batch.image)
            name, optimizer = "generator_loss", generator_optimizer
        else:
            if self.generated_dam is None:
                self.build_generated_pool()
            loss = self._detector_loss(batch.image)
            name, optimizer = "detector_loss", detector_optimizer
            if self.detector_schedule == "cosine":
                progress = min(max(self.global_step - self.generator_steps, 0) / self.detector_steps, 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        if loss is None:
            return None
        self.check_loss(loss)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        optimizer.step()
        self.log(name, loss.detach(), on_step=True, prog_bar=True, logger=self.logger is not None)
        return {"loss": loss.detach()}

    def _generator_loss(self, images: torch.Tensor) -> torch.Tensor | None:
        samples = self._require_dam()(images)
        has = samples.defect_types >= 0
        if not has.any():
            return None
        corners = defect_crop_boxes(samples.masks[has], self.patch_size)
        return self.model.generator.loss(
            crop_at(samples.images[has], corners, self.patch_size),
            crop_at(images[has], corners, self.patch_size),
            crop_at(samples.masks[has], corners, self.patch_size),
            samples.defect_types[has].to(images.device),
        )

    def _detector_loss(self, images: torch.Tensor) -> torch.Tensor:
        size = self.detector_crop
        if size is not None and size < max(images.shape[-2:]):
            size = min(size, *images.shape[-2:])
            corners = torch.stack(
                [
                    torch.randint(images.shape[-2] - size + 1, (images.shape[0],)),
                    torch.randint(images.shape[-1] - size + 1, (images.shape[0],)),
                ],
                dim=1,
            )
            images = crop_at(images, corners, size)
        types = None
        if not self.held_defect_types() and len(self.type_names) >= 2 and self.generated_fraction > 0:  # noqa: PLR2004
            # Masks only (no region of any named type): the generator draws every type, in turn at random.
            types = torch.randint(len(self.type_names), (images.shape[0],))
        inputs, masks = self.defective_batch(images, self.defect_probability, self.generated_fraction, types)
        logits = self.model(inputs)
        return focal_loss(logits, masks[:, 0].long(), alpha=None, gamma=2.0, reduction="mean")

    @torch.no_grad()
    def defective_batch(
        self,
        images: torch.Tensor,
        defect_probability: float,
        generated_fraction: float,
        defect_types: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, masks)``: with ``defect_probability`` a defect per image, generated (``generated_fraction``) or a DAM paste.

        Generated defects are DAM pastes from the generator's pool (:meth:`build_generated_pool`) once it
        exists; before that, or for a type the pool lacks, the generator samples one inside a DAM mask.
        ``defect_types`` (``(B,)``) fixes each sample's type: the DAM pastes (and supplies the mask of) a
        real region of that type where the bank holds one; for types this site holds no real example of
        (the federated generator has learnt them from other sites) the mask comes from any region and
        only the generator draws the type.
        """
        count = images.shape[0]
        wanted = torch.rand(count) < defect_probability
        generate = wanted & (torch.rand(count) < generated_fraction)
        requested = torch.full((count,), -1) if defect_types is None else defect_types.cpu().long()
        pooled = torch.zeros(count, dtype=torch.bool)
        if self.generated_dam is not None:
            in_pool = {cutout.defect_type for cutout in self.generated_dam.bank.cutouts}
            pooled = generate & torch.tensor([int(value) in in_pool or value < 0 for value in requested])
        outputs, masks = images.clone(), torch.zeros_like(images[:, :1])
        direct = wanted & ~pooled
        if direct.any():
            indices = direct.nonzero()[:, 0]
            chosen = self._dam_or_generated(
                images[indices.to(images.device)],
                generate[indices],
                None if defect_types is None else requested[indices],
            )
            outputs[indices.to(images.device)], masks[indices.to(images.device)] = chosen
        if pooled.any():
            indices = pooled.nonzero()[:, 0].to(images.device)
            samples = self.generated_dam(images[indices], requested[pooled])  # type: ignore[misc]
            outputs[indices], masks[indices] = samples.images, samples.masks
        return outputs, masks

    def _dam_or_generated(
        self, images: torch.Tensor, generate: torch.Tensor, defect_types: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A DAM paste on every image; where ``generate``, the generator samples a new defect in its mask instead."""
        outputs, masks, _ = self._paste_then_generate(images, generate, defect_types)
        return outputs, masks

    def _paste_then_generate(
        self, images: torch.Tensor, generate: torch.Tensor, defect_types: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_dam_or_generated`'s ``(images, masks)``, and the DAM pastes that generated defects replaced."""
        dam = self._require_dam()
        if defect_types is None:
            samples = dam(images)
            is_held = torch.ones(images.shape[0], dtype=torch.bool)
        else:
            held = self.held_defect_types()
            is_held = torch.tensor([int(value) in held for value in defect_types], dtype=torch.bool)
            samples = dam(images, torch.where(is_held, defect_types, -1))
        pasted = samples.defect_types >= 0
        types = samples.defect_types if defect_types is None else torch.where(pasted, defect_types, -1)
        outputs = pastes = samples.images
        masks = samples.masks
        generate = (generate & pasted).to(images.device)
        if generate.any():
            outputs = pastes.clone()  # the pastes stay as they were; generated defects replace them in the copy
            corners = defect_crop_boxes(masks[generate], self.patch_size)
            crop_masks = crop_at(masks[generate], corners, self.patch_size)
            # SDEdit from the paste only where it shows the wanted type (a held one); other types from pure noise.
            own_type = is_held.to(images.device)[generate]
            backgrounds = crop_at(images[generate], corners, self.patch_size)
            pasted_crops = crop_at(outputs[generate], corners, self.patch_size)
            crop_types = types.to(images.device)[generate]
            generated = torch.empty_like(backgrounds)
            for subset, strength in ((own_type, self.generation_strength), (~own_type, 1.0)):
                if subset.any():
                    generated[subset] = self.model.generator.generate(
                        backgrounds[subset],
                        crop_masks[subset],
                        crop_types[subset],
                        init=pasted_crops[subset],
                        strength=strength,
                    )
            outputs[generate] = paste_at(images[generate], generated, corners)
            # The generator draws inside its patch_size crop only: a longer mask is cut to the crop, so that no clean
            # pixel outside it is labelled defect.
            masks[generate] = paste_at(torch.zeros_like(masks[generate]), crop_masks, corners)
        return outputs, masks, pastes

    def pool_defect_types(self) -> list[int]:
        """The types the generator makes for the detector: those the DAM holds, or every named one if it holds only masks."""
        held = sorted(self.held_defect_types())
        if held:
            return held
        return list(range(len(self.type_names))) if len(self.type_names) >= 2 else []  # noqa: PLR2004

    @torch.no_grad()
    def build_generated_pool(self) -> None:
        """The generator makes ``generated_pool`` defects of every type once; the detector then draws from them.

        Each is sampled with DDIM inside a DAM mask (of its type where the bank holds one) on a normal
        training image, kept if it changes its crop enough (``generated_min_change``; else the type is
        drawn again, and the most visible draws are kept), and cut out along its mask into a
        :class:`DefectBank`, which a second DAM pastes
        with the same augmentation, mask variation and blending as the real defects. The draws use torch's
        random generator seeded with a seed drawn from the run's random stream when the fit started (kept in
        checkpoints, so a run resumed in the detector phase rebuilds the same pool; outside a fit, drawn now)
        and then restored: training's own random stream is left as it was. (Until 2026-12-06 the seed was a
        checksum of the trained generator's weights, so a last-bit difference in any weight, such as another
        CPU's rounding, drew a different pool.)
        """
        dam = self._require_dam()
        normal_images = self._normal_images
        types = self.pool_defect_types()
        if self.generated_pool == 0 or self.generated_fraction == 0 or not types or normal_images is None:
            return
        with torch.random.fork_rng(devices=[]):
            seed = self._pool_seed if self._pool_seed is not None else int(torch.randint(2**31 - 1, ()))
            torch.manual_seed(seed)
            bank = self._generate_pool_bank(normal_images, types)
        if bank is None:
            logger.warning("D-ADDA: the generator made no usable defect; the detector trains on DAM pastes only.")
            return
        self.generated_dam = DataAugmentationModule(bank, paste=dam.paste)
        logger.info("D-ADDA: the detector draws generated defects from %s regions per type.", bank.counts())

    def _generate_pool_bank(self, normal_images: torch.Tensor, types: list[int]) -> DefectBank | None:
        was_training = self.training
        self.eval()
        images, masks, names = [], [], []
        with tqdm(total=len(types) * self.generated_pool, desc="D-ADDA: generating defects for the detector") as bar:
            for defect_type in types:
                kept_images, kept_masks = self._visible_generated(normal_images, defect_type, bar)
                images.append(kept_images)
                masks.append(kept_masks)
                names += [self.type_names[defect_type]] * len(kept_images)
        self.train(was_training)
        if not names:
            return None
        return DefectBank.from_images(torch.cat(images), torch.cat(masks), names, type_names=self.type_names)

    def _generated_draw(
        self, normal_images: torch.Tensor, defect_type: int, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` generated defects of one type on normal images drawn at random.

        Returns ``(generated, masks, backgrounds, DAM pastes)``, draws whose mask came out empty left out.
        """
        backgrounds = normal_images[torch.randint(len(normal_images), (size,))]
        requested = torch.full((size,), defect_type, dtype=torch.long)
        outputs, masks, pastes = self._paste_then_generate(backgrounds, torch.ones(size, dtype=torch.bool), requested)
        present = masks.flatten(1).any(dim=1)
        return outputs[present], masks[present], backgrounds[present], pastes[present]

    def _visible_generated(
        self, normal_images: torch.Tensor, defect_type: int, bar: tqdm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``generated_pool`` generated defects of one type, those that pass ``generated_min_change`` first.

        Draws batches until that many pass, or three times the pool has been drawn, and keeps the most visible. A
        defect's change is the mean absolute difference from the normal image inside its mask (over channels); the
        bar is the median change of the DAM pastes the generator started from in the same masks, over every draw of
        the type so far.
        """
        per_batch, attempts = 8, 3 * self.generated_pool
        images, masks, generated_change, pasted_change = [], [], [], []
        drawn, passed, count = 0, torch.zeros(0, dtype=torch.bool), 0
        while drawn < attempts and count < self.generated_pool:
            size = min(per_batch, attempts - drawn, self.generated_pool - count)
            outputs, batch_masks, backgrounds, pastes = self._generated_draw(normal_images, defect_type, size)
            images.append(outputs.cpu())
            masks.append(batch_masks.cpu())
            generated_change.append(change_inside(outputs, backgrounds, batch_masks))
            pasted_change.append(change_inside(pastes, backgrounds, batch_masks))
            drawn += size
            reference = torch.cat(pasted_change)  # every draw of the type so far, not this batch's alone
            bar_change = self.generated_min_change * reference.median() if len(reference) else 0.0
            passed = torch.cat(generated_change) >= bar_change
            bar.update(min(int(passed.sum()), self.generated_pool) - count)
            count = min(int(passed.sum()), self.generated_pool)
        bar.update(self.generated_pool - count)
        if count < self.generated_pool:
            logger.warning(
                "D-ADDA: %d of %d generated defects of type %r changed their crop by generated_min_change=%s of the "
                "DAM pastes' median; the pool keeps the %d most visible.",
                count,
                len(passed),
                self.type_names[defect_type],
                self.generated_min_change,
                self.generated_pool,
            )
            keep = torch.cat(generated_change).argsort(descending=True, stable=True)[: self.generated_pool]
        else:
            keep = passed.nonzero()[: self.generated_pool, 0]
        return torch.cat(images)[keep], torch.cat(masks)[keep]

    def held_defect_types(self) -> set[int]:
        """Indices of the defect types the DAM's bank holds regions of (none when only masks were given)."""
        bank = self._require_dam().bank
        if not self._typed_regions and self.type_names != bank.type_names:
            return set()
        return {cutout.defect_type for cutout in bank.cutouts}

    def _require_dam(self) -> DataAugmentationModule:
        if self.dam is None:
            msg = "D-ADDA's defect bank is built when fitting starts; call engine.fit (or on_fit_start) first."
            raise RuntimeError(msg)
        return self.dam

    # -- data lent by the datamodule ---------------------------------------------------------

    @torch.no_grad()
    def _collect_normal_images(self, loader: DataLoader) -> torch.Tensor:
        images = []
        for batch in loader:
            batch_images = batch.image.to(self.device)
            images.append(self.pre_processor(batch_images) if self.pre_processor is not None else batch_images)
            if sum(len(chunk) for chunk in images) >= MAX_NORMAL_IMAGES:
                break
        return torch.cat(images)[:MAX_NORMAL_IMAGES]

    @torch.no_grad()
    def _load_real_defects(self, dataset: Dataset | None) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        """The datamodule's ``defect_data`` (k real defects per type), pre-processed with their masks."""
        if dataset is None or len(dataset) == 0:
            return None
        images, masks, names = [], [], []
        loader = DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0, collate_fn=dataset.collate_fn)
        for batch in loader:
            if batch.gt_mask is None:
                msg = "The lent defective images have no ground-truth masks; D-ADDA cuts defects out along them."
                raise ValueError(msg)
            image, mask = batch.image, tv_tensors.Mask(batch.gt_mask.float())
            if self.pre_processor is not None:
                image, mask = self.pre_processor.transform(tv_tensors.Image(image), mask)
            images.append(image.as_subclass(torch.Tensor))
            masks.append(mask.as_subclass(torch.Tensor).reshape(image.shape[0], 1, *image.shape[-2:]))
            names += [defect_type_of(str(path)) for path in batch.image_path]
        return torch.cat(images), (torch.cat(masks) > 0.5).float(), names  # noqa: PLR2004

    # -- fitting the defect-type head ----------------------------------------------------------

    def on_validation_start(self) -> None:
        """At the end of fitting: fit the defect-type head; the model is then ready to test and export."""
        if self.trainer.state.fn == TrainerFn.FITTING:
            if self.fit_type_head_at_end:
                self.fit_defect_type_head()
            self.model.fitted.fill_(True)

    @torch.no_grad()
    def fit_defect_type_head(self) -> None:
        """A linear classifier (``type_head_classifier``) on the detector's mask-pooled features of each type's defects.

        The defects come from ``type_head_source`` (see the module docstring). The fitted scaler and
        weights are folded into the model's ``type_weight``/``type_bias`` buffers, so the head
        travels in checkpoints and federated rounds. With fewer than two known types there is
        nothing to tell apart and the head stays empty.
        """
        count = len(self.type_names)
        self.model.type_weight.zero_()
        self.model.type_bias.zero_()
        if count < 2 or self._normal_images is None or self.dam is None:  # noqa: PLR2004
            return
        held = self.held_defect_types()
        types = [index for index in range(count) if index in held or self.type_head_source != "dam"]
        features, labels = self._type_head_features(types)
        if len(set(labels.tolist())) < 2:  # noqa: PLR2004
            logger.warning("D-ADDA: too few generated defects to fit the defect-type head; it stays empty.")
            return
        inputs = features.double().numpy()
        scaler = StandardScaler().fit(inputs)
        if self.type_head_classifier == "lda":
            classifier = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
        else:
            classifier = LogisticRegression(max_iter=2000)
        classifier.fit(scaler.transform(inputs), labels.numpy())
        weight = torch.from_numpy(classifier.coef_ / scaler.scale_)
        bias = torch.from_numpy(classifier.intercept_) - weight @ torch.from_numpy(scaler.mean_)
        if len(classifier.classes_) == 2:  # noqa: PLR2004
            # scikit-learn keeps one row for two classes: class 1's logit against class 0's zero.
            weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
        self._set_type_head(torch.as_tensor(classifier.classes_), weight, bias)

    @torch.no_grad()
    def defect_type_statistics(self) -> DefectTypeStatistics:
        """Per defect type this site holds: count, sum and sum of squares of the detector's mask-pooled features.

        The defects are made as for :meth:`fit_defect_type_head` (``type_head_source``), for the
        types of which the DAM holds real regions only. These aggregates are what a federated site
        sends so that the server can fit one head against the *global* detector
        (:func:`pooled_type_head`); no image or single defect's features leave the site.
        Needs the DAM (a fit, or :meth:`prepare_defect_bank`).
        """
        self._require_dam()
        rows, dim = self.model.type_weight.shape
        statistics = DefectTypeStatistics.empty(rows, dim)
        held = sorted(self.held_defect_types())
        if not held:
            return statistics
        features, labels = self._type_head_features(held)
        return statistics.add_features(features, labels)

    def set_type_head_from_statistics(self, statistics: DefectTypeStatistics) -> None:
        """Fit the defect-type head from (summed) :meth:`defect_type_statistics` of one or more sites."""
        rows, weight, bias = pooled_type_head(statistics)
        self.model.type_weight.zero_()
        self.model.type_bias.zero_()
        if len(rows) >= 2:  # noqa: PLR2004
            self._set_type_head(rows, weight, bias)
        else:
            logger.warning("D-ADDA: statistics of fewer than two defect types; the defect-type head stays empty.")

    def _set_type_head(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.model.type_weight[rows] = weight.to(self.model.type_weight)
        self.model.type_bias[rows] = bias.to(self.model.type_bias)
        missing = sorted(set(range(len(self.type_names))) - set(rows.tolist()))
        self.model.type_bias[missing] = -torch.inf

    def _type_head_features(self, types: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (N, D), labels (N,))``: ``type_samples_per_type`` head defects of each of ``types``."""
        normal_images = self._normal_images
        if normal_images is None:
            msg = "D-ADDA's defect bank is built when fitting starts; call engine.fit (or prepare_defect_bank) first."
            raise RuntimeError(msg)
        was_training = self.training
        self.eval()
        features, labels = [], []
        held = self.held_defect_types()
        per_batch = 8
        for defect_type in tqdm(types, desc="D-ADDA: defects for the defect-type head", leave=False):
            pasted = self._head_pasted_count(defect_type in held)
            for start in range(0, self.type_samples_per_type, per_batch):
                size = min(per_batch, self.type_samples_per_type - start)
                picks = torch.randint(len(normal_images), (size,))
                batch_types = torch.full((size,), defect_type, dtype=torch.long)
                images, masks = self._head_batch(normal_images[picks], batch_types, start, pasted)
                present = masks.flatten(1).any(dim=1)
                if present.any():
                    features.append(self.model.detector.mask_features(images[present], masks[present]).cpu())
                    labels += [defect_type] * int(present.sum())
        self.train(was_training)
        dim = self.model.type_weight.shape[1]
        if not features:
            return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
        return torch.cat(features), torch.tensor(labels, dtype=torch.long)

    def _head_pasted_count(self, held: bool) -> int:
        """How many of a type's ``type_samples_per_type`` head samples are DAM pastes (the rest: generated)."""
        if not held or self.type_head_source == "generated":
            return 0
        if self.type_head_source == "dam":
            return self.type_samples_per_type
        return self.type_samples_per_type // 2

    def _head_batch(
        self, images: torch.Tensor, types: torch.Tensor, start: int, pasted: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start + len(images)`` of one type's head set: DAM pastes first, then generated."""
        generate = (torch.arange(start, start + len(images)) >= pasted).to(images.device)
        outputs, masks = images.clone(), torch.zeros_like(images[:, :1])
        if not generate.all():
            outputs[~generate], masks[~generate] = self.defective_batch(images[~generate], 1.0, 0.0, types[~generate])
        if generate.any():
            outputs[generate], masks[generate] = self.defective_batch(images[generate], 1.0, 1.0, types[generate])
        return outputs, masks

    # -- testing: defect-type accuracy on real held-out defects ----------------------------------

    def on_test_epoch_start(self) -> None:
        self._type_hits.zero_()

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        """anomalib's test step, plus the defect type of every real defective test image of a known type.

        Two protocols: the detector's features pooled inside the image's *ground-truth* mask (the paper's: it
        measures the head alone), and inside the region the model itself marks, ``anomaly_map >=`` its pixel
        threshold (what a user gets; an image where it marks nothing counts as wrong).
        """
        output = super().test_step(batch, batch_idx, *args, **kwargs)
        if len(self.type_names) >= 2 and batch.gt_mask is not None and batch.gt_label is not None:  # noqa: PLR2004
            masks = batch.gt_mask.reshape(batch.image.shape[0], 1, *batch.image.shape[-2:]).float()
            known = torch.tensor([defect_type_of(str(path)) in self.type_names for path in batch.image_path])
            scored = known.to(masks.device) & batch.gt_label.bool() & masks.flatten(1).any(dim=1)
            if scored.any():
                paths = [path for path, keep in zip(batch.image_path, scored.tolist(), strict=True) if keep]
                truth = torch.tensor([self.type_names.index(defect_type_of(str(path))) for path in paths])
                hits = [self.correct_defect_types(batch.image[scored], masks[scored], truth), len(truth), 0, 0]
                threshold = getattr(self.post_processor, "pixel_threshold", None)  # raw, as the map is here
                threshold = None if threshold is None else torch.as_tensor(threshold, device=masks.device)
                if threshold is not None and bool(torch.isfinite(threshold)):
                    own = (output.anomaly_map.reshape(masks.shape) >= threshold).float()
                    hits[2:] = [self.correct_defect_types(batch.image[scored], own[scored], truth), len(truth)]
                self._type_hits += torch.tensor(hits)
        return output

    def correct_defect_types(self, images: torch.Tensor, regions: torch.Tensor, truth: torch.Tensor) -> int:
        """How many of the images' defects the type head names right from ``regions``; an empty region is wrong."""
        found = regions.flatten(1).any(dim=1)
        if not found.any():
            return 0
        predicted = self.model.classify_defects(images[found], regions[found]).cpu()
        return int((predicted == truth[found.cpu()]).sum())

    def on_test_epoch_end(self) -> None:
        correct, total, correct_own_region, total_own_region = self._type_hits.tolist()
        if total:
            self.log("defect_type_accuracy", correct / total)
        if total_own_region:  # needs the post-processor's pixel threshold
            self.log("defect_type_accuracy_own_region", correct_own_region / total_own_region)
        super().on_test_epoch_end()

    # -- state -----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TYPE_NAMES_KEY] = list(self.type_names)
        if self._pool_seed is not None:
            checkpoint[POOL_SEED_KEY] = self._pool_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the type names and the pool's seed; a generator saved before ``generator_residual`` existed
        diffused the defective crop, so it keeps doing so (its detector scores the same either way)."""
        super().on_load_checkpoint(checkpoint)
        self.type_names = list(checkpoint.get(TYPE_NAMES_KEY, []))
        self._resumed_pool_seed = checkpoint.get(POOL_SEED_KEY)
        saved = checkpoint.get("hyper_parameters", {})
        if saved and "generator_residual" not in saved and self.model.generator.residual:
            logger.warning(
                "This DADDA checkpoint was saved before generator_residual existed: its generator diffuses the "
                "defective crop, so it keeps generator_residual=False (train again for the current default)."
            )
            self.model.generator.residual = False
            self.hparams["generator_residual"] = False

    def is_fitted(self) -> bool:
        return bool(self.model.fitted)


def _check_dadda_config(
    generator_steps: int,
    detector_steps: int,
    defect_probability: float,
    generated_fraction: float,
    defect_types: Sequence[str] | None,
    max_defect_types: int,
    type_head_source: str = "both",
    generated_pool: int = 0,
    detector_crop: int | None = None,
    generation_strength: float = 1.0,
    patch_size: int = 64,
    generator_target: str = "sample",
    generator_guidance: float = 1.0,
    procedural_stroke_fraction: float = 0.0,
    detector_schedule: str = "constant",
    top_k_fraction: float = 0.001,
    type_head_classifier: str = "lda",
    generated_min_change: float = 0.0,
) -> None:
    problems = _generation_problems(
        generated_pool, detector_crop, generation_strength, patch_size, generator_target, generator_guidance
    )
    closed_shares = (
        ("procedural_stroke_fraction", procedural_stroke_fraction),
        ("generated_fraction", generated_fraction),
        ("generated_min_change", generated_min_change),
    )
    problems += [problem for name, value in closed_shares if (problem := closed_share_problem(name, value))]
    choices = (
        choice_problem("type_head_source", type_head_source, TYPE_HEAD_SOURCES),
        choice_problem("detector_schedule", detector_schedule, DETECTOR_SCHEDULES),
        choice_problem("type_head_classifier", type_head_classifier, TYPE_HEAD_CLASSIFIERS),
    )
    problems += [problem for problem in choices if problem]
    if generator_steps < 0:
        problems.append(f"generator_steps={generator_steps} must be 0 or more")
    if detector_steps < 1:
        problems.append(f"detector_steps={detector_steps} must be at least 1 (the detector is what scores images)")
    for name, share in (("defect_probability", defect_probability), ("top_k_fraction", top_k_fraction)):
        if problem := share_problem(name, share):
            problems.append(problem)
    if generator_steps == 0 and generated_fraction > 0:
        problems.append("generator_steps=0 leaves the generator untrained, so generated_fraction must be 0")
    if generator_steps == 0 and type_head_source != "dam":
        problems.append("generator_steps=0 leaves the generator untrained, so type_head_source must be 'dam'")
    if defect_types is not None and len(set(defect_types)) != len(defect_types):
        problems.append(f"defect_types={list(defect_types)} lists a type twice")
    if defect_types is not None and len(defect_types) > max_defect_types:
        problems.append(f"defect_types has {len(defect_types)} entries, more than max_defect_types={max_defect_types}")
    if problems:
        msg = "Invalid DADDA configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)


def _generation_problems(
    generated_pool: int,
    detector_crop: int | None,
    generation_strength: float,
    patch_size: int,
    generator_target: str,
    generator_guidance: float,
) -> list[str]:
    problems = generator_problems(generator_target, generator_guidance, "generator_target", "generator_guidance")
    if problem := share_problem("generation_strength", generation_strength):
        problems.append(problem)
    if generated_pool < 0:
        problems.append(f"generated_pool={generated_pool} must be 0 or more")
    if detector_crop is not None and not patch_size <= detector_crop:
        problems.append(
            f"detector_crop={detector_crop} must be at least patch_size={patch_size} (or null: whole images)"
        )
    return problems
