"""The ServerApp of federated D-ADDA (FedAvg, then one defect-type head against the global detector)."""

from anomalib_diffusion.federated.apps import server_app as app

__all__ = ["app"]
