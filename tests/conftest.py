"""Shared fixtures: a tiny demo data set and one tiny RADAR trained through anomalib's Engine.

Training even a tiny diffusion U-Net costs seconds on 2 CPU cores, so the trained model is a
session fixture that the end-to-end tests share (they only read it).
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_diffusion.data import make_demo_dataset
from anomalib_diffusion.models import RADAR

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


@dataclass
class TrainedRADAR:
    engine: Engine
    model: RADAR
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


@pytest.fixture(scope="session")
def trained_radar(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRADAR:
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("radar_run")
    datamodule = tiny_datamodule(demo_root)
    model = RADAR(**TINY_RADAR)
    engine = Engine(default_root_dir=work, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = Path(
        engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    )
    return TrainedRADAR(engine=engine, model=model.eval(), datamodule=datamodule, checkpoint=checkpoint, root=work)
