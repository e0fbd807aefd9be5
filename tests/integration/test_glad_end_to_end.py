"""GLAD end to end through anomalib's Engine, checkpoints, calibration and exports."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType, OpenVINOInferencer

from anomalib_diffusion.components.border import border_bands
from anomalib_diffusion.deploy import compile_config
from anomalib_diffusion.models import GLAD
from tests.conftest import REFERENCE_GLAD, TrainedModel, tiny_datamodule
from tests.helpers import (
    assert_openvino_matches_torch,
    compile_openvino,
    demo_test_images,
    image_tensor,
    openvino_anomaly_maps,
    openvino_outputs,
)


def test_fit_calibrates_on_held_out_training_images(trained_glad: TrainedModel) -> None:
    model = trained_glad.model
    assert model.is_fitted()
    assert model.global_step == REFERENCE_GLAD["max_steps"]
    assert torch.isfinite(model.model.tau).all()
    assert (model.model.ramp_high > model.model.ramp_low).all()
    train_paths = {str(path) for path in trained_glad.datamodule.train_data.samples["image_path"]}
    assert model._holdout_paths
    assert model._holdout_paths < train_paths  # 2 of the 8 normal training images, never a test image
    assert len(model._holdout_paths) == round(REFERENCE_GLAD["calibration_fraction"] * len(train_paths))


def test_the_map_standardisation_is_fitted_on_the_held_out_images(trained_glad: TrainedModel) -> None:
    """Over the held-out images, each standardised distance (the own encoder's, the ImageNet Lite0's) has mean 0 and
    spread 1 in every border band, and the map is their mean."""
    model = trained_glad.model.eval()
    network = model.model
    assert network.extra_feature_names == ("efficientnet_lite0",)  # the default
    images = model.pre_processor(image_tensor(sorted(Path(path) for path in model._holdout_paths)))
    with torch.no_grad():
        standardised = network.map_statistics(network.smoothed_distance(images))
        anomaly_map = network(images).anomaly_map
    assert standardised.shape[1] == 2
    torch.testing.assert_close(anomaly_map, standardised.mean(dim=1, keepdim=True))
    assert not torch.equal(network.map_statistics.std, torch.ones_like(network.map_statistics.std))
    band = border_bands(*anomaly_map.shape[-2:], network.map_statistics.bands)
    for channel in range(2):
        for index in range(network.map_statistics.bands):
            values = standardised[:, channel][:, band == index].double()
            assert abs(values.mean()) < 1e-3, (channel, index)
            assert abs(values.var(unbiased=False) - 1) < 1e-2, (channel, index)


def test_inference_uses_the_ema_weights(trained_glad: TrainedModel, demo_root: Path) -> None:
    """Changing the optimised weights leaves the output alone; changing the EMA copy changes it."""
    model = copy.deepcopy(trained_glad.model).eval()
    network = model.model
    trained = dict(network.unet.named_parameters())
    differing = [name for name, value in network.ema_unet.named_parameters() if not torch.equal(value, trained[name])]
    assert differing, "after training the EMA copy must differ from the optimised weights"
    images = image_tensor(demo_test_images(demo_root, limit=2))
    with torch.no_grad():
        reference = network(images)
        for parameter in network.unet.parameters():
            parameter.add_(0.5)
        unchanged = network(images)
        for parameter in network.ema_unet.parameters():
            parameter.add_(0.5)
        changed = network(images)
    torch.testing.assert_close(unchanged.anomaly_map, reference.anomaly_map, rtol=0, atol=0)
    assert (changed.anomaly_map - reference.anomaly_map).abs().amax() > 1e-3


def test_test_reports_metrics(trained_glad: TrainedModel) -> None:
    results = trained_glad.engine.test(model=trained_glad.model, datamodule=trained_glad.datamodule)
    assert set(results[0]) >= {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}
    assert all(0.0 <= value <= 1.0 for value in results[0].values())


def test_checkpoint_round_trip_restores_weights_and_calibration(trained_glad: TrainedModel, demo_root: Path) -> None:
    restored = GLAD.load_from_checkpoint(trained_glad.checkpoint).eval()
    assert restored.is_fitted()
    torch.testing.assert_close(restored.model.tau, trained_glad.model.model.tau, rtol=0, atol=0)
    images = image_tensor(demo_test_images(demo_root, limit=3))
    with torch.no_grad():
        expected, actual = trained_glad.model(images), restored(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)


def test_a_radar_checkpoint_is_refused_by_name(trained_radar: TrainedModel) -> None:
    with pytest.raises(ValueError, match="not a GLAD checkpoint: it was saved by anomalib-diffusion's RADAR"):
        GLAD.load_from_checkpoint(trained_radar.checkpoint)


def test_a_checkpoint_with_other_adaptive_settings_names_them(trained_glad: TrainedModel, demo_root: Path) -> None:
    with pytest.raises(ValueError, match=r"min_timestep=300.*min_timestep=200"):
        trained_glad.engine.test(
            model=GLAD(**(REFERENCE_GLAD | {"min_timestep": 200})),
            datamodule=tiny_datamodule(demo_root),
            ckpt_path=trained_glad.checkpoint,
        )


def test_openvino_matches_torch_on_real_images(
    trained_glad: TrainedModel, demo_root: Path, glad_openvino: Path
) -> None:
    assert_openvino_matches_torch(trained_glad.model, glad_openvino, image_tensor(demo_test_images(demo_root)))


def test_per_sample_step_decisions_survive_export(
    trained_glad: TrainedModel, demo_root: Path, glad_openvino: Path, tmp_path: Path
) -> None:
    """With tau between the images' discrepancies, some cross and some do not, in torch and in OpenVINO (f32) alike.

    The shared model's calibrated tau already splits the demo images (measured: 3 of 6 cross, the nearest 0.004 from
    tau), so its export is checked as it is. Where training came out otherwise (another CPU's rounding), tau is set
    halfway between the two middle discrepancies and that model is exported instead (about 40 s more).
    """
    model = trained_glad.model
    images = image_tensor(demo_test_images(demo_root))
    model_xml = glad_openvino
    with torch.no_grad():
        first = model.model.reconstruct(model.model.pad(images * 2 - 1)).discrepancies[:, 0]
        tau = model.model.tau[0]
        splits = bool((first > tau).any() and (first < tau).any() and (first - tau).abs().min() > 1e-3)
        if not splits:
            model = copy.deepcopy(model).eval()
            ordered = first.sort().values
            middle = len(ordered) // 2
            assert ordered[middle - 1] < ordered[middle], "the test needs two distinct middle discrepancies"
            # Halfway between the two middle discrepancies: no image sits on tau, where rounding would decide.
            model.model.tau[0] = (ordered[middle - 1] + ordered[middle]) / 2
            model_xml = model.to_openvino(tmp_path)
        chosen = model.model.reconstruct(model.model.pad(images * 2 - 1)).chosen_timestep
        expected = model(images)
    assert set(chosen.tolist()) >= {0.0, 400.0}, "the test needs images on both sides of tau"
    result = openvino_outputs(compile_openvino(model_xml, "f32"), images)
    np.testing.assert_allclose(result["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(result["pred_score"], expected.pred_score.numpy(), atol=1e-4)


def test_openvino_inferencer_predicts_on_an_image_file(
    trained_glad: TrainedModel, demo_root: Path, glad_openvino: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = demo_test_images(demo_root)[-1]
    prediction = OpenVINOInferencer(glad_openvino, device="CPU", config=compile_config("f32")).predict(path)
    with torch.no_grad():
        expected = trained_glad.model(image_tensor([path]))
    np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-4)


def test_onnx_export_matches_torch(trained_glad: TrainedModel, demo_root: Path, glad_onnx: Path) -> None:
    """The ONNX file that the shared OpenVINO export was converted from (RADAR's and DADDA's tests export ONNX alone)."""
    assert_openvino_matches_torch(trained_glad.model, glad_onnx, image_tensor(demo_test_images(demo_root)[:1]))


def test_int8_weight_compression_keeps_the_map(
    trained_glad: TrainedModel, demo_root: Path, glad_openvino: Path, tmp_path: Path
) -> None:
    """The shared FP32 export compressed as ``anomalib export --compression_type INT8`` does (NNCF weight compression)."""
    import openvino as ov

    core = ov.Core()
    compressed = trained_glad.model._compress_ov_model(core.read_model(glad_openvino), CompressionType.INT8)
    path = tmp_path / "model.xml"
    ov.save_model(compressed, path)
    int8_weights = [
        op
        for op in core.read_model(path).get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.u8
    ]
    assert len(int8_weights) > 10, "the U-Net's weights must be stored as 8-bit integers"
    maps = openvino_anomaly_maps(
        {"int8": path, "fp32": glad_openvino}, image_tensor(demo_test_images(demo_root, limit=8))
    )
    assert maps["int8"].std() > 0.5 * maps["fp32"].std()
    assert np.corrcoef(maps["int8"].ravel(), maps["fp32"].ravel())[0, 1] > 0.95


@pytest.mark.parametrize("compression", [CompressionType.INT8_PTQ, CompressionType.INT8_ACQ])
def test_activation_quantisation_is_refused_before_writing(
    trained_glad: TrainedModel, demo_root: Path, compression: CompressionType, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=rf"compression_type={compression.name}.*Use compression_type=INT8"):
        trained_glad.model.to_openvino(tmp_path, compression_type=compression, datamodule=tiny_datamodule(demo_root))
    assert not any(tmp_path.iterdir()), "nothing may be written on refusal"
