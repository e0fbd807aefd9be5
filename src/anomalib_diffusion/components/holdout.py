"""Normal training images held out of network training, for fitting what sits on top of the network.

GLAD calibrates its adaptive steps and RADAR fits its image-score head on images its U-Net never
trained on: on the training images themselves, a network's residuals are smaller than on any new
normal image, so every threshold or normalisation set there would call new normal images anomalous.
"""

import logging

import numpy as np
import torch
from anomalib.data import Batch

logger = logging.getLogger(__name__)

MAX_CALIBRATION_FRACTION = 0.5


def calibration_fraction_problem(fraction: float) -> str | None:
    """What is wrong with a ``calibration_fraction`` setting, or ``None``."""
    if 0 <= fraction <= MAX_CALIBRATION_FRACTION:
        return None
    return f"calibration_fraction={fraction} must be in [0, {MAX_CALIBRATION_FRACTION}]"


class HoldoutMixin:
    """Draws ``calibration_fraction`` of the training split at fit start and keeps it out of every training batch.

    The draw depends only on the training split and ``holdout_seed``, so a resumed run holds out the same images.
    Host classes set ``calibration_fraction``, ``holdout_seed`` and ``FITTED_PART`` (what is fitted on them).
    """

    calibration_fraction: float
    holdout_seed: int
    FITTED_PART: str
    # Nothing held out until draw_holdout runs; both are replaced, never mutated.
    _holdout_indices: list[int] | None = None
    _holdout_paths: frozenset[str] = frozenset()

    def draw_holdout(self) -> None:
        """Choose the held-out images (call in ``on_fit_start``); none where the datamodule cannot say which."""
        dataset = getattr(getattr(self.trainer, "datamodule", None), "train_data", None)
        samples = getattr(dataset, "samples", None)
        if self.calibration_fraction == 0 or samples is None or len(samples) < 2:  # noqa: PLR2004
            if self.calibration_fraction > 0:
                logger.warning(
                    "%s: no held-out images (needs a datamodule with at least 2 training images); %s is fitted on "
                    "the training images themselves, which makes new normal images look more anomalous than they are.",
                    type(self).__name__,
                    self.FITTED_PART,
                )
            self._holdout_indices, self._holdout_paths = None, frozenset()
            return
        count = max(1, round(self.calibration_fraction * len(samples)))
        chosen = np.random.default_rng(self.holdout_seed).choice(len(samples), size=count, replace=False)
        self._holdout_indices = sorted(int(index) for index in chosen)
        self._holdout_paths = frozenset(str(samples.iloc[index]["image_path"]) for index in self._holdout_indices)

    def training_images(self, batch: Batch) -> torch.Tensor | None:
        """The batch's images that are not held out; ``None`` when all of them are."""
        images = batch.image
        if not self._holdout_paths:
            return images
        keep = torch.tensor([str(path) not in self._holdout_paths for path in batch.image_path])
        if not keep.any():
            return None
        return images[keep.to(images.device)]
