"""DADDA end to end through anomalib's Engine: few real defects, one-class, checkpoints and exports."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType

from anomalib_diffusion.models import DADDA
from tests.conftest import (
    REFERENCE_DADDA,
    TINY_DADDA,
    TrainedModel,
    few_defects_datamodule,
    tiny_datamodule,
    train_tiny,
)
from tests.helpers import assert_openvino_matches_torch, demo_test_images, image_tensor

DEMO_TYPES = ["contamination", "hole", "scratch", "stain"]


def test_fit_learns_the_lent_defect_types_and_fits_the_head(trained_dadda: TrainedModel) -> None:
    model = trained_dadda.model
    assert model.is_fitted()
    assert model.global_step == REFERENCE_DADDA["generator_steps"] + REFERENCE_DADDA["detector_steps"]
    assert model.type_names == DEMO_TYPES
    assert int(model.model.type_count) == 4
    assert model.model.type_weight[:4].abs().sum(dim=1).gt(0).all(), "every lent type has a row in the head"
    assert not model.model.type_weight[4:].any()


def test_lent_defects_are_not_scored(trained_dadda: TrainedModel) -> None:
    datamodule = trained_dadda.datamodule
    lent = set(datamodule.defect_data.samples.image_path)
    assert len(lent) == 4
    assert not lent & set(datamodule.test_data.samples.image_path)


def test_test_reports_anomalib_metrics_and_defect_type_accuracy(trained_dadda: TrainedModel) -> None:
    results = trained_dadda.engine.test(model=trained_dadda.model, datamodule=trained_dadda.datamodule)[0]
    assert set(results) >= {"image_AUROC", "pixel_AUROC", "defect_type_accuracy", "defect_type_accuracy_own_region"}
    assert all(0.0 <= value <= 1.0 for value in results.values())
    # 4 held-out real defects, one per type: each accuracy is a multiple of 1/4.
    for name in ("defect_type_accuracy", "defect_type_accuracy_own_region"):
        assert results[name] * 4 == pytest.approx(round(results[name] * 4))


def test_checkpoint_round_trip_restores_detector_head_and_type_names(
    trained_dadda: TrainedModel, demo_root: Path
) -> None:
    restored = DADDA.load_from_checkpoint(trained_dadda.checkpoint).eval()
    assert restored.is_fitted()
    assert restored.type_names == DEMO_TYPES
    torch.testing.assert_close(restored.model.type_weight, trained_dadda.model.model.type_weight, rtol=0, atol=0)
    images = image_tensor(demo_test_images(demo_root, limit=3))
    with torch.no_grad():
        expected, actual = trained_dadda.model(images), restored(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)


def test_one_class_data_seeds_the_bank_with_procedural_defects(demo_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = train_tiny(DADDA(**TINY_DADDA), demo_root, tmp_path, tiny_datamodule(demo_root))
    assert trained.model.is_fitted()
    assert trained.model.type_names == ["procedural"]
    results = trained.engine.test(model=trained.model, datamodule=trained.datamodule)[0]
    assert "image_AUROC" in results
    assert "defect_type_accuracy" not in results, "one type: nothing to classify"


def test_defect_types_missing_a_lent_type_are_refused(demo_root: Path, tmp_path: Path) -> None:
    model = DADDA(**(TINY_DADDA | {"defect_types": ["hole", "scratch"]}))
    with pytest.raises(ValueError, match=r"types \['contamination', 'stain'\] that are not in defect_types"):
        train_tiny(model, demo_root, tmp_path, few_defects_datamodule(demo_root))


def test_openvino_matches_torch_on_real_images(
    trained_dadda: TrainedModel, demo_root: Path, dadda_openvino: Path
) -> None:
    assert_openvino_matches_torch(trained_dadda.model, dadda_openvino, image_tensor(demo_test_images(demo_root)))


def test_the_export_holds_the_detector_only(trained_dadda: TrainedModel, dadda_openvino: Path) -> None:
    import openvino as ov

    weights = sum(
        int(np.prod(op.get_output_shape(0)))
        for op in ov.Core().read_model(dadda_openvino).get_ops()
        if op.get_type_name() == "Constant"
    )
    detector = sum(p.numel() for p in trained_dadda.model.model.detector.parameters())
    generator = sum(p.numel() for p in trained_dadda.model.model.generator.parameters())
    # OpenVINO folds the batch norms into the convolutions, so the graph holds slightly fewer values.
    assert 0.95 * detector <= weights < detector + generator // 2


def test_onnx_export_matches_torch(trained_dadda: TrainedModel, demo_root: Path, tmp_path: Path) -> None:
    onnx_path = trained_dadda.engine.export(
        model=trained_dadda.model, export_type=ExportType.ONNX, export_root=tmp_path
    )
    assert_openvino_matches_torch(trained_dadda.model, onnx_path, image_tensor(demo_test_images(demo_root)[:1]))
