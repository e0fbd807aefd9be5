"""The wheel is the product: build it, check its metadata and contents, and install it into a user's environment.

Run by ``.ci/run`` after the test suite, with the environment that ``scripts/setup_env.sh`` made::

    .venv/bin/python scripts/check_wheel.py

1. Builds the wheel with the standard build frontend (``python -m build --wheel``, an isolated build).
2. Checks its metadata: ``Requires-Python``, and that no runtime dependency is pinned to one version (exact pins
   belong in constraints.txt); and its contents: the ``.pth`` import hook at the top level, the anomalib configs
   under ``anomalib_diffusion/configs`` (the same files as ``configs/``), the Flower App folder, the console scripts.
3. Makes a *user's* environment that already has anomalib, torch and the rest (a fresh virtual environment that
   sees this environment's packages, without anomalib-diffusion), installs the wheel there with the package index
   switched off, and checks that pip wanted nothing but the plugin, that torch and anomalib are the ones the user
   had, that the console scripts work, and that the unchanged ``anomalib`` CLI resolves ``--model RADAR``, ``GLAD``
   and ``DADDA``.
"""

import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "anomalib-diffusion-demo-data",
    "anomalib-diffusion-predict",
    "anomalib-diffusion-openvino",
    "anomalib-diffusion-federated",
    "anomalib-diffusion-config",
)
FLOWER_APP = "anomalib_diffusion/federated/flower_app/"
# Extras whose pins are tools' versions, not the library's (see pyproject.toml).
TOOL_EXTRAS = {"test"}
# The `anomalib` console script's own entry point, as a user types `anomalib train --model NAME --print_config`.
CLI_CODE = """
import contextlib, io, sys
from anomalib.cli.cli import main
for name in ("RADAR", "GLAD", "DADDA"):
    sys.argv = ["anomalib", "train", "--model", name, "--print_config"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        try:
            main()
        except SystemExit as stop:
            assert stop.code in (0, None), (name, stop.code)
    lines = [line.strip() for line in output.getvalue().splitlines()]
    assert f"class_path: anomalib_diffusion.{name}" in lines, output.getvalue()[-2000:]
    print("resolved", name)
"""


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # noqa: S603
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"FAILED: {message}")
    print(f"ok  {message}")


def build_wheel(out: Path) -> Path:
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)])
    [wheel] = out.glob("anomalib_diffusion-*.whl")
    return wheel


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
        packaged = {
            Path(name).name: archive.read(name) for name in names if name.startswith("anomalib_diffusion/configs/")
        }
    check(metadata["Requires-Python"] == ">=3.11", f"Requires-Python is {metadata['Requires-Python']}")
    pinned = []
    for text in metadata.get_all("Requires-Dist"):
        requirement = Requirement(text)
        tool = requirement.marker is not None and any(
            requirement.marker.evaluate({"extra": extra}) for extra in TOOL_EXTRAS
        )
        if not tool and any(spec.operator in {"==", "==="} for spec in requirement.specifier):
            pinned.append(text)
    check(not pinned, f"no runtime dependency pinned to one version (pinned: {pinned})")
    check("anomalib_diffusion.pth" in names, "the .pth import hook is at the wheel's top level")
    shipped = {path.name: path.read_bytes() for path in (REPO / "configs").glob("*.yaml")}
    check(packaged == shipped, f"the wheel carries configs/ as anomalib_diffusion/configs ({len(packaged)} files)")
    missing = [script for script in SCRIPTS if re.search(rf"^{script} =", scripts, re.MULTILINE) is None]
    check(not missing, f"console scripts declared (missing: {missing})")
    app = sorted(name.removeprefix(FLOWER_APP) for name in names if name.startswith(FLOWER_APP))
    expected = sorted(
        str(path.relative_to(REPO / "src" / FLOWER_APP))
        for path in (REPO / "src" / FLOWER_APP).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )
    check(app == expected, f"the wheel carries the Flower App folder that `flwr run` takes ({app})")


def user_environment(folder: Path) -> tuple[Path, Path]:
    """A fresh venv that sees this environment's packages except anomalib-diffusion: a user's anomalib set-up.

    Returns its Python and its own site-packages folder.
    """
    overlay = folder / "existing_packages"
    overlay.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("anomalib_diffusion", "__editable__")):
            (overlay / entry.name).symlink_to(entry)
    env = folder / "user"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    # ensurepip's setuptools (older than torch requires) would shadow the environment's own.
    run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"])
    printed = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site_packages = Path(printed.stdout.strip())
    hook = site_packages / "00_existing_packages.pth"
    hook.write_text(f"import site; site.addsitedir({str(overlay)!r})\n")
    return python, site_packages


def versions(python: Path) -> dict[str, list[str]]:
    code = (
        "import json, importlib.metadata as m, torch, anomalib\n"
        "print(json.dumps({name: [m.version(name), module.__file__] "
        "for name, module in (('torch', torch), ('anomalib', anomalib))}))"
    )
    return json.loads(run([str(python), "-c", code]).stdout.strip().splitlines()[-1])


def install_and_use(wheel: Path, python: Path, site_packages: Path, folder: Path) -> None:
    before = versions(python)
    report = folder / "report.json"
    pip = [str(python), "-m", "pip", "install", "--no-index", "--quiet"]
    run([*pip, "--dry-run", "--report", str(report), str(wheel)])
    wanted = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    check(wanted == ["anomalib-diffusion"], f"pip wants only the plugin in an existing anomalib environment ({wanted})")
    run([*pip, str(wheel)])
    check(versions(python) == before, f"torch and anomalib are the user's own, unchanged ({before})")
    bin_dir = python.parent
    check(all((bin_dir / script).is_file() for script in SCRIPTS), "console scripts installed")
    printed = run([str(bin_dir / "anomalib-diffusion-config"), "radar"]).stdout
    check(printed == (REPO / "configs" / "radar.yaml").read_text(), "anomalib-diffusion-config radar prints the config")
    app_path = Path(run([str(bin_dir / "anomalib-diffusion-federated"), "app-path"]).stdout.strip())
    check((app_path / "pyproject.toml").is_file(), f"anomalib-diffusion-federated app-path prints the app ({app_path})")
    check((site_packages / "anomalib_diffusion.pth").is_file(), "the .pth hook is installed")
    resolved = run([str(python), "-c", CLI_CODE], cwd=folder).stdout
    check(resolved.split() == ["resolved", "RADAR", "resolved", "GLAD", "resolved", "DADDA"], "anomalib CLI --model")


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        wheel = build_wheel(folder / "dist")
        print(f"built {wheel.name}")
        check_wheel(wheel)
        install_and_use(wheel, *user_environment(folder), folder)
    print("The wheel checks passed.")


if __name__ == "__main__":
    main()
