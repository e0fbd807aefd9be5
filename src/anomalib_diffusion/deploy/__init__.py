"""Deployment helpers for exported models: OpenVINO inference in the validated precision, with overlays.

``compile_config()`` is the OpenVINO compile set-up that gives the validated (torch) scores on
every CPU: ``OpenVINOInferencer(model_xml, device="CPU", config=compile_config())``.
"""

from .openvino_runtime import PRECISIONS, OpenVINODetector, compile_config, device_supports

__all__ = ["PRECISIONS", "OpenVINODetector", "compile_config", "device_supports"]
