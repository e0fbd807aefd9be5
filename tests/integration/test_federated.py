"""Federated D-ADDA with Flower: weight payloads, site splits, and real server and site processes on loopback."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from anomalib_diffusion.federated.cli import free_port, main, site_threads
from anomalib_diffusion.federated.sites import split_into_sites
from anomalib_diffusion.federated.weights import audit_payload, load_state_arrays, state_arrays
from anomalib_diffusion.models import DADDA
from tests.conftest import TINY_DADDA

TIMEOUT = 900
# Two local steps of each network per round keep a round to seconds.
FEDERATED_MODEL = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_DADDA.items()}
FEDERATED_MODEL |= {"generator_steps": 2, "detector_steps": 2}


def write_config(path: Path, rounds: int = 2) -> Path:
    config = {
        "federation": {"rounds": rounds, "join_timeout": 300.0},
        "site": {"defects_per_type": 1, "batch_size": 4},
        "model": FEDERATED_MODEL,
    }
    path.write_text(yaml.safe_dump(config))
    return path


class TestWeights:
    def test_round_trip_restores_every_weight_and_buffer(self) -> None:
        torch.manual_seed(0)
        source = DADDA(**TINY_DADDA)
        source.model.fitted.fill_(True)
        source.model.type_count.fill_(3)
        torch.manual_seed(1)
        target = DADDA(**TINY_DADDA)
        load_state_arrays(target, state_arrays(source))
        for (name, expected), actual in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=name)
        assert target.is_fitted()

    def test_averaged_integer_and_boolean_buffers_are_cast_back(self) -> None:
        model = DADDA(**TINY_DADDA)
        arrays = state_arrays(model)
        names = list(model.state_dict())
        arrays[names.index("model.type_count")] = np.array(2.6, dtype=np.float32)
        arrays[names.index("model.fitted")] = np.array(0.75, dtype=np.float32)
        load_state_arrays(model, arrays)
        assert model.model.type_count.dtype == torch.long and int(model.model.type_count) == 3
        assert model.is_fitted()

    def test_a_payload_with_an_image_is_refused(self) -> None:
        model = DADDA(**TINY_DADDA)
        with pytest.raises(RuntimeError, match=r"unexpected shapes: \[\(1, 3, 64, 64\)\]\)\. Only weights may leave"):
            audit_payload([*state_arrays(model), np.zeros((1, 3, 64, 64), np.float32)], model)

    def test_weights_of_another_model_shape_are_named(self) -> None:
        other = DADDA(**(TINY_DADDA | {"detector_width": 16}))
        with pytest.raises(ValueError, match=r"arrived with shape .* different settings"):
            load_state_arrays(DADDA(**TINY_DADDA), state_arrays(other))


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


def test_simulate_trains_two_sites_and_writes_an_exportable_global_model(demo_root: Path, tmp_path: Path) -> None:
    """The documented command: a real server process and two real site processes on loopback."""
    work = tmp_path / "federation"
    command = [sys.executable, "-m", "anomalib_diffusion.federated", "simulate", "--root", str(demo_root)]
    command += ["--category", "brick", "--sites", "2", "--rounds", "2", "--work-dir", str(work)]
    command += ["--config", str(write_config(tmp_path / "federated.yaml"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    logs = "\n".join(path.read_text()[-3000:] for path in sorted((work / "logs").glob("*.log")))
    assert result.returncode == 0, result.stderr + logs
    threads = site_threads(2)
    assert f"({threads} CPU thread(s) each)" in result.stdout
    for name in ("site_0", "site_1"):
        assert f"Site process: {threads} CPU thread(s) for torch." in (work / "logs" / f"{name}.log").read_text()
    report = json.loads((work / "global.json").read_text())
    assert report["site_updates"] == 4, "2 sites x 2 rounds"
    assert report["updates_were_weights_only"]
    assert report["defect_types"] == ["contamination", "hole", "scratch", "stain"]
    assert set(report["evaluate_metrics"]) >= {"image_AUROC", "pixel_AUROC"}
    model = DADDA.load_from_checkpoint(work / "global.ckpt").eval()
    assert model.is_fitted()
    assert model.type_names == report["defect_types"]
    exported = model.to_openvino(tmp_path / "export")
    assert exported.is_file()


class TestSiteThreads:
    def test_simulated_sites_share_the_cores(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
        assert site_threads(2) == 8
        assert site_threads(3) == 5
        assert site_threads(40) == 1, "never zero threads"

    def test_zero_threads_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(SystemExit, match="--threads=0 must be 1 or more"):
            main(["site", "--root", str(tmp_path), "--category", "brick", "--threads", "0"])


DROPPING_SITE = textwrap.dedent(
    """
    import os, sys, yaml
    from anomalib_diffusion.federated.flower import DADDASite, run_site

    class DroppingSite(DADDASite):
        def fit(self, parameters, config):
            os._exit(3)  # the site's process dies in the middle of round 1; its connection drops

    address, root, config_path = sys.argv[1:4]
    config = yaml.safe_load(open(config_path))
    run_site(address, DroppingSite(root, "brick", config["model"], 1, root + "_runs", batch_size=4))
    """
)


def test_a_site_dropping_out_mid_round_is_survived(demo_root: Path, tmp_path: Path) -> None:
    sites = split_into_sites(demo_root, "brick", 3, tmp_path / "sites")
    config = write_config(tmp_path / "federated.yaml")
    address = f"127.0.0.1:{free_port()}"
    base = [sys.executable, "-m", "anomalib_diffusion.federated"]
    types = sorted({name for site in sites for name in site.defect_types})
    server = subprocess.Popen(
        [
            *[*base, "server", "--address", address, "--sites", "3", "--min-sites", "2", "--rounds", "2"],
            *["--config", str(config), "--output", str(tmp_path / "global.ckpt"), "--defect-types", *types],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    clients = [
        subprocess.Popen(
            [
                *[*base, "site", "--address", address, "--root", str(site.root), "--category", "brick"],
                *["--config", str(config), "--work-dir", str(tmp_path / site.name)],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for site in sites[:2]
    ]
    dropping_log = (tmp_path / "dropping.log").open("w")
    dropping = subprocess.Popen(
        [sys.executable, "-c", DROPPING_SITE, address, str(sites[2].root), str(config)],
        stdout=dropping_log,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = server.communicate(timeout=TIMEOUT)
    finally:
        for process in [*clients, dropping]:
            if process.poll() is None:
                process.kill()
    assert server.returncode == 0, output[-4000:]
    assert dropping.wait() == 3, (tmp_path / "dropping.log").read_text()[-3000:]
    report = json.loads((tmp_path / "global.json").read_text())
    assert report["dropouts"] == {"1": 1}
    assert report["site_updates"] == 4, "round 1: the 2 remaining sites; round 2: the same 2"
    assert DADDA.load_from_checkpoint(tmp_path / "global.ckpt").is_fitted()
