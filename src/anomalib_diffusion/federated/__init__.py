"""D-ADDA across sites that may not share images: Flower clients and server, site data splits, weight payloads.

Run ``anomalib-diffusion-federated --help`` (or ``python -m anomalib_diffusion.federated``).
The Flower parts load on first use: ``pip install "anomalib-diffusion[federated]"`` installs Flower.
"""

from importlib import import_module
from typing import Any

_MODULES = {
    "DADDASite": "flower",
    "DADDAFedAvg": "flower",
    "run_server": "flower",
    "run_site": "flower",
    "save_global_checkpoint": "flower",
    "Site": "sites",
    "split_into_sites": "sites",
    "audit_payload": "weights",
    "load_state_arrays": "weights",
    "state_arrays": "weights",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _MODULES:
        return getattr(import_module(f"anomalib_diffusion.federated.{_MODULES[name]}"), name)
    msg = f"module 'anomalib_diffusion.federated' has no attribute {name!r}"
    raise AttributeError(msg)
