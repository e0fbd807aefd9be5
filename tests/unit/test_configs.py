"""The shipped configs name every model argument, with the model's own defaults."""

import inspect
import json
from pathlib import Path

import pytest
import yaml

from anomalib_diffusion.federated.cli import DEFAULTS, load_config
from anomalib_diffusion.models import DADDA, GLAD, RADAR
from anomalib_diffusion.shipped_configs import config_names, config_text
from anomalib_diffusion.shipped_configs import main as config_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NOT_IN_CONFIG = {"self", "pre_processor", "post_processor", "evaluator", "visualizer"}


def as_config_value(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize(("model", "name"), [(RADAR, "radar.yaml"), (GLAD, "glad.yaml"), (DADDA, "dadda.yaml")])
def test_config_lists_every_argument_with_its_default(model: type, name: str) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["model"]["class_path"] == f"anomalib_diffusion.models.{model.__name__}"
    init_args = config["model"]["init_args"]
    parameters = {
        key: parameter.default
        for key, parameter in inspect.signature(model.__init__).parameters.items()
        if key not in NOT_IN_CONFIG
    }
    assert set(init_args) == set(parameters)
    for key, default in parameters.items():
        assert init_args[key] == as_config_value(default), key


@pytest.mark.parametrize(
    ("model", "name"), [(RADAR, "radar_demo.yaml"), (GLAD, "glad_demo.yaml"), (DADDA, "dadda_demo.yaml")]
)
def test_demo_config_overrides_build(model: type, name: str) -> None:
    config = yaml.safe_load((CONFIGS / name).read_text())
    model(**config["model"]["init_args"])


def test_federated_config_has_every_section_and_its_model_builds() -> None:
    config = load_config(CONFIGS / "dadda_federated.yaml")
    assert set(config) == set(DEFAULTS)
    assert set(config["federation"]) == set(DEFAULTS["federation"])
    assert set(config["site"]) == set(DEFAULTS["site"])
    model = DADDA(**config["model"])
    assert model.max_steps == config["model"]["generator_steps"] + config["model"]["detector_steps"]


def test_federated_config_with_an_unknown_section_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("federation: {rounds: 2}\nsites: {count: 3}\n")
    with pytest.raises(ValueError, match=r"Unknown sections \['sites'\]"):
        load_config(path)


BENCHMARK_GRIDS = {
    "benchmark.yaml": ["RADAR", "GLAD", "DADDA", "PadimLite0", "PatchcoreLite0", "DraemOffline"],
    "benchmark_devbench.yaml": ["RADAR", "GLAD", "DADDA", "PadimLite0", "PatchcoreLite0"],
}


@pytest.mark.parametrize(("name", "models"), BENCHMARK_GRIDS.items())
def test_benchmark_config_builds_every_model_with_a_bounded_budget(name: str, models: list[str]) -> None:
    """Each grid entry builds the way anomalib's benchmark generator builds it, and trains for a bounded time."""
    from anomalib.models import get_model

    config = yaml.safe_load((CONFIGS / name).read_text())
    assert config["accelerator"] == ["cpu"]
    entries = config["benchmark"]["model"]["grid"]
    names = [entry["class_path"] for entry in entries]
    assert names == models
    for entry in entries:
        model = get_model(entry)
        assert type(model).__name__ == entry["class_path"]
        bounded = getattr(model, "max_steps", None) or model.trainer_arguments.get("max_epochs")
        assert bounded, f"{entry['class_path']} would train for Lightning's default 1000 epochs"
    assert config["benchmark"]["data"]["class_path"] == "MVTecAD"


@pytest.mark.parametrize("name", ["radar.yaml", "glad.yaml", "dadda.yaml"])
def test_shipped_configs_never_threshold_on_test_labels(name: str) -> None:
    data = yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]
    assert data["val_split_mode"] == "synthetic"


@pytest.mark.parametrize("name", BENCHMARK_GRIDS)
def test_benchmark_config_never_thresholds_on_test_labels(name: str) -> None:
    data = yaml.safe_load((CONFIGS / name).read_text())["benchmark"]["data"]["init_args"]
    assert data["val_split_mode"] == "synthetic"


@pytest.mark.parametrize(("mode", "warned"), [("same_as_test", True), ("from_test", True), ("synthetic", False)])
def test_fitting_says_when_thresholds_would_come_from_test_labels(
    mode: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from anomalib.data.utils import ValSplitMode

    from anomalib_diffusion.components.lightning import warn_if_validating_on_test_labels

    with caplog.at_level("WARNING"):
        warn_if_validating_on_test_labels(SimpleNamespace(val_split_mode=ValSplitMode(mode)), "RADAR")
    assert ("fitted on test labels" in caplog.text) is warned
    if warned:
        assert "--data.val_split_mode synthetic" in caplog.text


def test_the_shipped_configs_are_reachable_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """``anomalib-diffusion-config``: the same files as configs/ (the wheel carries them: scripts/check_wheel.py)."""
    assert config_names() == sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert config_text("radar") == (CONFIGS / "radar.yaml").read_text()
    config_main(["glad_demo"])
    assert capsys.readouterr().out == (CONFIGS / "glad_demo.yaml").read_text()
    with pytest.raises(
        ValueError, match=r"No shipped config named 'radr'; choose one of: benchmark, benchmark_devbench, dadda"
    ):
        config_text("radr")
    with pytest.raises(SystemExit):
        config_main(["radr"])
    assert "No shipped config named 'radr'" in capsys.readouterr().err


def test_the_flower_app_is_valid_and_takes_every_run_config_key_the_commands_write(tmp_path: Path) -> None:
    """`flwr run` refuses a run config key the app does not declare; the app must import from its folder."""
    from flwr.cli.config_utils import load_and_validate

    from anomalib_diffusion.federated.cli import APP_PATH, run_config

    app, _ = load_and_validate(APP_PATH / "pyproject.toml", check_module=True)
    declared = app["tool"]["flwr"]["app"]["config"]
    written = run_config(load_config(CONFIGS / "dadda_federated.yaml"), ["hole", "scratch"], tmp_path / "g.ckpt")
    assert set(written) <= set(declared)
    assert set(declared) - set(written) == {"sites-root", "category", "threads", "detector-site"}, "simulate adds them"
    assert written["defect-types"] == "hole,scratch"
    assert json.loads(written["model"]) == load_config(CONFIGS / "dadda_federated.yaml")["model"]
