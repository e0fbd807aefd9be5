"""The ClientApp of federated D-ADDA: one site, training on its own images; every reply audited before it leaves."""

from anomalib_diffusion.federated.apps import client_app as app

__all__ = ["app"]
