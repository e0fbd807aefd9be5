"""``python -m anomalib_diffusion.federated``: the same as ``anomalib-diffusion-federated``."""

from .cli import main

raise SystemExit(main())
