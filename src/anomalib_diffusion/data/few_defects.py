"""Datamodules that lend a model k real defective images per defect type, and score it on the rest.

D-ADDA trains on the few defects a site has. Taking them from the test split would score the model
on images it trained on, so these datamodules move ``defects_per_type`` defective test images of
every defect type into a ``defect_data`` split (read by the model when it fits) and leave them out
of the test and validation splits. ``defects_per_type=0`` is anomalib's one-class setting: nothing
moves and ``defect_data`` is empty.

The defect type of an image is the name of its folder (``test/<type>/`` in MVTec AD). Other
datamodules get the same split by listing :class:`FewDefectsMixin` first among their bases.

Example:
    >>> datamodule = MVTecADFewDefects(root="datasets/demo", category="brick", defects_per_type=3)  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
    >>> len(datamodule.defect_data)  # 3 per defect type  # doctest: +SKIP
"""

from pathlib import Path

import numpy as np
from anomalib.data import MVTecAD
from anomalib.data.datasets.base import AnomalibDataset


def defect_type_of(image_path: str) -> str:
    """The defect type of a defective image: its folder's name."""
    return Path(image_path).parent.name


def split_real_defects(
    test_data: AnomalibDataset,
    defects_per_type: int,
    seed: int = 0,
) -> tuple[AnomalibDataset, AnomalibDataset]:
    """``(defect_data, remaining_test_data)``: ``defects_per_type`` defective images per type, drawn with ``seed``."""
    if defects_per_type < 0:
        msg = f"defects_per_type={defects_per_type} must be 0 (one-class) or more."
        raise ValueError(msg)
    samples = test_data.samples.reset_index(drop=True)
    defective = samples[samples.label_index == 1]
    if defects_per_type and defective.empty:
        msg = (
            f"defects_per_type={defects_per_type} needs defective images in the test split, but it has none; "
            "use defects_per_type=0 (one-class) or point the datamodule at a data set with defective images."
        )
        raise ValueError(msg)
    if defects_per_type and "mask_path" in defective and (defective.mask_path.fillna("") == "").any():
        msg = (
            "Some defective test images have no ground-truth mask; D-ADDA cuts defects out along their masks. "
            "Give every defective image a mask (MVTec AD layout: ground_truth/<type>/<name>_mask.png) "
            "or use defects_per_type=0."
        )
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for defect_type, group in sorted(defective.groupby(defective.image_path.map(defect_type_of)), key=lambda g: g[0]):
        if defects_per_type and len(group) <= defects_per_type:
            msg = (
                f"Defect type {defect_type!r} has {len(group)} defective test image(s), so taking "
                f"defects_per_type={defects_per_type} for training would leave none to test on; "
                f"lower defects_per_type below {len(group)}."
            )
            raise ValueError(msg)
        order = sorted(group.index, key=lambda index: samples.image_path[index])
        chosen += [int(index) for index in rng.permutation(order)[:defects_per_type]]
    kept = [index for index in range(len(samples)) if index not in set(chosen)]
    test_data.samples = samples
    return test_data.subsample(sorted(chosen)), test_data.subsample(kept)


class FewDefectsMixin:
    """Adds the ``defect_data`` split to an anomalib datamodule (list it first among the bases)."""

    defects_per_type: int
    defect_seed: int

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)  # type: ignore[misc]
        self.defect_data, self.test_data = split_real_defects(
            self.test_data,  # type: ignore[has-type]
            self.defects_per_type,
            self.defect_seed,
        )


class MVTecADFewDefects(FewDefectsMixin, MVTecAD):
    """anomalib's ``MVTecAD`` with ``defects_per_type`` real defective images per type moved to ``defect_data``.

    Args:
        defects_per_type: Real defective images per defect type lent to training (k; 0 = one-class).
        defect_seed: Seed of the draw of those images.
        **kwargs: ``MVTecAD``'s arguments (root, category, batch sizes, ...).
    """

    def __init__(self, defects_per_type: int = 0, defect_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.defects_per_type = defects_per_type
        self.defect_seed = defect_seed
