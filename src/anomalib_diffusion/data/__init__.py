"""Data sets for trying out the models without downloading anything (see :mod:`.demo`).

The names load on first access, so that importing this package stays cheap and
``python -m anomalib_diffusion.data.demo`` does not find its module already imported.
"""

from importlib import import_module
from typing import Any

_MODULES = {
    "DEMO_CATEGORIES": "demo",
    "DEMO_DEFECT_TYPES": "demo",
    "make_demo_dataset": "demo",
    "texture_categories": "demo",
    "FewDefectsMixin": "few_defects",
    "MVTecADFewDefects": "few_defects",
    "split_real_defects": "few_defects",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _MODULES:
        return getattr(import_module(f"anomalib_diffusion.data.{_MODULES[name]}"), name)
    msg = f"module 'anomalib_diffusion.data' has no attribute {name!r}"
    raise AttributeError(msg)
