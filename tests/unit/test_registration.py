"""The installed package registers its models with the unmodified anomalib, in fresh processes."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def test_python_start_up_does_not_import_torch() -> None:
    result = run_python("import sys; print('torch' in sys.modules, 'anomalib' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_import_hook_is_installed_by_the_pth_file() -> None:
    result = run_python("import sys; print([type(f).__name__ for f in sys.meta_path])")
    assert "_AnomalibModelsFinder" in result.stdout


# The step-budget argument of each model, and the max_steps it then trains for.
STEP_ARGUMENTS = {"RADAR": ("max_steps", 3), "GLAD": ("max_steps", 3), "DADDA": ("detector_steps", 1003)}


@pytest.mark.parametrize("name", list(STEP_ARGUMENTS))
def test_get_model_and_anomalib_models_alias(name: str) -> None:
    argument, steps = STEP_ARGUMENTS[name]
    code = (
        "from anomalib.models import get_model, list_models\n"
        "import anomalib.models\n"
        f"model = get_model('{name.lower()}', {argument}=3)\n"
        f"print(type(model).__module__, anomalib.models.{name} is type(model), model.max_steps)\n"
        f"print('{name}' in list_models(case='pascal'))\n"
        f"print(type(get_model({{'class_path': 'anomalib.models.{name}'}})).__name__)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"anomalib_diffusion.models.{name.lower()}.lightning_model True {steps}"
    assert lines[1] == "True"
    assert lines[2] == name


def test_importing_a_plugin_module_first_still_aliases_lazily() -> None:
    result = run_python("import anomalib_diffusion.components, anomalib.models; print(anomalib.models.RADAR.__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RADAR"
    assert "could not register" not in result.stderr


@pytest.mark.parametrize(
    "name",
    ["RADAR", "anomalib_diffusion.models.RADAR", "anomalib.models.RADAR", "GLAD", "anomalib.models.GLAD", "DADDA"],
)
def test_anomalib_cli_resolves_the_model(name: str) -> None:
    argument = STEP_ARGUMENTS[name.rsplit(".", 1)[-1]][0]
    result = subprocess.run(
        [str(BIN / "anomalib"), "train", "--model", name, f"--model.{argument}", "7", "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert name.rsplit(".", 1)[-1] in result.stdout
    assert f"{argument}: 7" in result.stdout


def test_benchmark_collects_jobs_with_different_settings_and_metrics() -> None:
    # anomalib 2.7 takes the columns from the first job only: a KeyError (or a length mismatch) for mixed models.
    code = (
        "from anomalib.pipelines.benchmark.job import BenchmarkJob\n"
        "frame = BenchmarkJob.collect([\n"
        "    {'model.class_path': 'RADAR', 'model.init_args.max_steps': 3, 'image_AUROC': 0.9},\n"
        "    {'model.class_path': 'PadimLite0', 'image_AUROC': 0.8, 'defect_type_accuracy': 0.5},\n"
        "])\n"
        "print(list(frame.columns))\n"
        "print(frame['model.class_path'].tolist(), frame['image_AUROC'].tolist())\n"
        "print(frame.isna().to_numpy().tolist())\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    columns, values, missing = result.stdout.strip().splitlines()
    assert columns == "['model.class_path', 'model.init_args.max_steps', 'image_AUROC', 'defect_type_accuracy']"
    assert values == "['RADAR', 'PadimLite0'] [0.9, 0.8]"
    assert missing == "[[False, False, False, True], [False, True, False, False]]"
