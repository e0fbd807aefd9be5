"""RADAR end to end through anomalib's Engine, checkpoints, exports and inferencers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer

from anomalib_diffusion.deploy import compile_config
from anomalib_diffusion.models import RADAR
from tests.conftest import REFERENCE_RADAR, TrainedModel, tiny_datamodule
from tests.helpers import (
    compile_openvino,
    demo_test_images,
    image_tensor,
    openvino_anomaly_maps,
    openvino_outputs,
)


def test_fit_fits_the_score_head_on_held_out_images_and_test_reports_metrics(trained_radar: TrainedModel) -> None:
    model = trained_radar.model
    assert model.is_fitted()
    assert model.global_step == REFERENCE_RADAR["max_steps"]
    statistics = model.model.map_statistics
    assert (statistics.std > 0).all() and not torch.equal(statistics.mean, torch.zeros_like(statistics.mean))
    train_paths = {str(path) for path in trained_radar.datamodule.train_data.samples["image_path"]}
    assert model._holdout_paths < train_paths  # 2 of the 8 normal training images, never a test image
    assert len(model._holdout_paths) == round(model.calibration_fraction * len(train_paths)) == 2
    results = trained_radar.engine.test(model=trained_radar.model, datamodule=trained_radar.datamodule)
    assert set(results[0]) >= {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}
    assert all(0.0 <= value <= 1.0 for value in results[0].values())


def test_predict_gives_maps_at_the_model_input_size(trained_radar: TrainedModel) -> None:
    predictions = trained_radar.engine.predict(model=trained_radar.model, datamodule=trained_radar.datamodule)
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape == (batch.image.shape[0],)
    assert batch.pred_label.dtype == torch.bool


def test_checkpoint_round_trip_restores_unet_score_head_and_thresholds(
    trained_radar: TrainedModel, demo_root: Path
) -> None:
    assert trained_radar.checkpoint.is_file()
    restored = RADAR.load_from_checkpoint(trained_radar.checkpoint).eval()
    assert restored.is_fitted()
    torch.testing.assert_close(
        restored.model.map_statistics.state_dict(),
        trained_radar.model.model.map_statistics.state_dict(),
        rtol=0,
        atol=0,
    )
    images = image_tensor(demo_test_images(demo_root))
    with torch.no_grad():
        expected, actual = trained_radar.model(images), restored(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_label, expected.pred_label)


def test_checkpoint_round_trip_through_engine_test(trained_radar: TrainedModel, demo_root: Path) -> None:
    results = trained_radar.engine.test(
        model=RADAR(**REFERENCE_RADAR),
        datamodule=tiny_datamodule(demo_root),
        ckpt_path=trained_radar.checkpoint,
    )
    reference = trained_radar.engine.test(model=trained_radar.model, datamodule=trained_radar.datamodule)
    assert results[0]["image_AUROC"] == pytest.approx(reference[0]["image_AUROC"])
    assert results[0]["pixel_AUROC"] == pytest.approx(reference[0]["pixel_AUROC"])


@pytest.fixture
def openvino_model(radar_openvino: Path) -> Path:
    return radar_openvino


def test_openvino_matches_torch_on_real_images(
    trained_radar: TrainedModel, demo_root: Path, openvino_model: Path
) -> None:
    """Compiled in f32: scores and maps to 1e-4, labels equal except within 1e-4 of the threshold."""
    images = image_tensor(demo_test_images(demo_root))
    with torch.no_grad():
        expected = trained_radar.model(images)
    result = openvino_outputs(compile_openvino(openvino_model, "f32"), images)
    np.testing.assert_allclose(result["pred_score"], expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(result["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)
    threshold = float(trained_radar.model.post_processor.normalized_image_threshold)
    clear = (expected.pred_score - threshold).abs().numpy() > 1e-4
    np.testing.assert_array_equal(result["pred_label"][clear], expected.pred_label.numpy()[clear])


def test_openvino_inferencer_predicts_on_an_image_file(
    trained_radar: TrainedModel,
    demo_root: Path,
    openvino_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the inferencer writes its cache into the working directory
    path = demo_test_images(demo_root)[-1]
    prediction = OpenVINOInferencer(openvino_model, device="CPU", config=compile_config("f32")).predict(path)
    with torch.no_grad():
        expected = trained_radar.model(image_tensor([path]))
    np.testing.assert_allclose(prediction.pred_score, expected.pred_score.numpy(), atol=1e-4)
    assert prediction.anomaly_map.shape[-2:] == (64, 64)


def test_onnx_export_runs_in_openvino(trained_radar: TrainedModel, demo_root: Path, tmp_path: Path) -> None:
    onnx_path = trained_radar.engine.export(
        model=trained_radar.model, export_type=ExportType.ONNX, export_root=tmp_path
    )
    assert onnx_path.suffix == ".onnx"
    image = image_tensor(demo_test_images(demo_root)[:1])
    with torch.no_grad():
        expected = trained_radar.model(image)
    scores = openvino_outputs(compile_openvino(onnx_path, "f32"), image)["pred_score"]
    np.testing.assert_allclose(scores, expected.pred_score.numpy(), atol=1e-4)


def test_int8_quantises_the_unet_and_keeps_the_scoring_head_working(
    trained_radar: TrainedModel, demo_root: Path, openvino_model: Path, tmp_path: Path
) -> None:

    path = trained_radar.engine.export(
        model=trained_radar.model,
        export_type=ExportType.OPENVINO,
        export_root=tmp_path,
        compression_type=CompressionType.INT8_PTQ,
        datamodule=tiny_datamodule(demo_root),
    )
    assert_only_the_unet_passes_are_quantised(path, passes=1)
    maps = openvino_anomaly_maps(
        {"int8": path, "fp32": openvino_model}, image_tensor(demo_test_images(demo_root, limit=8))
    )
    # The head stays in float: the INT8 map is not flattened and follows the FP32 map.
    assert maps["int8"].std() > 0.1 * maps["fp32"].std()
    assert np.corrcoef(maps["int8"].ravel(), maps["fp32"].ravel())[0, 1] > 0.8


def assert_only_the_unet_passes_are_quantised(path: Path, passes: int) -> None:
    """The U-Net's convolutions carry FakeQuantize; nothing after any noise-map norm (one per U-Net pass) does."""
    import openvino as ov

    graph = ov.Core().read_model(path)
    quantised = {op.get_friendly_name() for op in graph.get_ops() if op.get_type_name() == "FakeQuantize"}
    assert len(quantised) > 10 * passes, "every U-Net pass's convolutions must be quantised"
    norms = [op for op in graph.get_ordered_ops() if op.get_type_name() == "ReduceL2"]
    assert len(norms) == passes
    pending, downstream = list(norms), set()
    while pending:
        node = pending.pop()
        if node.get_friendly_name() not in downstream:
            downstream.add(node.get_friendly_name())
            pending.extend(target.get_node() for out in node.outputs() for target in out.get_target_inputs())
    assert not quantised & downstream, "the scoring head must stay in float"


