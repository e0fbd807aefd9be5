"""A training run interrupted mid-way resumes from its checkpoint and ends with the same model."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from anomalib.engine import Engine
from lightning import seed_everything

from anomalib_diffusion.components.resume import RESUME_FILE_NAME
from anomalib_diffusion.models import DADDA, GLAD, RADAR
from tests.conftest import (
    REFERENCE_DADDA,
    REFERENCE_GLAD,
    REFERENCE_RADAR,
    TrainedModel,
    few_defects_datamodule,
    tiny_datamodule,
    tiny_engine,
)

# The settings of the suite's shared trained models (tests/conftest.py), which are the uninterrupted runs here.
# 8 training images in batches of 4: two optimiser steps per epoch.
TINY = {
    "RADAR": (RADAR, REFERENCE_RADAR),
    "GLAD": (GLAD, REFERENCE_GLAD),
    "DADDA": (DADDA, REFERENCE_DADDA),
}


class SimulatedCrashError(RuntimeError):
    pass


class CrashAtStep(pl.Callback):
    """Fail like a killed process would, at the start of the given optimiser step (mid-epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        del args
        if trainer.global_step >= self.step:
            raise SimulatedCrashError(f"simulated crash at step {trainer.global_step}")


def build(name: str) -> RADAR | GLAD | DADDA:
    seed_everything(0)
    model_class, settings = TINY[name]
    model = model_class(**settings)
    model.resume_checkpoint_interval = 0.0  # a resume checkpoint at every epoch end
    return model


def datamodule(name: str, root: Path) -> object:
    return few_defects_datamodule(root) if name == "DADDA" else tiny_datamodule(root)


def fit(name: str, root: Path, work: Path, callbacks: list | None = None, ckpt_path: Path | None = None) -> Engine:
    model = build(name)
    engine = tiny_engine(work, callbacks)
    engine.fit(model=model, datamodule=datamodule(name, root), ckpt_path=ckpt_path)
    return engine


def state(engine: Engine) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in engine.model.state_dict().items()}


@pytest.mark.parametrize("name", list(TINY))
def test_interrupted_training_resumes_to_the_same_model(
    name: str, demo_root: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Against the suite's shared uninterrupted run (conftest's ``train_reference``: the same seed and settings)."""
    reference: TrainedModel = request.getfixturevalue(f"trained_{name.lower()}")
    steps = reference.engine.trainer.global_step
    model_class, settings = TINY[name]
    assert steps == model_class(**settings).max_steps
    assert not list(reference.root.rglob(RESUME_FILE_NAME)), "a completed run keeps no resume file"

    crash_step = steps // 2 | 1  # odd, so mid-epoch: the last epoch-end checkpoint is one step earlier
    with pytest.raises(SimulatedCrashError):
        fit(name, demo_root, tmp_path / "crashed", callbacks=[CrashAtStep(crash_step)])
    resume_files = list((tmp_path / "crashed").rglob(RESUME_FILE_NAME))
    assert len(resume_files) == 1
    assert not list((tmp_path / "crashed").rglob("*.part")), "no half-written checkpoint is left"
    saved_step = torch.load(resume_files[0], map_location="cpu", weights_only=False)["global_step"]
    assert 0 < saved_step < crash_step

    resumed = fit(name, demo_root, tmp_path / "resumed", ckpt_path=resume_files[0])
    assert resumed.trainer.global_step == steps
    expected, actual = reference.state, state(resumed)
    assert expected.keys() == actual.keys()
    differing = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differing, f"{name}: {len(differing)} tensors differ, first {differing[:8]}"
    original = copy.deepcopy(reference.model)
    original.load_state_dict(reference.state)
    data = datamodule(name, demo_root)
    data.setup()
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        first = original.eval()(batch.image)
        second = resumed.model.eval()(batch.image)
    torch.testing.assert_close(second.anomaly_map, first.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(second.pred_score, first.pred_score, rtol=0, atol=0)
