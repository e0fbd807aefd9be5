"""Federated D-ADDA on Flower's two engines, with real processes: the simulation engine (``simulate``) and the
dislocated set-up, plus site splits and the audit of what leaves a site (the deployment engine:
test_federated_deployment.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from anomalib_diffusion.federated.apps import array_record, client_app, payload_audit
from anomalib_diffusion.federated.cli import FLOWER_ENVIRONMENT, main, site_threads
from anomalib_diffusion.federated.sites import split_into_sites
from anomalib_diffusion.federated.weights import state_dict_arrays
from anomalib_diffusion.models import DADDA
from tests.conftest import TINY_DADDA

TIMEOUT = 900
# Two local steps of each network per round keep a round to seconds.
FEDERATED_MODEL = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_DADDA.items()}
FEDERATED_MODEL |= {"generator_steps": 2, "detector_steps": 2}
BIN = Path(sys.executable).parent


def write_config(path: Path, rounds: int = 2, evaluate_each_round: bool = True) -> Path:
    config = {
        "federation": {"rounds": rounds, "join_timeout": 300.0, "evaluate_each_round": evaluate_each_round},
        "site": {"defects_per_type": 1, "batch_size": 4},
        "model": FEDERATED_MODEL,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def flower_environment(flwr_home: Path) -> dict[str, str]:
    return (
        os.environ
        | FLOWER_ENVIRONMENT
        | {"FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    )


def assert_global_model(report: dict, checkpoint: Path, tmp_path: Path) -> None:
    """The global model: every type named by the head fitted from the sites' statistics, fitted, exportable."""
    assert report["defect_types"] == ["contamination", "hole", "scratch", "stain"]
    assert report["updates_were_weights_only"]
    assert all(count > 0 for count in report["type_head"]["defects_per_type"].values()), report["type_head"]
    assert {"image_AUROC", "pixel_AUROC", "defect_type_accuracy"} <= set(report["final_evaluate_metrics"])
    model = DADDA.load_from_checkpoint(checkpoint).eval()
    assert model.is_fitted()
    assert model.type_names == report["defect_types"]
    assert torch.isfinite(model.model.type_bias[:4]).all(), "every type some site held can be named"
    assert model.model.type_weight[:4].abs().sum(dim=1).gt(0).all()
    assert model.to_openvino(tmp_path / "export").is_file()


class TestSiteSplit:
    def test_sites_get_disjoint_types_and_images(self, demo_root: Path, tmp_path: Path) -> None:
        sites = split_into_sites(demo_root, "brick", 2, tmp_path / "sites")
        assert [site.defect_types for site in sites] == [("contamination", "scratch"), ("hole", "stain")]
        trains = [{p.name for p in (s.root / "brick" / "train" / "good").iterdir()} for s in sites]
        assert not trains[0] & trains[1]
        assert len(trains[0] | trains[1]) == 8
        for site in sites:
            types = {p.name for p in (site.root / "brick" / "test").iterdir()} - {"good"}
            assert types == set(site.defect_types)
            assert {p.name for p in (site.root / "brick" / "ground_truth").iterdir()} == set(site.defect_types)

    def test_more_sites_than_defect_types_is_refused(self, demo_root: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="Cannot give 5 sites disjoint defect types: brick has 4"):
            split_into_sites(demo_root, "brick", 5, tmp_path / "sites")
        assert not (tmp_path / "sites").exists()


