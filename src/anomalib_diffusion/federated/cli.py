"""``anomalib-diffusion-federated``: D-ADDA across sites that do not share images, on Flower's engines.

Commands::

    # one machine: split a data set into N sites, run them on Flower's simulation engine
    anomalib-diffusion-federated simulate --root datasets/demo --category brick --sites 2 --rounds 3

    # separate machines (docs/dadda.md): certificates and site keys, then flower-superlink / flower-supernode,
    # then submit the run to the SuperLink and follow it to the end (exits 1 unless it completed)
    anomalib-diffusion-federated credentials --output certs --hosts server.example.com --sites line4 line7
    anomalib-diffusion-federated submit factory --defect-types crack hole scratch --output /srv/dadda/global.ckpt

    anomalib-diffusion-federated run-config --defect-types crack hole > run.toml   # for a plain `flwr run`
    anomalib-diffusion-federated app-path                                          # the Flower App folder
    anomalib-diffusion-federated split --root datasets/demo --category brick --sites 2 --output sites

``simulate``, ``submit`` and ``run-config`` read the ``model``, ``site`` and ``federation`` sections of
``--config`` (default: the settings of ``configs/dadda_federated.yaml``, built in); flags override it.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

APP_PATH = Path(__file__).parent / "flower_app"
DEFAULTS: dict[str, dict[str, Any]] = {
    "federation": {
        "rounds": 3,
        "min_sites": None,
        "join_timeout": 600.0,
        "round_timeout": None,
        "seed": 0,
        "evaluate_each_round": True,
        "mode": "together",
    },
    "site": {"defects_per_type": 3, "batch_size": 8},
    "model": {"generator_steps": 200, "detector_steps": 200},
}
# Flower settings for machines behind a firewall: no usage reports, no update check, and no `uv sync` of the app's
# dependencies at each run (anomalib-diffusion[federated] is installed on every machine instead).
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
POLL_SECONDS = 3.0


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


def run_config(
    config: dict[str, dict[str, Any]],
    defect_types: Sequence[str],
    output: Path | str,
    rounds: int | None = None,
    sites: int | None = None,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """The Flower run config (``[tool.flwr.app.config]`` keys) of a federated YAML config and the flags."""
    federation, site = config["federation"], config["site"]
    expected = sites or 0
    least = min_sites or federation["min_sites"] or expected or 2
    return {
        "num-server-rounds": int(rounds or federation["rounds"]),
        "min-sites": int(least),
        "expected-sites": int(expected),
        "join-timeout": float(federation["join_timeout"]),
        "round-timeout": float(federation["round_timeout"] or 0.0),
        "seed": int(federation["seed"]),
        "evaluate-each-round": bool(federation["evaluate_each_round"]),
        "mode": str(federation["mode"]),
        "defect-types": ",".join(defect_types),
        "model": json.dumps(config["model"]),
        "output": str(Path(output).absolute()),
        "defects-per-type": int(site["defects_per_type"]),
        "batch-size": int(site["batch_size"]),
    }


def write_toml(values: dict[str, Any], path: Path) -> Path:
    import tomli_w  # Flower's dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anomalib-diffusion-federated", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser("simulate", help="N sites on one machine, on Flower's simulation engine")
    simulate.add_argument("--root", type=Path, required=True, help="an MVTec AD-layout data set")
    simulate.add_argument("--category", required=True)
    simulate.add_argument("--sites", type=int, default=2)
    simulate.add_argument("--rounds", type=int, default=None)
    simulate.add_argument("--work-dir", type=Path, default=Path("runs/federated"))
    simulate.add_argument(
        "--threads", type=int, default=None, help="CPU threads per simulated site (default: the cores / sites)"
    )
    simulate.add_argument(
        "--dislocated",
        action="store_true",
        help="--sites defect sites train the generator only; one more site, with normal images only, the detector",
    )
    submit = commands.add_parser("submit", help="submit a run to a SuperLink and follow it until it ends")
    submit.add_argument("connection", help="the SuperLink connection's name in $FLWR_HOME/config.toml")
    configure = commands.add_parser("run-config", help="print the run config (TOML) for `flwr run --run-config`")
    for sub in (submit, configure):
        sub.add_argument("--sites", type=int, default=None, help="sites round 1 waits for (default: --min-sites)")
        sub.add_argument("--min-sites", type=int, default=None, help="rounds go on while this many answer")
        sub.add_argument("--rounds", type=int, default=None)
        sub.add_argument("--defect-types", nargs="*", default=[], help="all sites' defect type names (names only)")
        sub.add_argument(
            "--output", type=Path, default=Path("runs/federated/global.ckpt"), help="global model, on the server"
        )
    for sub in (simulate, submit, configure):
        sub.add_argument("--config", type=Path, default=None, help="federated YAML (model, site, federation)")
    credentials = commands.add_parser("credentials", help="a CA, the SuperLink's TLS certificate, site key pairs")
    credentials.add_argument("--output", type=Path, required=True, help="a new folder")
    credentials.add_argument("--hosts", nargs="*", default=[], help="the SuperLink's host names / IP addresses")
    credentials.add_argument("--sites", nargs="+", required=True, help="one name per site (each gets a key pair)")
    split = commands.add_parser("split", help="split an MVTec AD-layout category into site folders")
    split.add_argument("--root", type=Path, required=True)
    split.add_argument("--category", required=True)
    split.add_argument("--sites", type=int, default=2)
    split.add_argument("--output", type=Path, required=True)
    split.add_argument("--seed", type=int, default=0)
    commands.add_parser("app-path", help="print the Flower App folder that `flwr run` takes")
    return parser.parse_args(argv)


def require_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        msg = 'Federated D-ADDA needs Flower, which is not installed: pip install "anomalib-diffusion[federated]".'
        raise SystemExit(msg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: the message names the fix
        raise SystemExit(f"anomalib-diffusion-federated {args.command}: {error}") from error


def run_command(args: argparse.Namespace) -> int:
    if args.command == "app-path":
        print(APP_PATH)
        return 0
    if args.command == "credentials":
        from .security import make_credentials

        output = make_credentials(args.output, args.hosts, args.sites)
        print(
            f"Wrote {output}: ca.crt (to every site), server.pem/server.key (SuperLink only), ca.key (store offline),"
        )
        print("and per site <name>.key (that site only) and <name>.pub (register: flwr supernode register).")
        return 0
    if args.command == "split":
        from .sites import split_into_sites

        for site in split_into_sites(args.root, args.category, args.sites, args.output, seed=args.seed):
            print(f"{site.root}: {', '.join(site.defect_types)}")
        return 0
    config = load_config(args.config)
    if args.command == "run-config":
        values = run_config(config, args.defect_types, args.output, args.rounds, args.sites, args.min_sites)
        import tomli_w

        print(tomli_w.dumps(values), end="")
        return 0
    require_flower()
    if args.command == "submit":
        values = run_config(config, args.defect_types, args.output, args.rounds, args.sites, args.min_sites)
        with tempfile.TemporaryDirectory(prefix="dadda-run-") as folder:
            status = submit_run(args.connection, write_toml(values, Path(folder) / "run.toml"), flower_environment())
        return report_status(status, args.output)
    return simulate(args, config)


def flower_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment with Flower's offline settings (and ``FLWR_HOME`` if given)."""
    environment = dict(os.environ)
    for name, value in FLOWER_ENVIRONMENT.items():
        environment.setdefault(name, value)
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH.
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    if flwr_home is not None:
        environment["FLWR_HOME"] = str(flwr_home)
    return environment


