"""Data sets for trying out the models without downloading anything (see :mod:`.demo`).

The names load on first access, so that importing this package stays cheap and
``python -m anomalib_diffusion.data.demo`` does not find its module already imported.
"""

from importlib import import_module
from typing import Any

__all__ = ["DEMO_CATEGORIES", "DEMO_DEFECT_TYPES", "make_demo_dataset"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in __all__:
        return getattr(import_module("anomalib_diffusion.data.demo"), name)
    msg = f"module 'anomalib_diffusion.data' has no attribute {name!r}"
    raise AttributeError(msg)
