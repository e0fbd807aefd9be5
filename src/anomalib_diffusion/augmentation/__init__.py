"""Augmentation transforms of the package: synthetic anomalies (GLAD's ATP) and D-ADDA's Data Augmentation Module."""

from .defects import (
    CutoutAugmentation,
    DataAugmentationModule,
    DefectBank,
    DefectCutout,
    DefectPaste,
    DefectSamples,
    MaskVariation,
    QualityFilter,
)
from .synthetic_anomalies import PerlinAnomalySynthesis, otsu_foreground, shuffle_blocks

__all__ = [
    "CutoutAugmentation",
    "DataAugmentationModule",
    "DefectBank",
    "DefectCutout",
    "DefectPaste",
    "DefectSamples",
    "MaskVariation",
    "PerlinAnomalySynthesis",
    "QualityFilter",
    "otsu_foreground",
    "shuffle_blocks",
]
