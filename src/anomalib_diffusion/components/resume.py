"""Interrupted training resumes from its checkpoint with the same result.

Two parts, used by every model of the package (through :class:`~.lightning.FittedModuleMixin`):

- :class:`ResumeCheckpoint` writes ``<run>/weights/lightning/resume.ckpt`` after the last batch of a
  training epoch (at most once per ``interval`` seconds), atomically, and deletes it when training
  completes. anomalib's own ``model.ckpt`` is only written after the last step (the models validate
  once, at the end), so without it an interrupted run would have nothing to resume from. It saves
  at epoch ends only: Lightning restarts a data loader from the beginning of its epoch when resuming
  from a mid-epoch checkpoint, which changes the order of the images seen; after an epoch's last
  batch is the point it resumes from exactly.
- :func:`rng_states` / :func:`restore_rng_states`: the global random generators (torch, NumPy,
  Python) go into every checkpoint and are restored when training starts from one. The models
  draw their random patches, noise levels and synthetic defects from these generators, and the
  training loader draws its shuffling seed from torch's, so restoring them makes the resumed
  epochs draw what the uninterrupted run drew.

Resume with ``anomalib train ... --ckpt_path <run>/weights/lightning/resume.ckpt`` (or
``Engine.fit(..., ckpt_path=...)``) and the same seed and settings.
"""

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

logger = logging.getLogger(__name__)

RNG_KEY = "anomalib_diffusion_rng"
RESUME_FILE_NAME = "resume.ckpt"


def rng_states() -> dict[str, Any]:
    """The global random generators' states (torch CPU and CUDA, NumPy, Python), as tensors and plain values.

    Plain values only, so that checkpoints still load with ``torch.load(..., weights_only=True)``
    (anomalib restores ``ckpt_path`` that way).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 - the global state is what is resumed
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian))
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random generators to ``states`` (from :func:`rng_states`)."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeCheckpoint(Callback):
    """Save a resumable checkpoint after an epoch's last training batch, at most once per ``interval`` seconds.

    Args:
        interval: Minimum seconds between two saves (0: every epoch).
        dirpath: Folder of the file; default ``<trainer.default_root_dir>/weights/lightning``, next to
            anomalib's ``model.ckpt``.
    """

    def __init__(self, interval: float = 60.0, dirpath: str | Path | None = None) -> None:
        self.interval = float(interval)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._last_save: float | None = None

    @property
    def path(self) -> Path | None:
        return None if self.dirpath is None else self.dirpath / RESUME_FILE_NAME

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        del pl_module
        if stage == "fit" and self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "weights" / "lightning"
        self._last_save = time.monotonic()  # the first save comes one interval after the start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:  # noqa: ANN401
        """After the last batch of an epoch: the point Lightning resumes from without replaying or skipping data."""
        del pl_module, args
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or self.path is None:
            return
        now = time.monotonic()
        if self._last_save is not None and now - self._last_save < self.interval:
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # training is complete: anomalib's model.ckpt follows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.part")
        try:
            # The whole training state (optimiser, loops); saying so keeps Lightning from logging its default each time.
            trainer.save_checkpoint(partial, weights_only=False)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        self._last_save = now
        logger.debug("Resume checkpoint at step %d written to %s.", trainer.global_step, self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training completed: the resume file is superseded by anomalib's ``model.ckpt``."""
        del pl_module
        if self.path is not None and not trainer.interrupted:
            self.path.unlink(missing_ok=True)
