"""The installed package registers its models with the unmodified anomalib, in fresh processes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def run_python_concurrently(codes: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Each program in its own fresh process, all started at once: anomalib's import (single-threaded) dominates each."""
    processes = {
        name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, code in codes.items()
    }
    results = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return results


def test_python_start_up_does_not_import_torch() -> None:
    result = run_python("import sys; print('torch' in sys.modules, 'anomalib' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_import_hook_is_installed_by_the_pth_file() -> None:
    result = run_python("import sys; print([type(f).__name__ for f in sys.meta_path])")
    assert "_AnomalibModelsFinder" in result.stdout


# The step-budget argument of each model, and the max_steps it then trains for.
STEP_ARGUMENTS = {"RADAR": ("max_steps", 3), "GLAD": ("max_steps", 3), "DADDA": ("detector_steps", 1003)}

GET_MODEL_CODE = "from anomalib.models import get_model, list_models\nimport anomalib.models\n" + "".join(
    f"model = get_model('{name.lower()}', {argument}=3)\n"
    f"print(type(model).__module__, anomalib.models.{name} is type(model), model.max_steps)\n"
    f"print('{name}' in list_models(case='pascal'))\n"
    f"print(type(get_model({{'class_path': 'anomalib.models.{name}'}})).__name__)\n"
    for name, (argument, _) in STEP_ARGUMENTS.items()
)

PLUGIN_FIRST_CODE = "import anomalib_diffusion.components, anomalib.models; print(anomalib.models.RADAR.__name__)"

CLI_NAMES = [
    "RADAR",
    "anomalib_diffusion.models.RADAR",
    "anomalib.models.RADAR",
    "GLAD",
    "anomalib.models.GLAD",
    "DADDA",
]
CLI_CASES = [(name, STEP_ARGUMENTS[name.rsplit(".", 1)[-1]][0]) for name in CLI_NAMES]
# The offline peers resolve the same way (tests/unit/test_peers.py covers get_model for them).
CLI_CASES += [("DraemOffline", "max_epochs"), ("PatchcoreLite0", "num_neighbors")]
# Runs the `anomalib` console script's own entry point once per name in one process (anomalib's import
# dominates each run); tests/integration/test_cli.py runs the console script itself, as a user types it.
CLI_CODE = f"""
import contextlib, io, sys
from anomalib.cli.cli import main
for name, argument in {CLI_CASES!r}:
    sys.argv = ["anomalib", "train", "--model", name, f"--model.{{argument}}", "7", "--print_config"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        try:
            main()
        except SystemExit as stop:
            assert stop.code in (0, None), (name, stop.code)
    print("=== " + name)
    print(output.getvalue())
"""

# anomalib 2.7 takes the columns from the first job only: a KeyError (or a length mismatch) for mixed models.
BENCHMARK_CODE = (
    "from anomalib.pipelines.benchmark.job import BenchmarkJob\n"
    "frame = BenchmarkJob.collect([\n"
    "    {'model.class_path': 'RADAR', 'model.init_args.max_steps': 3, 'image_AUROC': 0.9},\n"
    "    {'model.class_path': 'PadimLite0', 'image_AUROC': 0.8, 'defect_type_accuracy': 0.5},\n"
    "])\n"
    "print(list(frame.columns))\n"
    "print(frame['model.class_path'].tolist(), frame['image_AUROC'].tolist())\n"
    "print(frame.isna().to_numpy().tolist())\n"
)


# After the CLI's runs (each calls anomalib's configure_logger): one console handler per logger, each line once.
LOGGING_CODE = """
import logging
for name in ("", "lightning.pytorch"):
    print(name or "root", sorted(type(handler).__name__ for handler in logging.getLogger(name).handlers))
logging.getLogger("anomalib.check").info("line-logged-once")
"""

# get_model, the CLI and the benchmark collection run one after the other in one fresh process (anomalib's import,
# about 15 s of one core, dominates each); each prints its own section.
ANOMALIB_SECTIONS = {"get_model": GET_MODEL_CODE, "cli": CLI_CODE, "logging": LOGGING_CODE, "benchmark": BENCHMARK_CODE}
ANOMALIB_CODE = "".join(f"print('##### {name}', flush=True)\n{code}\n" for name, code in ANOMALIB_SECTIONS.items())


@pytest.fixture(scope="module")
def fresh() -> dict[str, subprocess.CompletedProcess]:
    """Two fresh processes (nothing imported before them), side by side: anomalib first, or the plugin first.

    The anomalib one's output is split into its sections (``ANOMALIB_SECTIONS``: ``fresh["get_model"]``,
    ``fresh["cli"]``, ``fresh["logging"]``, ``fresh["benchmark"]``), each with the process's return code and whole
    stderr.
    """
    results = run_python_concurrently({"plugin_first": PLUGIN_FIRST_CODE, "anomalib": ANOMALIB_CODE})
    combined = results.pop("anomalib")
    sections = dict(part.split("\n", 1) for part in combined.stdout.split("##### ")[1:])
    for name in ANOMALIB_SECTIONS:
        output = sections.get(name, "")
        results[name] = subprocess.CompletedProcess(combined.args, combined.returncode, output, combined.stderr)
    return results


def test_get_model_and_anomalib_models_alias(fresh: dict[str, subprocess.CompletedProcess]) -> None:
    """All three models in one fresh process (anomalib's import dominates the cost of each)."""
    result = fresh["get_model"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * len(STEP_ARGUMENTS), result.stdout
    for index, (name, (_, steps)) in enumerate(STEP_ARGUMENTS.items()):
        module, pascal, by_class_path = lines[3 * index : 3 * index + 3]
        assert module == f"anomalib_diffusion.models.{name.lower()}.lightning_model True {steps}"
        assert pascal == "True"
        assert by_class_path == name


def test_importing_a_plugin_module_first_still_aliases_lazily(fresh: dict[str, subprocess.CompletedProcess]) -> None:
    result = fresh["plugin_first"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RADAR"
    assert "could not register" not in result.stderr


def test_anomalib_cli_resolves_the_model(fresh: dict[str, subprocess.CompletedProcess]) -> None:
    result = fresh["cli"]
    assert result.returncode == 0, result.stderr[-2000:]
    sections = dict(section.split("\n", 1) for section in result.stdout.split("=== ")[1:])
    assert list(sections) == [name for name, _ in CLI_CASES]
    for name, argument in CLI_CASES:
        assert re.search(rf"class_path: \S*\.{name.rsplit('.', 1)[-1]}\n", sections[name]), name
        assert f"{argument}: 7" in sections[name], name


def test_the_cli_prints_each_log_line_once(fresh: dict[str, subprocess.CompletedProcess]) -> None:
    """anomalib's configure_logger adds a rich handler beside the plain ones; the plugin keeps the plain one only."""
    result = fresh["logging"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "root ['StreamHandler']" in result.stdout
    assert "lightning.pytorch ['StreamHandler']" in result.stdout
    assert (result.stdout + result.stderr).count("line-logged-once") == 1


def test_benchmark_collects_jobs_with_different_settings_and_metrics(
    fresh: dict[str, subprocess.CompletedProcess],
) -> None:
    result = fresh["benchmark"]
    assert result.returncode == 0, result.stderr
    columns, values, missing = result.stdout.strip().splitlines()
    assert columns == "['model.class_path', 'model.init_args.max_steps', 'image_AUROC', 'defect_type_accuracy']"
    assert values == "['RADAR', 'PadimLite0'] [0.9, 0.8]"
    assert missing == "[[False, False, False, True], [False, True, False, False]]"
