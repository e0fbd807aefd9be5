"""``anomalib-diffusion-federated``: D-ADDA across sites that do not share images (Flower).

Three commands::

    # one machine, N simulated sites (each a real process on loopback), disjoint defect types
    anomalib-diffusion-federated simulate --root datasets/demo --category brick --sites 2 --rounds 3

    # separate machines: the server ...
    anomalib-diffusion-federated server --address 0.0.0.0:8080 --sites 2 --rounds 3 \\
        --defect-types crack hole scratch --output runs/federated/global.ckpt
    # ... and one site per factory, each with its own MVTec AD-layout folder
    anomalib-diffusion-federated site --address <server-host>:8080 --root /data/line4 --category brick

All three read the ``model`` (DADDA arguments), ``site`` and ``federation`` sections of
``--config`` (default: ``configs/dadda_federated.yaml`` settings built in); flags override it.
"""

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

DEFAULTS: dict[str, dict[str, Any]] = {
    "federation": {"rounds": 3, "min_sites": None, "join_timeout": 600.0, "round_timeout": None, "seed": 0},
    "site": {"defects_per_type": 3, "batch_size": 8},
    "model": {"generator_steps": 200, "detector_steps": 200},
}


def load_config(path: Path | None) -> dict[str, dict[str, Any]]:
    """The three sections, from the YAML file (if any) over the defaults."""
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    if path is None:
        return config
    if not path.is_file():
        msg = f"Federated config {path} does not exist (see configs/dadda_federated.yaml for the format)."
        raise FileNotFoundError(msg)
    loaded = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(loaded) - set(DEFAULTS))
    if unknown:
        msg = f"Unknown sections {unknown} in {path}; expected {sorted(DEFAULTS)}."
        raise ValueError(msg)
    for section, values in loaded.items():
        config[section].update(values or {})
    return config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anomalib-diffusion-federated", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server", help="run the FedAvg server")
    server.add_argument("--address", default="0.0.0.0:8080", help="host:port to listen on")
    server.add_argument("--sites", type=int, required=True, help="sites expected before round 1")
    server.add_argument("--min-sites", type=int, default=None, help="rounds continue while this many remain")
    server.add_argument("--rounds", type=int, default=None)
    server.add_argument("--defect-types", nargs="*", default=None, help="all sites' defect type names")
    server.add_argument("--output", type=Path, default=Path("runs/federated/global.ckpt"))
    site = commands.add_parser("site", help="run one site (a Flower client) on its own data folder")
    site.add_argument("--address", default="127.0.0.1:8080", help="the server's host:port")
    site.add_argument("--root", type=Path, required=True, help="this site's MVTec AD-layout folder")
    site.add_argument("--category", required=True)
    site.add_argument("--defects-per-type", type=int, default=None, help="real defects per type lent to training")
    site.add_argument("--work-dir", type=Path, default=Path("runs/federated/site"))
    site.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    simulate = commands.add_parser("simulate", help="server and N site processes on this machine")
    simulate.add_argument("--root", type=Path, required=True, help="an MVTec AD-layout data set")
    simulate.add_argument("--category", required=True)
    simulate.add_argument("--sites", type=int, default=2)
    simulate.add_argument("--rounds", type=int, default=None)
    simulate.add_argument("--work-dir", type=Path, default=Path("runs/federated"))
    simulate.add_argument(
        "--threads", type=int, default=None, help="CPU threads per site process (default: the cores / --sites)"
    )
    for sub in (server, site, simulate):
        sub.add_argument("--config", type=Path, default=None, help="federated YAML (model, site, federation)")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        msg = 'Federated D-ADDA needs Flower, which is not installed: pip install "anomalib-diffusion[federated]".'
        raise SystemExit(msg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    require_flower()
    federation, site_settings, model = config["federation"], config["site"], config["model"]
    if args.command == "server":
        from .flower import run_server

        report = run_server(
            args.address,
            args.rounds or federation["rounds"],
            model,
            expected_sites=args.sites,
            min_sites=args.min_sites or federation["min_sites"] or args.sites,
            output=args.output,
            defect_types=args.defect_types,
            join_timeout=float(federation["join_timeout"]),
            round_timeout=federation["round_timeout"],
            seed=int(federation["seed"]),
        )
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "site":
        if args.threads is not None:
            import torch

            torch.set_num_threads(_positive_threads(args.threads))
            print(f"Site process: {torch.get_num_threads()} CPU thread(s) for torch.", flush=True)
        from .flower import DADDASite, run_site

        k = args.defects_per_type if args.defects_per_type is not None else site_settings["defects_per_type"]
        site = DADDASite(
            args.root,
            args.category,
            model,
            defects_per_type=int(k),
            work_dir=args.work_dir,
            batch_size=int(site_settings["batch_size"]),
            seed=int(federation["seed"]),
        )
        run_site(args.address, site)
        return 0
    return simulate(args, config)


def simulate(args: argparse.Namespace, config: dict[str, dict[str, Any]]) -> int:
    """Split the data into site folders, then run the server and every site as separate processes on loopback."""
    from .sites import split_into_sites

    work = Path(args.work_dir)
    sites = split_into_sites(
        args.root, args.category, args.sites, work / "data", seed=int(config["federation"]["seed"])
    )
    types = sorted({name for site in sites for name in site.defect_types})
    config_path = work / "federated.yaml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    # Every site trains at once: without a share each torch would take every core and oversubscribe them.
    threads = _positive_threads(args.threads) if args.threads is not None else site_threads(len(sites))
    base = [sys.executable, "-m", "anomalib_diffusion.federated"]
    rounds = str(args.rounds or config["federation"]["rounds"])
    server_command = [*base, "server", "--address", address, "--sites", str(len(sites)), "--rounds", rounds]
    server_command += ["--config", str(config_path), "--output", str(work / "global.ckpt"), "--defect-types", *types]
    print(
        f"Federation of {len(sites)} sites on {address} ({threads} CPU thread(s) each): "
        + "; ".join(f"{s.name}: {', '.join(s.defect_types)}" for s in sites)
    )
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = {"server": _start(server_command, logs / "server.log")}
    for site in sites:
        command = [*base, "site", "--address", address, "--root", str(site.root), "--category", args.category]
        command += ["--config", str(config_path), "--work-dir", str(work / "runs" / site.name)]
        command += ["--threads", str(threads)]
        processes[site.name] = _start(command, logs / f"{site.name}.log")
    failed = _wait_all(processes, logs / "server.log", int(rounds))
    if failed:
        print(f"Federation failed: {', '.join(failed)} exited with an error; see {logs}/<name>.log.", file=sys.stderr)
        return 1
    print(f"Global model: {work / 'global.ckpt'}; history: {work / 'global.json'}; logs: {logs}")
    return 0


def site_threads(sites: int) -> int:
    """CPU threads per simulated site so that all sites together use the machine's cores once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, sites))


def _positive_threads(threads: int) -> int:
    if threads < 1:
        msg = f"--threads={threads} must be 1 or more."
        raise SystemExit(msg)
    return threads


def _wait_all(processes: dict[str, subprocess.Popen], server_log: Path, rounds: int) -> list[str]:
    """Wait for every process (a progress bar follows the server's rounds); if one fails, stop the others."""
    # disable=None: no bar when stderr is not a terminal (a log file would get a line per poll).
    with tqdm(total=rounds, desc="Federated rounds", unit="round", disable=None) as progress:
        while any(process.poll() is None for process in processes.values()):
            started = server_log.read_text(errors="replace").count("[ROUND ") if server_log.is_file() else 0
            progress.update(max(0, min(started - 1, rounds) - progress.n))
            failed = [name for name, process in processes.items() if process.poll() not in (None, 0)]
            if failed:
                for process in processes.values():
                    if process.poll() is None:
                        process.kill()
                break
            time.sleep(0.5)
        if all(process.poll() == 0 for process in processes.values()):
            progress.update(rounds - progress.n)
    for process in processes.values():
        process.wait()
    return [name for name, process in processes.items() if process.returncode not in {0, -signal.SIGKILL}]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)  # noqa: S603


if __name__ == "__main__":
    raise SystemExit(main())
