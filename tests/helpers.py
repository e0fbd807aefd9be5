"""What the tests share: demo images, OpenVINO compiled in a stated precision, and checks that can fail.

Every OpenVINO compile in the suite goes through :func:`compile_openvino`, which names the inference
precision and checks that OpenVINO really computes in it: OpenVINO's CPU plugin otherwise picks bf16
on CPUs that have it, and a parity test would then pass on one machine and fail on another.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils import read_image
from sklearn.metrics import roc_auc_score

from anomalib_diffusion.deploy import compile_config, device_supports

HAS_BF16 = device_supports("bf16")
requires_bf16 = pytest.mark.skipif(
    not HAS_BF16,
    reason="this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16): OpenVINO would run f32",
)


def demo_test_images(root: Path, limit: int | None = 6) -> list[Path]:
    """``limit`` test images of the demo brick spread over its folders (all of them with ``limit=None``)."""
    paths = sorted((root / "brick" / "test").rglob("*.png"))
    if limit is None:
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]


def image_tensor(paths: list[Path]) -> torch.Tensor:
    return torch.stack([read_image(path, as_tensor=True) for path in paths])


def labels_of(paths: list[Path]) -> np.ndarray:
    """1 for a defective demo image, 0 for a good one (its folder's name)."""
    return np.array([int(path.parent.name != "good") for path in paths])


def compile_openvino(model_path: Path, precision: str):  # -> ov.CompiledModel (openvino is imported lazily)
    """Compile ``model_path`` for the CPU in ``precision`` and check that OpenVINO computes in it."""
    import openvino as ov

    compiled = ov.Core().compile_model(model_path, "CPU", compile_config(precision))
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert actual == precision, f"OpenVINO compiled {model_path} in {actual}, not in the {precision} the test states"
    return compiled


def openvino_outputs(compiled, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Every named output of a compiled export for ``images``, one image per call, concatenated."""
    results: dict[str, list[np.ndarray]] = {}
    for index in range(images.shape[0]):
        outputs = compiled(images[index : index + 1].numpy())
        for port in compiled.outputs:
            for name in port.names:
                results.setdefault(name, []).append(outputs[port])
    return {name: np.concatenate(values) for name, values in results.items()}


def assert_openvino_matches_torch(model: torch.nn.Module, exported: Path, images: torch.Tensor) -> None:
    """An export (OpenVINO IR or ONNX) compiled in f32 gives torch's pred_score and anomaly_map to 1e-4, per image."""
    compiled = compile_openvino(exported, "f32")
    with torch.no_grad():
        expected = model(images)
    result = openvino_outputs(compiled, images)
    for key in ("pred_score", "anomaly_map"):
        np.testing.assert_allclose(result[key], getattr(expected, key).numpy(), atol=1e-4, err_msg=key)


def openvino_anomaly_maps(model_paths: dict[str, Path], images: torch.Tensor) -> dict[str, np.ndarray]:
    """Each export's ``anomaly_map`` of every image, compiled in f32, keyed as ``model_paths``."""
    return {
        name: openvino_outputs(compile_openvino(path, "f32"), images)["anomaly_map"]
        for name, path in model_paths.items()
    }


def image_auroc(scores: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64).reshape(-1)))


def assert_image_auroc_at_least(scores: np.ndarray | torch.Tensor, labels: np.ndarray, floor: float) -> float:
    """The scores rank defective images above good ones with an image AUROC of at least ``floor`` (> 0.5)."""
    assert floor > 0.5, "a floor at or below chance cannot fail for a random score"
    labels = np.asarray(labels)
    assert set(labels.tolist()) == {0, 1}, "the check needs good and defective images"
    auroc = image_auroc(scores, labels)
    assert auroc >= floor, f"image AUROC {auroc:.3f} is below the floor {floor}"
    return auroc
