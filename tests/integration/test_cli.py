"""The unmodified ``anomalib`` console script, run as real subprocesses, with RADAR, GLAD and DADDA."""

import csv
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_diffusion.models import RADAR
from tests.conftest import TINY_DADDA, TINY_GLAD, TINY_RADAR
from tests.helpers import image_tensor

BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


TINY = {"RADAR": TINY_RADAR, "GLAD": TINY_GLAD, "DADDA": TINY_DADDA}


def tiny_model_config(name: str = "RADAR") -> dict:
    return {
        "class_path": name,
        "init_args": {key: list(value) if isinstance(value, tuple) else value for key, value in TINY[name].items()},
    }


def tiny_data_config(demo_root: Path, class_path: str) -> dict:
    init_args = {
        "root": str(demo_root),
        "category": "brick",
        "train_batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
    }
    return {"class_path": class_path, "init_args": init_args}


@pytest.fixture(scope="module")
def cli_checkpoint(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    config = {
        "seed_everything": 0,
        "model": tiny_model_config(),
        "data": tiny_data_config(demo_root, "anomalib.data.MVTecAD"),
        "trainer": {"accelerator": "cpu", "devices": 1},
        "default_root_dir": str(work / "results"),
    }
    (work / "radar_tiny.yaml").write_text(yaml.safe_dump(config))
    result = run([str(BIN / "anomalib"), "train", "--config", "radar_tiny.yaml"], cwd=work)
    assert "image_AUROC" in result.stdout + result.stderr
    checkpoints = sorted((work / "results").rglob("*.ckpt"))
    assert checkpoints, "anomalib train wrote no checkpoint"
    return checkpoints[0]


def test_cli_export_and_openvino_predict_write_an_overlay(
    cli_checkpoint: Path, demo_root: Path, tmp_path: Path
) -> None:
    """As the README and docs/deployment.md show it: export prints the f32 line, predict gives torch's score."""
    exported = run(
        [
            str(BIN / "anomalib"),
            "export",
            "--model",
            "RADAR",
            "--ckpt_path",
            str(cli_checkpoint),
            "--export_type",
            "openvino",
            "--export_root",
            str(tmp_path / "export"),
        ],
        cwd=tmp_path,
    )
    model_xml = next((tmp_path / "export").rglob("model.xml"))
    assert "config={'INFERENCE_PRECISION_HINT': 'f32'}" in exported.stdout + exported.stderr
    image = min((demo_root / "brick" / "test" / "scratch").glob("*.png"))
    result = run(
        [
            str(BIN / "anomalib-diffusion-predict"),
            "--model",
            str(model_xml),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "predictions"),
        ],
        cwd=tmp_path,
    )
    printed = float(result.stdout.split("score=")[1].split()[0])
    model = RADAR.load_from_checkpoint(cli_checkpoint).eval()
    with torch.no_grad():
        expected = float(model(image_tensor([image])).pred_score[0])
    assert printed == pytest.approx(expected, abs=2e-4)  # printed to 4 decimals, computed in f32
    overlay = tmp_path / "predictions" / f"{image.stem}_overlay.png"
    from PIL import Image

    with Image.open(overlay) as picture:
        assert picture.width > picture.height  # input | heat map | mask, side by side


