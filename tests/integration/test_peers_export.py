"""The offline PatchCore peer exports a graph that serves one image at a time, in FP32 and INT8."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import CompressionType, ExportType
from anomalib.engine import Engine

from anomalib_diffusion.models import PatchcoreLite0
from tests.conftest import tiny_datamodule
from tests.helpers import compile_openvino


@pytest.fixture(scope="module")
def fitted_patchcore(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchcoreLite0, Engine]:
    torch.manual_seed(0)
    model = PatchcoreLite0(coreset_sampling_ratio=0.1)
    engine = Engine(
        default_root_dir=tmp_path_factory.mktemp("patchcore"),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model=model, datamodule=tiny_datamodule(demo_root))
    return model.eval(), engine


def test_patchcore_openvino_takes_one_image_of_any_size_and_matches_torch(
    fitted_patchcore: tuple[PatchcoreLite0, Engine], tmp_path: Path
) -> None:
    model, engine = fitted_patchcore
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=tmp_path)
    compiled = compile_openvino(xml, "f32")
    assert compiled.inputs[0].partial_shape[0].get_length() == 1  # anomalib alone traces PatchCore's batch at 2
    for size in ((64, 64), (96, 80)):
        image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        outputs = compiled(image.numpy())
        result = {name: outputs[port] for port in compiled.outputs for name in port.names}
        with torch.no_grad():
            expected = model(image)
        np.testing.assert_allclose(result["pred_score"], expected.pred_score.numpy(), atol=1e-3)
        assert result["anomaly_map"].shape[-2:] == expected.anomaly_map.shape[-2:]


def test_patchcore_int8_ptq_with_a_static_input_size(
    fitted_patchcore: tuple[PatchcoreLite0, Engine], demo_root: Path, tmp_path: Path
) -> None:
    import openvino as ov

    model, engine = fitted_patchcore
    xml = engine.export(
        model=model,
        export_type=ExportType.OPENVINO,
        export_root=tmp_path,
        compression_type=CompressionType.INT8_PTQ,
        # One image per calibration batch: the graph takes exactly one (anomalib's quantiser only adapts train_batch_size).
        datamodule=MVTecAD(root=demo_root, category="brick", train_batch_size=1, eval_batch_size=1, num_workers=0),
        input_size=(64, 64),
    )
    compiled = compile_openvino(xml, "f32")  # the layers NNCF left in float run in f32
    assert [dimension.get_length() for dimension in compiled.inputs[0].partial_shape] == [1, 3, 64, 64]
    types = {op.get_type_name() for op in ov.Core().read_model(xml).get_ops()}
    assert "FakeQuantize" in types or "FakeConvert" in types
    outputs = compiled(np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32))
    scores = next(outputs[port] for port in compiled.outputs if "pred_score" in port.names)
    assert np.isfinite(scores).all()
