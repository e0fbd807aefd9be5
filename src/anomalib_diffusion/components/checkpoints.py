"""Tag checkpoints with the model that wrote them, and refuse to load another model's.

Lightning would otherwise report a checkpoint of a different model as dozens of missing and
unexpected state-dict keys (or, with ``strict=False``, silently load nothing).
"""

from typing import Any

CHECKPOINT_KEY = "anomalib_diffusion"


def _comparable(value: Any) -> Any:  # noqa: ANN401
    return list(value) if isinstance(value, list | tuple) else value


class CheckpointOwnerMixin:
    """Mixin for ``AnomalibModule`` subclasses; list it before ``AnomalibModule``.

    ``FITTED_HPARAMS`` names the constructor arguments that the saved weights (or anything fitted
    on them) depend on. ``load_from_checkpoint`` rebuilds the model from the saved values, but
    ``anomalib test/predict --ckpt_path`` load weights into a model built from the command line,
    so a differing value must be reported before Lightning fails on tensor shapes (or, worse,
    loads weights that no longer fit the settings).
    """

    FITTED_HPARAMS: tuple[str, ...] = ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from anomalib_diffusion import __version__

        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[CHECKPOINT_KEY] = {"model": type(self).__name__, "version": __version__}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = type(self).__name__
        owner = checkpoint.get(CHECKPOINT_KEY, {}).get("model")
        if owner != expected:
            if owner is None:
                prefixes = sorted({key.split(".")[1] for key in checkpoint.get("state_dict", {}) if key.count(".") > 1})
                origin = f"a model outside anomalib-diffusion (its weights are {', '.join(prefixes[:4]) or 'empty'})"
            else:
                origin = f"anomalib-diffusion's {owner}"
            msg = (
                f"This checkpoint is not a {expected} checkpoint: it was saved by {origin}. "
                f"Load it with that model's class, or pass a checkpoint written by {expected}."
            )
            raise ValueError(msg)
        saved = checkpoint.get("hyper_parameters", {})
        current = self.hparams  # type: ignore[attr-defined]
        differing = [
            name
            for name in self.FITTED_HPARAMS
            if name in saved and name in current and _comparable(saved[name]) != _comparable(current[name])
        ]
        if differing:
            trained = ", ".join(f"{name}={_comparable(saved[name])}" for name in differing)
            built = ", ".join(f"{name}={_comparable(current[name])}" for name in differing)
            msg = (
                f"This {expected} checkpoint was trained with {trained}, but this model was built with {built}. "
                f"Build it with the training settings: pass the training run's config.yaml "
                f"(`anomalib test --config <run>/config.yaml --ckpt_path ...`) or use "
                f"{expected}.load_from_checkpoint(path), which restores them."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