@pytest.fixture(scope="module")
def coarse_radar(trained_radar: TrainedModel, demo_root: Path) -> RADAR:
    """The shared RADAR's U-Net and thresholds with one coarse pass (pooling by 2), its score head fitted again."""
    model = RADAR(**(REFERENCE_RADAR | {"coarse_scales": [2]}))
    state = {key: value for key, value in trained_radar.model.state_dict().items() if "map_statistics" not in key}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and {key.rsplit(".", 1)[-1] for key in missing} == {"mean", "std"}
    images = image_tensor(sorted((demo_root / "brick" / "train" / "good").glob("*.png"))[:4])
    model.eval()
    with torch.no_grad():
        model.model.fit_head(model.model.head_statistics(images))
    return model


def test_a_coarse_pass_exports_to_one_graph_that_matches_torch(
    coarse_radar: RADAR, trained_radar: TrainedModel, demo_root: Path, tmp_path: Path
) -> None:
    path = trained_radar.engine.export(model=coarse_radar, export_type=ExportType.OPENVINO, export_root=tmp_path)
    images = image_tensor(demo_test_images(demo_root))
    with torch.no_grad():
        expected = coarse_radar(images)
    result = openvino_outputs(compile_openvino(path, "f32"), images)
    np.testing.assert_allclose(result["pred_score"], expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(result["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)


def test_int8_quantises_every_unet_pass_and_no_scoring_head(
    coarse_radar: RADAR, trained_radar: TrainedModel, demo_root: Path, tmp_path: Path
) -> None:
    path = trained_radar.engine.export(
        model=coarse_radar,
        export_type=ExportType.OPENVINO,
        export_root=tmp_path,
        compression_type=CompressionType.INT8_PTQ,
        datamodule=tiny_datamodule(demo_root),
    )
    assert_only_the_unet_passes_are_quantised(path, passes=2)


def test_int8_without_a_datamodule_says_what_to_pass(trained_radar: TrainedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="INT8_PTQ needs a datamodule"):
        trained_radar.model.to_openvino(tmp_path, compression_type=CompressionType.INT8_PTQ)
    assert not any(tmp_path.iterdir()), "nothing may be written on refusal"


def test_predict_tool_skips_unreadable_files_and_writes_overlays(
    demo_root: Path,
    openvino_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib_diffusion.deploy.openvino_predict import predict

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "incoming"
    folder.mkdir()
    good = demo_test_images(demo_root)[0]
    (folder / "a_good.png").write_bytes(good.read_bytes())
    (folder / "b_truncated.png").write_bytes(good.read_bytes()[:100])
    (folder / "c_not_an_image.png").write_text("hello")
    results = predict(openvino_model, folder, tmp_path / "out")
    assert [path.name for path, _, _ in results] == ["a_good.png"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a_good_overlay.png"]


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_files_are_read_as_rgb(
    mode: str,
    demo_root: Path,
    openvino_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import Image

    from anomalib_diffusion.deploy.openvino_predict import predict

    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"converted_{mode}.png"
    with Image.open(demo_test_images(demo_root)[0]) as image:
        image.convert(mode).save(path)
    [(_, score, _)] = predict(openvino_model, path, tmp_path / "out")
    assert np.isfinite(score)


def test_plain_openvino_runtime_without_torch_matches_the_inferencer(
    demo_root: Path, openvino_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standalone runtime, copied out of the package and run with torch and anomalib unimportable."""
    import shutil
    import subprocess
    import sys

    import anomalib_diffusion.deploy.openvino_runtime as runtime

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "incoming"
    folder.mkdir()
    paths = demo_test_images(demo_root)[:3]
    for index, path in enumerate(paths):
        (folder / f"{index}.png").write_bytes(path.read_bytes())
    (folder / "3_truncated.png").write_bytes(paths[0].read_bytes()[:200])
    script = shutil.copy(runtime.__file__, tmp_path / "openvino_runtime.py")
    blocker = "import sys; sys.modules.update(torch=None, anomalib=None, anomalib_diffusion=None); "
    code = blocker + f"sys.argv = ['x'] + sys.argv[1:]; exec(open({str(script)!r}).read())"
    command = [sys.executable, "-c", code, "--model", str(openvino_model), "--input", str(folder)]
    result = subprocess.run([*command, "--csv", "scores.csv"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Skipped" in result.stderr
    assert "3_truncated.png" in result.stderr
    assert "Scored 3 of 4 file(s)." in result.stderr
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,pred_score,pred_label"
    assert [Path(row.split(",")[0]).name for row in rows[1:]] == ["0.png", "1.png", "2.png"]
    inferencer = OpenVINOInferencer(openvino_model, device="CPU", config=compile_config("f32"))
    for row in rows[1:]:
        path, score, label = row.split(",")
        expected = inferencer.predict(Path(path))
        assert float(score) == pytest.approx(float(expected.pred_score.reshape(-1)[0]), abs=1e-5)
        assert bool(int(label)) == bool(expected.pred_label.reshape(-1)[0])


def test_plain_openvino_runtime_maps_and_bad_input(demo_root: Path, openvino_model: Path, tmp_path: Path) -> None:
    from anomalib_diffusion.deploy.openvino_runtime import OpenVINODetector, read_image

    detector = OpenVINODetector(openvino_model)
    path = demo_test_images(demo_root)[-1]
    prediction = detector.predict_file(path)
    expected = OpenVINOInferencer(openvino_model, device="CPU", config=compile_config("f32")).predict(path)
    assert detector.precision == "f32", "the runtime's default is the validated precision"
    np.testing.assert_allclose(prediction.anomaly_map, expected.anomaly_map.reshape(64, 64), atol=1e-5)
    uint8 = (read_image(path) * 255).round().astype(np.uint8)
    assert detector.predict(uint8).pred_score == pytest.approx(prediction.pred_score, abs=1e-3)
    # The pre-processor inside the graph resizes: any camera size goes in, the map comes out at the model's size.
    assert detector.predict(np.zeros((80, 100, 3), dtype=np.uint8)).anomaly_map.shape == (64, 64)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\)"):
        detector.predict(np.zeros((64, 64), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="anomalib export"):
        OpenVINODetector(tmp_path / "missing.xml")


def test_plain_openvino_runtime_watch_scores_files_once_they_are_complete(
    demo_root: Path, openvino_model: Path, tmp_path: Path
) -> None:
    """A file still growing at a poll is left for a later poll; the test drives the polls, no timing involved."""
    from anomalib_diffusion.deploy.openvino_runtime import OpenVINODetector, Prediction, watch

    folder = tmp_path / "camera"
    folder.mkdir()
    source = demo_test_images(demo_root)[0].read_bytes()
    (folder / "first.png").write_bytes(source)
    (folder / "second.png").write_bytes(source[: len(source) // 2])  # a copy in progress
    polls: list[float] = []
    seen: list[Prediction] = []

    def between_polls(interval: float) -> None:
        polls.append(interval)
        if len(polls) == 1:  # the copy finishes after the first poll saw it half-written
            (folder / "second.png").write_bytes(source)

    detector = OpenVINODetector(openvino_model)
    handled = watch(detector, folder, seen.append, 5.0, max_images=2, sleep=between_polls)
    assert handled == 2
    assert [prediction.path.name for prediction in seen] == ["first.png", "second.png"]
    # Poll 1 records both sizes, poll 2 scores first.png (unchanged) and sees second.png grown, poll 3 scores it.
    assert polls == [5.0, 5.0]
    assert seen[1].pred_score == seen[0].pred_score, "second.png was scored whole: the same bytes as first.png"
