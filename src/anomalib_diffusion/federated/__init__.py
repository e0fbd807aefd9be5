"""D-ADDA across sites that may not share images: a Flower App (ServerApp + ClientApp), site splits, payload audit.

Run ``anomalib-diffusion-federated --help`` (or ``python -m anomalib_diffusion.federated``); docs/dadda.md shows
the deployments. The Flower parts load on first use: ``pip install "anomalib-diffusion[federated]"`` installs Flower.
"""

from importlib import import_module
from typing import Any

_MODULES = {
    "client_app": "apps",
    "server_app": "apps",
    "DADDAFedAvg": "apps",
    "FederationSettings": "apps",
    "SiteSettings": "apps",
    "payload_audit": "apps",
    "run_federation": "apps",
    "save_global_checkpoint": "apps",
    "make_credentials": "security",
    "Site": "sites",
    "split_into_sites": "sites",
    "audit_reply": "weights",
    "load_state_arrays": "weights",
    "state_arrays": "weights",
    "state_dict_arrays": "weights",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _MODULES:
        return getattr(import_module(f"anomalib_diffusion.federated.{_MODULES[name]}"), name)
    msg = f"module 'anomalib_diffusion.federated' has no attribute {name!r}"
    raise AttributeError(msg)