def test_simulate_runs_two_sites_on_flowers_simulation_engine(demo_root: Path, tmp_path: Path) -> None:
    """The documented one-machine command: Flower's simulation engine (a SuperLink of its own, Ray workers)."""
    work = tmp_path / "federation"
    command = [sys.executable, "-m", "anomalib_diffusion.federated", "simulate", "--root", str(demo_root)]
    command += ["--category", "brick", "--sites", "2", "--rounds", "2", "--work-dir", str(work)]
    command += ["--config", str(write_config(tmp_path / "federated.yaml"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert f"({site_threads(2)} CPU thread(s) each)" in result.stdout
    assert "Federated run completed" in result.stdout
    report = json.loads((work / "global.json").read_text())
    assert report["site_updates"] == 4, "2 sites x 2 rounds"
    assert report["dropouts"] == {}
    assert set(report["evaluate_metrics"]) == {"1", "2"}
    assert "defect_type_accuracy" not in report["evaluate_metrics"]["1"], "no head before the last round"
    assert report["type_head"]["sites"] == 2
    assert_global_model(report, work / "global.ckpt", tmp_path)
    assert not (work / "flower" / "local-superlink").exists(), "simulate runs a SuperLink of its own, stopped after"
    assert {path.name for path in (work / "runs").iterdir()} == {"site_0", "site_1"}, "site runs stay in --work-dir"


def test_simulate_dislocated_only_generator_weights_leave_the_defect_sites(demo_root: Path, tmp_path: Path) -> None:
    """The dislocated set-up: two defect sites train the generator (their replies: generator weights only), a third
    site with normal images only trains the detector on the global generator's defects of every type."""
    work = tmp_path / "federation"
    command = [sys.executable, "-m", "anomalib_diffusion.federated", "simulate", "--root", str(demo_root)]
    command += ["--category", "brick", "--sites", "2", "--rounds", "1", "--dislocated", "--work-dir", str(work)]
    command += ["--config", str(write_config(tmp_path / "federated.yaml"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "site_2: normal images only, trains the detector" in result.stdout
    assert not any((work / "data" / "site_2" / "brick" / "test").glob("[!g]*")), "no defect at the detector site"
    report = json.loads((work / "global.json").read_text())
    assert report["mode"] == "dislocated"
    assert report["sites"] == {"defects": 2, "detector": 1}
    assert report["received_from"] == {"defects": ["generator"], "detector": ["arrays"]}
    assert report["site_updates"] == 2 and report["updates_were_weights_only"]
    assert {"image_AUROC", "defect_type_accuracy"} <= set(report["final_evaluate_metrics"])
    model = DADDA.load_from_checkpoint(work / "global.ckpt").eval()
    assert model.is_fitted()
    assert model.type_names == ["contamination", "hole", "scratch", "stain"]
    assert torch.isfinite(model.model.type_bias[:4]).all(), "the detector site's head names every type"


class TestSiteThreads:
    def test_simulated_sites_share_the_cores(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
        assert site_threads(2) == 8
        assert site_threads(3) == 5
        assert site_threads(40) == 1, "never zero threads"

    def test_zero_threads_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(SystemExit, match="--threads=0 must be 1 or more"):
            main(["simulate", "--root", str(tmp_path), "--category", "brick", "--threads", "0"])


class TestWhatLeavesASite:
    """The sites' ClientApp passes every reply through ``payload_audit`` (a Flower mod)."""

    @pytest.fixture
    def train_message(self, monkeypatch: pytest.MonkeyPatch) -> Message:
        for identity in ("_run_id", "_node_id", "_task_id"):
            monkeypatch.setattr(TaskIdentity, identity, 1)
        model = DADDA(**TINY_DADDA)
        settings = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_DADDA.items()}
        config = {"model": json.dumps(settings), "defect-types": "[]", "seed": 0, "server-round": 1}
        content = RecordDict({"arrays": array_record(state_dict_arrays(model)), "config": ConfigRecord(config)})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)

    def test_the_sites_app_audits_every_reply(self) -> None:
        assert payload_audit in client_app._mods

    def test_a_reply_with_an_image_never_leaves(self, train_message: Message) -> None:
        leaking = ClientApp(mods=[payload_audit])

        @leaking.train()
        def train(message: Message, _context: Context) -> Message:
            arrays = {name: array.numpy() for name, array in message.content["arrays"].items()}
            arrays["image"] = np.zeros((3, 64, 64), np.float32)  # a site's image, by mistake
            return Message(RecordDict({"arrays": array_record(arrays)}), reply_to=message)

        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        with pytest.raises(RuntimeError, match=r"Refusing to send 'arrays'.*\('image', \(3, 64, 64\)\)"):
            leaking(train_message, context)

    def test_an_evaluation_reply_carries_no_arrays(self, train_message: Message) -> None:
        """Scoring replies send metrics only: the weights the server sent may not go back with them."""
        evaluate_message = Message(content=train_message.content, message_type=MessageType.EVALUATE, dst_node_id=1)
        chatty = ClientApp(mods=[payload_audit])

        @chatty.evaluate()
        def evaluate(message: Message, _context: Context) -> Message:
            return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        with pytest.raises(RuntimeError, match=r"record 'arrays': only \[\] may leave a site here"):
            chatty(evaluate_message, context)

    def test_a_reply_of_weights_passes(self, train_message: Message) -> None:
        honest = ClientApp(mods=[payload_audit])

        @honest.train()
        def train(message: Message, _context: Context) -> Message:
            return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = honest(train_message, context)
        assert not reply.has_error()
