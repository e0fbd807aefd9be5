"""Deployment helpers for exported models: OpenVINO inference in the validated precision, with overlays.

``compile_config()`` is the OpenVINO compile set-up that gives the validated (torch) scores on
every CPU: ``OpenVINOInferencer(model_xml, device="CPU", config=compile_config())``.
"""

from importlib import import_module
from typing import Any

__all__ = ["PRECISIONS", "OpenVINODetector", "compile_config", "device_supports"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    # Imported on first use, so `python -m anomalib_diffusion.deploy.openvino_runtime` runs the module only once.
    if name in __all__:
        return getattr(import_module(".openvino_runtime", __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
