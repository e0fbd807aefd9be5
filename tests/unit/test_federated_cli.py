"""The federated command line's small commands and a site's settings (node config over run config)."""

import json
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from anomalib_diffusion.federated.apps import FederationSettings, SiteSettings, require_type_names
from anomalib_diffusion.federated.cli import APP_PATH, main


def context(node: dict, run: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run or {})


def site_folder(root: Path) -> Path:
    (root / "brick" / "train" / "good").mkdir(parents=True)
    return root


class TestCommands:
    def test_app_path_prints_the_flower_app(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["app-path"]) == 0
        printed = Path(capsys.readouterr().out.strip())
        assert printed == APP_PATH
        assert (printed / "pyproject.toml").is_file()

    def test_run_config_prints_toml_for_flwr_run(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["run-config", "--sites", "3", "--min-sites", "2", "--defect-types", "crack", "hole"]) == 0
        values = tomllib.loads(capsys.readouterr().out)
        assert values["expected-sites"] == 3 and values["min-sites"] == 2
        assert values["defect-types"] == "crack,hole"
        assert values["mode"] == "together"
        settings = FederationSettings.from_run_config(values)
        assert settings.defect_types == ["crack", "hole"]
        assert settings.model == {"generator_steps": 200, "detector_steps": 200}
        assert Path(values["output"]).is_absolute()

    def test_credentials_writes_a_new_folder(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["credentials", "--output", str(tmp_path / "certs"), "--sites", "line4"]) == 0
        assert (tmp_path / "certs" / "line4.pub").is_file()
        assert "ca.crt (to every site)" in capsys.readouterr().out

    def test_bad_input_is_one_line_naming_the_fix(self, tmp_path: Path) -> None:
        (tmp_path / "certs").mkdir()
        with pytest.raises(SystemExit, match=r"credentials: .*already exists; choose a new folder"):
            main(["credentials", "--output", str(tmp_path / "certs"), "--sites", "line4"])
        with pytest.raises(SystemExit, match=r"simulate: .*train/good does not exist"):
            main(["simulate", "--root", str(tmp_path), "--category", "brick", "--work-dir", str(tmp_path / "w")])


class TestSiteSettings:
    def test_the_node_config_names_the_data_and_overrides_the_run_config(self, tmp_path: Path) -> None:
        root = site_folder(tmp_path / "line4")
        node = {"data-root": str(root), "category": "brick", "defects-per-type": 1, "threads": 2}
        site = SiteSettings.from_context(context(node, {"defects-per-type": 3, "batch-size": 4}))
        assert (site.data_root, site.category, site.defects_per_type, site.batch_size) == (root, "brick", 1, 4)
        assert site.threads == 2 and site.role == "defects"

    def test_the_simulation_reads_its_partition_and_the_last_one_trains_the_detector(self, tmp_path: Path) -> None:
        for index in range(3):
            site_folder(tmp_path / "data" / f"site_{index}")
        run = {"sites-root": str(tmp_path / "data"), "category": "brick", "detector-site": 2}
        first = SiteSettings.from_context(context({"partition-id": 0, "num-partitions": 3}, run))
        last = SiteSettings.from_context(context({"partition-id": 2, "num-partitions": 3}, run))
        assert first.data_root == tmp_path / "data" / "site_0" and first.role == "defects"
        assert last.role == "detector"
        assert first.work_dir == tmp_path / "runs" / "site_0", "local runs beside the simulation's data"

    def test_a_node_without_data_is_told_how_to_start(self) -> None:
        with pytest.raises(ValueError, match=r"--node-config 'data-root=\"/path/to/mvtec-layout\" category=\"brick\"'"):
            SiteSettings.from_context(context({}))

    def test_a_missing_folder_and_an_unknown_role_are_named(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"train/good does not exist"):
            SiteSettings.from_context(context({"data-root": str(tmp_path), "category": "brick"}))
        root = site_folder(tmp_path / "line4")
        with pytest.raises(
            ValueError, match=r"role='trainer' in --node-config must be one of \['defects', 'detector'\]"
        ):
            SiteSettings.from_context(context({"data-root": str(root), "category": "brick", "role": "trainer"}))


class TestTypeNames:
    def test_a_site_with_real_defects_refuses_a_run_that_names_no_types(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for identity in ("_run_id", "_node_id", "_task_id"):
            monkeypatch.setattr(TaskIdentity, identity, 1)
        root = site_folder(tmp_path / "line4")
        (root / "brick" / "test" / "crack").mkdir(parents=True)
        site = SiteSettings.from_context(context({"data-root": str(root), "category": "brick"}))

        def message(types: list[str]) -> Message:
            config = ConfigRecord({"defect-types": json.dumps(types), "model": "{}", "seed": 0})
            return Message(RecordDict({"config": config}), message_type=MessageType.TRAIN, dst_node_id=1)

        with pytest.raises(ValueError, match=r"holds defect types \['crack'\], but the run names none"):
            require_type_names(message([]), site)
        require_type_names(message(["crack", "hole"]), site)
        require_type_names(
            message([]),
            SiteSettings.from_context(context({"data-root": str(root), "category": "brick", "defects-per-type": 0})),
        )


class TestFederationSettings:
    @pytest.mark.parametrize(
        ("run", "named"),
        [
            ({"mode": "central"}, "mode='central' must be one of"),
            ({"min-sites": 3, "expected-sites": 2}, "min-sites=3 must be between 1 and expected-sites"),
            ({"model": "[1, 2]"}, "must be a JSON object of DADDA arguments"),
        ],
    )
    def test_bad_run_configs_are_named(self, run: dict, named: str) -> None:
        with pytest.raises(ValueError, match=named):
            FederationSettings.from_run_config(run)
