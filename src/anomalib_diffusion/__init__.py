"""anomalib-diffusion: diffusion-based anomaly detection models for anomalib.

Importing this package is cheap on purpose: a ``.pth`` line installed with it imports
:mod:`anomalib_diffusion._import_hook` in every Python process, so nothing here may pull in
torch or anomalib. The model classes load on first attribute access.

Example:
    >>> from anomalib_diffusion import RADAR  # doctest: +SKIP
    >>> model = RADAR()  # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_MODELS = ("RADAR", "GLAD", "DADDA")
# anomalib's own PaDiM, PatchCore and DRAEM set up to run offline (anomalib_diffusion.models.peers).
_PEERS = ("PadimLite0", "PatchcoreLite0", "DraemOffline")

__all__ = ["DADDA", "GLAD", "RADAR", "__version__"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _MODELS:
        return getattr(import_module("anomalib_diffusion.models"), name)
    msg = f"module 'anomalib_diffusion' has no attribute {name!r}"
    raise AttributeError(msg)
