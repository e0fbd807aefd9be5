"""Shared fixtures: a tiny demo data set and one tiny RADAR, GLAD and DADDA trained through anomalib's Engine.

Training even a tiny diffusion U-Net costs seconds on 2 CPU cores, so the trained models are
session fixtures that the end-to-end tests share (they only read them).
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_diffusion.data import MVTecADFewDefects, make_demo_dataset
from anomalib_diffusion.models import DADDA, GLAD, RADAR

# Small enough for CI, big enough to exercise patch stitching (3x3 patches per image).
TINY_RADAR = {
    "image_size": 64,
    "patch_size": 32,
    "stride": 16,
    "window_size": 16,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "max_steps": 6,
    "patches_per_step": 8,
    "n_estimators": 25,
}


# DDIM every 200 steps from 600: timesteps [600, 400, 200, 0], search steps [400] (the search starts after the start step).
TINY_GLAD = {
    "image_size": 64,
    "patch_size": 32,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "num_inference_steps": 5,
    "start_timestep": 600,
    "min_timestep": 300,
    "max_steps": 6,
    "patches_per_step": 4,
    "calibration_fraction": 0.25,
}


# Generator crops of 32 on 64x64 images, 3 DDIM steps; 4 generator then 4 detector steps.
TINY_DADDA = {
    "image_size": 64,
    "patch_size": 32,
    "block_out_channels": (8, 16),
    "attention_resolutions": (16,),
    "generation_steps": 3,
    "detector_width": 8,
    "max_defect_types": 6,
    "procedural_seeds": 8,
    "generator_steps": 4,
    "detector_steps": 4,
    "type_samples_per_type": 4,
}


@dataclass
class TrainedModel:
    engine: Engine
    model: RADAR | GLAD | DADDA
    datamodule: MVTecAD
    checkpoint: Path
    root: Path


def tiny_datamodule(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(
        root,
        categories=("brick",),
        n_train=8,
        n_test_good=4,
        n_test_per_defect=2,
        image_size=64,
        seed=0,
        progress=False,
    )
    return root


def few_defects_datamodule(root: Path, defects_per_type: int = 1) -> MVTecADFewDefects:
    return MVTecADFewDefects(
        root=root,
        category="brick",
        defects_per_type=defects_per_type,
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )


def train_tiny(
    model: RADAR | GLAD | DADDA, demo_root: Path, work: Path, datamodule: MVTecAD | None = None
) -> TrainedModel:
    datamodule = datamodule or tiny_datamodule(demo_root)
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    return TrainedModel(engine=engine, model=model.eval(), datamodule=datamodule, checkpoint=checkpoint, root=work)


@pytest.fixture(scope="session")
def trained_radar(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    torch.manual_seed(0)
    return train_tiny(RADAR(**TINY_RADAR), demo_root, tmp_path_factory.mktemp("radar_run"))


@pytest.fixture(scope="session")
def trained_glad(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    torch.manual_seed(0)
    return train_tiny(GLAD(**TINY_GLAD), demo_root, tmp_path_factory.mktemp("glad_run"))


@pytest.fixture(scope="session")
def trained_dadda(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """DADDA with one real defect of each of the four demo types lent from the test split."""
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("dadda_run")
    return train_tiny(DADDA(**TINY_DADDA), demo_root, work, few_defects_datamodule(demo_root))
