"""Augmentation transforms of the package: synthetic anomalies for training (GLAD's ATP, D-ADDA)."""

from .synthetic_anomalies import PerlinAnomalySynthesis, otsu_foreground, shuffle_blocks

__all__ = ["PerlinAnomalySynthesis", "otsu_foreground", "shuffle_blocks"]
