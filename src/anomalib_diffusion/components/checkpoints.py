"""Tag checkpoints with the model that wrote them, and refuse to load another model's.

Lightning would otherwise report a checkpoint of a different model as dozens of missing and
unexpected state-dict keys (or, with ``strict=False``, silently load nothing).
"""

from typing import Any

CHECKPOINT_KEY = "anomalib_diffusion"


class CheckpointOwnerMixin:
    """Mixin for ``AnomalibModule`` subclasses; list it before ``AnomalibModule``."""

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
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
