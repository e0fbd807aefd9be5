"""The anomalib CLI configs this package ships, reachable from an installed wheel.

The wheel carries the repository's ``configs/`` folder as ``anomalib_diffusion/configs``::

    anomalib-diffusion-config                      # lists them
    anomalib-diffusion-config radar > radar.yaml   # prints one; then: anomalib train --config radar.yaml ...

From a source checkout (``PYTHONPATH=src``) the repository's ``configs/`` folder is read instead.
"""

import argparse
import sys
from collections.abc import Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path


def config_folder() -> Traversable:
    """The folder of shipped configs: inside the installed package, else the source checkout's ``configs/``."""
    packaged = files("anomalib_diffusion") / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def config_names() -> list[str]:
    """Names of the shipped configs (file stems, e.g. ``radar``, ``glad_demo``, ``benchmark``)."""
    return sorted(
        entry.name.removesuffix(".yaml") for entry in config_folder().iterdir() if entry.name.endswith(".yaml")
    )


def config_text(name: str) -> str:
    """The YAML text of a shipped config.

    Raises:
        ValueError: If no config has that name (the message lists them).
    """
    names = config_names()
    if name.removesuffix(".yaml") not in names:
        msg = f"No shipped config named {name!r}; choose one of: {', '.join(names)}."
        raise ValueError(msg)
    return (config_folder() / f"{name.removesuffix('.yaml')}.yaml").read_text()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="anomalib-diffusion-config",
        description="Print one of the anomalib configs shipped with anomalib-diffusion (without a name: list them).",
    )
    parser.add_argument("name", nargs="?", help="e.g. radar, glad_demo, dadda, benchmark")
    args = parser.parse_args(argv)
    if args.name is None:
        sys.stdout.write("\n".join(config_names()) + "\n")
        return
    try:
        sys.stdout.write(config_text(args.name))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
