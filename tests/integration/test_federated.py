"""Federated D-ADDA on Flower's two engines, with real processes: the simulation engine (``simulate``) and the
deployment engine (``flower-superlink`` with TLS and node authentication, ``flower-supernode`` per site, the run
submitted with ``anomalib-diffusion-federated submit``), plus site splits and the audit of what leaves a site."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from anomalib_diffusion.federated.apps import array_record, client_app, payload_audit
from anomalib_diffusion.federated.cli import FLOWER_ENVIRONMENT, free_port, main, site_threads
from anomalib_diffusion.federated.security import make_credentials
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

    def test_a_reply_of_weights_passes(self, train_message: Message) -> None:
        honest = ClientApp(mods=[payload_audit])

        @honest.train()
        def train(message: Message, _context: Context) -> Message:
            return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        reply = honest(train_message, context)
        assert not reply.has_error()


# -- the deployment engine, on loopback ----------------------------------------------------------


class Processes:
    """Processes a test starts (each in its own session, so a kill takes its children); all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], environment: dict[str, str]) -> subprocess.Popen:
        handle = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            command, env=environment, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        process = self.started[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.started.items():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill(name)

    def logs_tail(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}" for path in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Processes(logs)
    yield started
    started.stop_all()


def wait_for(condition: object, timeout: float, what: str, processes: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out waiting for {what}.\n{processes.logs_tail()}")
        time.sleep(1.0)


def test_a_secure_deployment_refuses_an_unknown_node_and_survives_a_site_dropping_out(
    demo_root: Path, tmp_path: Path, processes: Processes
) -> None:
    """SuperLink with TLS and node authentication, three registered sites and one intruder; one site dies mid-round.

    The intruder (a SuperNode whose key was never registered) is refused; the run completes with the two sites
    that stay, and its global model names every type those two held.
    """
    sites = split_into_sites(demo_root, "brick", 3, tmp_path / "sites")
    credentials = make_credentials(tmp_path / "certs", ["localhost"], [site.name for site in sites] + ["intruder"])
    port = free_port()
    server_home = tmp_path / "server_home"
    server_home.mkdir()
    (server_home / "config.toml").write_text(
        f'[superlink]\ndefault = "factory"\n\n[superlink.factory]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{credentials / "ca.crt"}"\n'
    )
    server_environment = flower_environment(server_home)
    processes.start(
        "superlink",
        [
            *[str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(credentials / "ca.crt")],
            *["--ssl-certfile", str(credentials / "server.pem"), "--ssl-keyfile", str(credentials / "server.key")],
            *["--enable-supernode-auth", "--disable-runtime-dependency-installation", "--isolation", "subprocess"],
            *["--host", "127.0.0.1", "--port", str(port)],
        ],
        server_environment,
    )
    flwr = str(BIN / "flwr")

    def register(name: str) -> bool:
        result = subprocess.run(
            [flwr, "supernode", "register", str(credentials / f"{name}.pub"), "factory", "--format", "json"],
            env=server_environment,
            capture_output=True,
            text=True,
            check=False,
        )
        return result.returncode == 0 and json.loads(result.stdout or "{}").get("success", False)

    wait_for(lambda: register(sites[0].name), 120, "the SuperLink to accept a registration", processes)
    for site in sites[1:]:
        assert register(site.name)

    def supernode(name: str, data_root: Path | None) -> None:
        home = tmp_path / f"{name}_home"
        home.mkdir()
        command = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}"]
        command += ["--root-certificates", str(credentials / "ca.crt")]
        command += ["--auth-supernode-private-key", str(credentials / f"{name}.key")]
        command += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port())]
        if data_root is not None:
            node_config = f'data-root="{data_root}" category="brick" threads=1 work-dir="{tmp_path / name / "runs"}"'
            command += ["--node-config", node_config]
        processes.start(name, command, flower_environment(home))

    for site in sites:
        supernode(site.name, site.root)
    supernode("intruder", sites[0].root)
    wait_for(lambda: processes.started["intruder"].poll() is not None, 120, "the intruder to be refused", processes)
    assert processes.started["intruder"].returncode != 0
    assert "Failed to activate SuperNode" in processes.log("intruder")
    assert "No SuperNode found with the given public key" in processes.log("superlink")

    config = write_config(tmp_path / "federated.yaml", rounds=1, evaluate_each_round=False)
    submit = [sys.executable, "-m", "anomalib_diffusion.federated", "submit", "factory", "--config", str(config)]
    submit += ["--sites", "3", "--min-sites", "2", "--defect-types", "contamination", "hole", "scratch", "stain"]
    submit += ["--output", str(tmp_path / "global.ckpt")]
    submitted = processes.start("submit", submit, server_environment)
    # The third site dies while it trains in round 1 (its machine goes down: SuperNode and ClientApp with it).
    dropping = sites[2].name
    wait_for(
        lambda: "round 1, training locally" in processes.log(dropping), 600, "round 1 at the third site", processes
    )
    processes.kill(dropping)
    try:
        submitted.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"The run did not end.\n{processes.logs_tail()}")
    assert submitted.returncode == 0, processes.logs_tail()
    report = json.loads((tmp_path / "global.json").read_text())
    assert report["dropouts"] == {"1": 1}, processes.logs_tail()
    assert report["site_updates"] == 2
    assert report["type_head"]["sites"] == 2
    held = {name for site in sites[:2] for name in site.defect_types}
    named = {name for name, count in report["type_head"]["defects_per_type"].items() if count > 0}
    assert named == held, "the head names exactly the types the two remaining sites held"
    model = DADDA.load_from_checkpoint(tmp_path / "global.ckpt").eval()
    assert model.is_fitted()
    missing = [model.type_names.index(name) for name in sorted(set(model.type_names) - held)]
    assert torch.isinf(model.model.type_bias[missing]).all(), "a type no remaining site held is never named"
