"""What the package's anomalib modules share: a step budget, input checks and fitted-state guards.

Each model fits something after training its network (RADAR an Isolation Forest, GLAD its
thresholds) and is unusable without it, so testing, predicting and exporting an unfitted model
must fail with one clear sentence *before* anything is written to disk. List
:class:`FittedModuleMixin` before ``AnomalibModule`` (which must stay a direct base: anomalib's
``get_model`` only looks at direct subclasses).
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch, InferenceBatch
from anomalib.data.utils import ValSplitMode
from anomalib.deploy import CompressionType
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Resize

from .resume import RNG_KEY, ResumeCheckpoint, restore_rng_states, rng_states
from .validation import check_image_batch

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)


class FittedModuleMixin:
    """Shared behaviour of the package's ``AnomalibModule`` subclasses.

    A subclass sets ``max_steps`` and ``min_image_size`` attributes, implements ``is_fitted()``
    and describes what fitting produces in ``FITTED_PART`` (e.g. "its Isolation Forest"). A model
    that cannot be exported with some OpenVINO compression types names them in
    ``REFUSED_COMPRESSION``, with the reason and the alternative in ``REFUSED_COMPRESSION_REASON``.
    """

    FITTED_PART = "its fitted state"
    # Seconds between two resume checkpoints (written at epoch ends; see components/resume.py).
    resume_checkpoint_interval: float = 60.0
    REFUSED_COMPRESSION: frozenset[CompressionType] = frozenset()
    REFUSED_COMPRESSION_REASON = ""
    max_steps: int
    min_image_size: int

    def is_fitted(self) -> bool:
        raise NotImplementedError

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """Pre-process, score and post-process raw images (what exported models compute)."""
        if not torch.compiler.is_exporting():
            check_image_batch(batch, self.name, min_size=1)
        return super().forward(batch, *args, **kwargs)  # type: ignore[misc]

    def check_batch(self, batch: Batch) -> None:
        check_image_batch(batch.image, self.name, self.min_image_size)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        self.check_batch(batch)
        return batch.update(**self.model(batch.image)._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        self.check_batch(batch)
        return super().test_step(batch, batch_idx, *args, **kwargs)  # type: ignore[misc]

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        self.check_batch(batch)
        return super().predict_step(batch, batch_idx, dataloader_idx)  # type: ignore[misc]

    def on_test_start(self) -> None:
        self.require_fitted("test")

    # -- resuming an interrupted training run (components/resume.py) ----------------------------

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, ResumeCheckpoint(interval=self.resume_checkpoint_interval)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._resumed_rng_states = checkpoint.get(RNG_KEY)

    def on_fit_start(self) -> None:
        """When resuming, continue the random draws where the checkpoint left them.

        Models that override ``on_fit_start`` call this last, after their own set-up (which repeats
        what the first run did at its start). It runs before Lightning creates the training loader's
        iterator, which draws its shuffling seed from torch's generator.
        """
        super().on_fit_start()  # type: ignore[misc]
        warn_if_validating_on_test_labels(getattr(self.trainer, "datamodule", None), self.name)  # type: ignore[attr-defined]
        states = getattr(self, "_resumed_rng_states", None)
        if states is not None and self.trainer.ckpt_path is not None:  # type: ignore[attr-defined]
            restore_rng_states(states)
        self._resumed_rng_states = None

    def on_predict_start(self) -> None:
        self.require_fitted("predict")

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

    def check_loss(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite loss, naming the step and what to change."""
        if not torch.isfinite(loss):
            msg = (
                f"{self.name} training loss became {loss.item()} at step {self.global_step} "  # type: ignore[attr-defined]
                f"(epoch {self.current_epoch}); lower learning_rate (now {self.learning_rate}) "  # type: ignore[attr-defined]
                "or check the training images for invalid values."
            )
            raise FloatingPointError(msg)

    def require_fitted(self, action: str) -> None:
        if not self.is_fitted():
            msg = (
                f"{self.name} cannot {action} before it is fitted: {self.FITTED_PART} is missing. "
                f"Train it first (`anomalib train --model {self.name} ...` or `engine.fit`) or load a trained "
                f"checkpoint (`--ckpt_path` / `{self.name}.load_from_checkpoint`)."
            )
            raise RuntimeError(msg)

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
        self.require_fitted("export")
        if compression_type in self.REFUSED_COMPRESSION:
            msg = f"{self.name} cannot be exported with compression_type={compression_type.name}: "
            raise ValueError(msg + self.REFUSED_COMPRESSION_REASON)
        if compression_type in {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ} and datamodule is None:
            msg = (
                f"{compression_type.name} needs a datamodule: {self.name} calibrates on its normal training images "
                "(pass --data ... to `anomalib export`, or datamodule= to Engine.export)."
            )
            raise ValueError(msg)
        path = super().to_openvino(  # type: ignore[misc]
            export_root, model_file_name, input_size, compression_type, datamodule, **kwargs
        )
        logger.info(precision_advice(path))
        return path

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        self.require_fitted("export")
        return super().to_torch(export_root, model_file_name)  # type: ignore[misc]

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> Path:
        self.require_fitted("export")
        # The dynamo exporter emits opset 18; asking for anomalib's default 14 only triggers a
        # failing down-conversion (Pad has no 18->17 adapter) that is then ignored.
        kwargs.setdefault("opset_version", 18)
        # onnxscript's graph optimiser spends two thirds of the export on pattern matching over the
        # unrolled U-Net calls (GLAD: 64 s -> 33 s without it) and buys nothing downstream: OpenVINO and
        # ONNX Runtime fold and fuse the graph themselves (OpenVINO latency and outputs measured equal).
        kwargs.setdefault("optimize", False)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]