def flower_program(name: str) -> str:
    """A Flower command (``flwr``, ``flower-superlink``) of this environment."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        msg = f'`{name}` is not installed in this environment: pip install "anomalib-diffusion[federated]".'
        raise SystemExit(msg)
    return found


def submit_run(
    connection: str,
    run_config_path: Path,
    environment: dict[str, str],
    federation_config: str | None = None,
    app: Path = APP_PATH,
) -> dict[str, Any]:
    """``flwr run`` the app on ``connection``, stream its log until it ends; return the run's ``flwr ls`` entry.

    ``flwr run --stream`` exits 0 even when the run fails, so the outcome is read from ``flwr ls``.
    """
    flwr = flower_program("flwr")
    command = [flwr, "run", str(app), connection, "--run-config", str(run_config_path), "--format", "json"]
    if federation_config:
        command += ["--federation-config", federation_config]
    started = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)  # noqa: S603
    try:
        run_id = str(json.loads(started.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError) as error:
        msg = f"`flwr run` did not start a run on {connection!r}:\n{started.stdout}{started.stderr}"
        raise SystemExit(msg) from error
    print(f"Flower run {run_id} started on {connection!r}; following its log.", flush=True)
    subprocess.run([flwr, "log", run_id, connection, "--stream"], env=environment, check=False)  # noqa: S603
    while True:
        listed = subprocess.run(  # noqa: S603
            [flwr, "ls", connection, "--run-id", run_id, "--format", "json"],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            status = json.loads(listed.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            status = {"status": "unknown", "status-details": listed.stdout + listed.stderr}
        if str(status.get("status", "")).startswith("finished"):
            return status
        time.sleep(POLL_SECONDS)


def report_status(status: dict[str, Any], output: Path) -> int:
    if status.get("status") != "finished:completed":
        print(
            f"The federated run did not complete: {status.get('status')}: {status.get('status-details')}",
            file=sys.stderr,
        )
        return 1
    print(f"Federated run completed; the global model is {output} (report {Path(output).with_suffix('.json')}).")
    return 0


def simulate(args: argparse.Namespace, config: dict[str, dict[str, Any]]) -> int:
    """Split the data into site folders and run them on Flower's simulation engine (a SuperLink of its own)."""
    from .sites import split_into_sites

    work = Path(args.work_dir).absolute()
    threads = (
        _positive_threads(args.threads) if args.threads is not None else site_threads(args.sites + args.dislocated)
    )
    if args.dislocated:
        config["federation"]["mode"] = "dislocated"
    dislocated = config["federation"]["mode"] == "dislocated"
    seed = int(config["federation"]["seed"])
    sites = split_into_sites(args.root, args.category, args.sites, work / "data", seed=seed, detector_site=dislocated)
    types = sorted({name for site in sites for name in site.defect_types})
    defect_sites = len(sites) - int(dislocated)
    values = run_config(config, types, work / "global.ckpt", args.rounds, len(sites), defect_sites)
    values |= {"sites-root": str(work / "data"), "category": args.category, "threads": threads}
    values |= {"detector-site": len(sites) - 1 if dislocated else -1}
    run_config_path = write_toml(values, work / "run_config.toml")
    print(
        f"Federation of {len(sites)} simulated sites ({threads} CPU thread(s) each): "
        + "; ".join(
            f"{s.name}: {', '.join(s.defect_types) or 'normal images only, trains the detector'}" for s in sites
        ),
        flush=True,
    )
    flwr_home = work / "flower"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = flower_environment(flwr_home)
    port = free_port()
    write_toml(
        {"superlink": {"default": "simulation", "simulation": {"address": f"127.0.0.1:{port}", "insecure": True}}},
        flwr_home / "config.toml",
    )
    # A plain `kill` of this command still stops the SuperLink it started (its helpers follow their parent).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    superlink_command = [flower_program("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    superlink_command += ["--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    with (logs / "superlink.log").open("w") as log:
        superlink = subprocess.Popen(superlink_command, env=environment, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_for_port(port, superlink, logs / "superlink.log")
        cpus = max(1, min(threads, site_threads(1)))
        status = submit_run(
            "simulation", run_config_path, environment, f"num-supernodes={len(sites)} client-resources-num-cpus={cpus}"
        )
    finally:
        superlink.terminate()
        try:
            superlink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            superlink.kill()
    return report_status(status, work / "global.ckpt")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Wait until a process we started listens on ``port`` (or fail with its log)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"{Path(str(process.args[0])).name} exited with code {process.returncode}; see {log}."
            raise SystemExit(msg)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    msg = f"Nothing listens on port {port} after {timeout:.0f} s; see {log}."
    raise SystemExit(msg)


def site_threads(sites: int) -> int:
    """CPU threads per simulated site so that all sites together use the machine's cores once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, sites))


def _positive_threads(threads: int) -> int:
    if threads < 1:
        msg = f"--threads={threads} must be 1 or more."
        raise SystemExit(msg)
    return threads


if __name__ == "__main__":
    raise SystemExit(main())