def test_cli_test_from_checkpoint_with_the_run_config(cli_checkpoint: Path, tmp_path: Path) -> None:
    run_config = next(cli_checkpoint.parents[2].glob("config.yaml"))
    result = run(
        [
            str(BIN / "anomalib"),
            "test",
            "--config",
            str(run_config),
            "--ckpt_path",
            str(cli_checkpoint),
            "--default_root_dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    assert "pixel_AUROC" in result.stdout + result.stderr


def test_cli_test_with_other_model_settings_names_them(cli_checkpoint: Path, demo_root: Path, tmp_path: Path) -> None:
    command = [
        str(BIN / "anomalib"),
        "test",
        "--model",
        "RADAR",
        "--ckpt_path",
        str(cli_checkpoint),
        "--data",
        "anomalib.data.MVTecAD",
        "--data.root",
        str(demo_root),
        "--data.category",
        "brick",
        "--data.num_workers",
        "0",
        "--default_root_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "checkpoint was trained with patch_size=32" in output
    assert "size mismatch" not in output


def test_anomalib_benchmark_runs_a_grid_of_all_three_models(demo_root: Path, tmp_path: Path) -> None:
    # Different init_args and metrics per model: anomalib 2.7 alone fails to collect this (see compat.py).
    config = {
        "accelerator": "cpu",
        "benchmark": {
            "seed": 0,
            "model": {"grid": [tiny_model_config(name) for name in ("RADAR", "GLAD", "DADDA")]},
            "data": tiny_data_config(demo_root, "MVTecAD"),  # the short name, as benchmark users write it
        },
    }
    (tmp_path / "benchmark.yaml").write_text(yaml.safe_dump(config))
    run([str(BIN / "anomalib"), "benchmark", "--config", "benchmark.yaml"], cwd=tmp_path)
    # anomalib benchmark exits 0 even when a job fails: the results file is the real check.
    results = list((tmp_path / "runs" / "benchmark").rglob("results.csv"))
    assert len(results) == 1
    with results[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model.class_path"] for row in rows] == ["RADAR", "GLAD", "DADDA"]
    for row in rows:
        assert 0.0 <= float(row["image_AUROC"]) <= 1.0

    # The union of the jobs' settings, each empty where that model has no such argument.
    def column(key: str) -> list[float | None]:
        return [float(row[key]) if row[key] else None for row in rows]

    assert column("model.init_args.max_steps") == [TINY_RADAR["max_steps"], TINY_GLAD["max_steps"], None]
    assert column("model.init_args.detector_steps") == [None, None, TINY_DADDA["detector_steps"]]


def tiny_flags(name: str) -> list[str]:
    """``--model.<key> <value>`` for each of the model's tiny settings."""
    return [
        flag for key, value in tiny_model_config(name)["init_args"].items() for flag in (f"--model.{key}", str(value))
    ]


def train_and_export(name: str, train: list[str], work: Path) -> tuple[str, Path]:
    """``anomalib train`` then ``anomalib export`` of its checkpoint under ``work``: the training's output, the IR."""
    result = run([*train, "--trainer.accelerator", "cpu", "--default_root_dir", "results"], cwd=work)
    [checkpoint] = (work / "results").rglob("model.ckpt")
    export = [str(BIN / "anomalib"), "export", "--model", name, "--ckpt_path", str(checkpoint)]
    run([*export, "--export_type", "openvino", "--export_root", "export"], cwd=work)
    return result.stdout + result.stderr, work / "export" / "weights" / "openvino" / "model.xml"


@pytest.fixture(scope="module")
def glad_and_dadda_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """GLAD's and DADDA's CLI pipelines, started together: each spends much of its time in single-threaded imports."""
    data_flags = ["--data", "anomalib.data.MVTecAD", "--data.root", str(demo_root), "--data.category", "brick"]
    data_flags += ["--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]
    glad = [str(BIN / "anomalib"), "train", "--model", "GLAD", *tiny_flags("GLAD"), *data_flags]
    # configs/dadda.yaml + the tiny settings: MVTecADFewDefects resolves by class path, k comes from the CLI.
    dadda = [str(BIN / "anomalib"), "train", "--config", str(CONFIGS / "dadda.yaml"), *tiny_flags("DADDA")]
    dadda += ["--data.root", str(demo_root), "--data.defects_per_type", "1", "--data.train_batch_size", "4"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            name: pool.submit(train_and_export, name, train, tmp_path_factory.mktemp(name))
            for name, train in (("GLAD", glad), ("DADDA", dadda))
        }


def test_cli_trains_and_exports_glad_by_its_short_name(glad_and_dadda_runs: dict[str, Future]) -> None:
    output, model_xml = glad_and_dadda_runs["GLAD"].result()
    assert "image_AUROC" in output
    assert model_xml.is_file()


def test_cli_trains_dadda_with_lent_defects_from_the_shipped_configs(glad_and_dadda_runs: dict[str, Future]) -> None:
    output, model_xml = glad_and_dadda_runs["DADDA"].result()
    assert "image_AUROC" in output
    assert "defect_type_accuracy" in output
    assert model_xml.is_file()