def warn_if_validating_on_test_labels(datamodule: object, model_name: str) -> None:
    """Say so when thresholds and score normalisation will be fitted on the test split's labels.

    anomalib's ``MVTecAD`` and ``Folder`` validate on the test split unless told otherwise
    (``val_split_mode`` ``same_as_test`` / ``from_test``): the F1 that ``anomalib test`` then reports
    was tuned on the very labels it is measured on.
    """
    mode = getattr(datamodule, "val_split_mode", None)
    if mode in {ValSplitMode.SAME_AS_TEST, ValSplitMode.FROM_TEST}:
        logger.warning(
            "%s: the validation split is taken from the test split (val_split_mode=%s), so its thresholds and "
            "score normalisation are fitted on test labels. Pass --data.val_split_mode synthetic (anomalies "
            "synthesised on normal training images, as configs/*.yaml do) or from_train.",
            model_name,
            ValSplitMode(mode).value,
        )


def precision_advice(model_xml: Path) -> str:
    """What ``anomalib export`` says after an OpenVINO export: how to run it in the validated precision."""
    from anomalib_diffusion.deploy.openvino_runtime import compile_config  # here: it imports openvino

    return (
        f"Exported {model_xml}. On CPUs with bf16 (Intel Xeon from Sapphire Rapids on, AMD Zen 4) OpenVINO computes "
        "in bf16 unless told otherwise, and the scores then differ from the validated model's. Run it in f32: "
        f'OpenVINOInferencer("{model_xml}", device="CPU", config={compile_config()}) '
        "(anomalib-diffusion-predict and anomalib-diffusion-openvino do so by default; --precision bf16 opts in)."
    )


def int8_network_only(model: "ov.Model", datamodule: AnomalibDataModule, head_start_type: str) -> "ov.Model":
    """NNCF PTQ of the network part of an exported graph, calibrated on normal training images."""
    from .quantization import quantize_network  # imports openvino

    datamodule.setup("fit")
    images = (item.image[None].numpy() for item in datamodule.train_data)
    return quantize_network(model, images, head_start_type)


def size_pair(size: Sequence[int] | int) -> tuple[int, int]:
    """``image_size`` from a config (one int or ``[height, width]``) as a pair."""
    if isinstance(size, int):
        return (size, size)
    pair = tuple(int(value) for value in size)
    if len(pair) != 2:  # noqa: PLR2004
        msg = f"image_size must be one integer or [height, width], got {list(size)}."
        raise ValueError(msg)
    return pair


def resize_pre_processor(image_size: Sequence[int] | int) -> PreProcessor:
    """Resize only: the U-Nets are trained from scratch on ``[0, 1]`` RGB (mapped to ``[-1, 1]``).

    anomalib's default would also apply ImageNet normalisation, which only suits ImageNet
    backbones; the resize keeps exported graphs at a fixed size.
    """
    return PreProcessor(transform=Resize(size_pair(image_size), antialias=True))


def check_training_config(
    model_name: str,
    image_size: tuple[int, int],
    crop_size: int,
    max_steps: int,
    crops_per_step: int,
) -> None:
    """Reject training settings that would otherwise fail deep inside torch (the networks check their own)."""
    problems = []
    if min(image_size) < crop_size:
        problems.append(
            f"image_size {list(image_size)} is smaller than patch_size={crop_size}; raise image_size or lower patch_size",
        )
    if max_steps < 1:
        problems.append(f"max_steps={max_steps} must be at least 1")
    if crops_per_step < 1:
        problems.append(f"patches_per_step={crops_per_step} must be at least 1")
    if problems:
        msg = f"Invalid {model_name} configuration: " + "; ".join(problems) + "."
        raise ValueError(msg)
