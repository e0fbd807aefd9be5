"""Building blocks shared by the package's models."""

from .blur import SeparableGaussianBlur
from .border import BorderStandardiser, band_moments, border_bands
from .checkpoints import CheckpointOwnerMixin
from .edges import edge_features, global_l2, max_window_l2, sobel_edge_map
from .holdout import HoldoutMixin, calibration_fraction_problem
from .isolation_forest import TensorIsolationForest, average_path_length
from .lightning import (
    FittedModuleMixin,
    check_training_config,
    int8_network_only,
    resize_pre_processor,
    size_pair,
)
from .noising import FixedNoise, FixedNoiseDraws, make_ddpm_scheduler, noise_at_timestep, seeded_noise
from .patches import extract_patches, grid_size, pad_to, random_patches, stitch_patches
from .training_data import collect_training_features, training_images_loader
from .unet import UNetConfig, as_int_tuple, build_unet
from .validation import check_image_batch

__all__ = [
    "BorderStandardiser",
    "CheckpointOwnerMixin",
    "FittedModuleMixin",
    "FixedNoise",
    "FixedNoiseDraws",
    "HoldoutMixin",
    "SeparableGaussianBlur",
    "TensorIsolationForest",
    "UNetConfig",
    "as_int_tuple",
    "average_path_length",
    "band_moments",
    "border_bands",
    "build_unet",
    "calibration_fraction_problem",
    "check_image_batch",
    "check_training_config",
    "collect_training_features",
    "edge_features",
    "extract_patches",
    "global_l2",
    "grid_size",
    "int8_network_only",
    "make_ddpm_scheduler",
    "max_window_l2",
    "noise_at_timestep",
    "pad_to",
    "random_patches",
    "resize_pre_processor",
    "seeded_noise",
    "size_pair",
    "sobel_edge_map",
    "stitch_patches",
    "training_images_loader",
]
