"""Federated D-ADDA on Flower's deployment engine, with real processes on loopback: ``flower-superlink`` with TLS and
node authentication, one ``flower-supernode`` per site (and an intruder without a registered key), the run submitted
with ``anomalib-diffusion-federated submit``, and a site whose machine goes down mid-round."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from anomalib_diffusion.federated.cli import free_port
from anomalib_diffusion.federated.security import make_credentials
from anomalib_diffusion.federated.sites import split_into_sites
from anomalib_diffusion.models import DADDA
from tests.integration.test_federated import BIN, TIMEOUT, flower_environment, write_config

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
