"""Federated D-ADDA as a Flower App: see anomalib_diffusion.federated.apps."""
