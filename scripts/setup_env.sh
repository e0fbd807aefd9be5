#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install anomalib-diffusion into it with its test extra.
# Sourced by demo.sh and test.sh; safe to run again (pip skips what is already installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ANOMALIB_DIFFUSION_VENV:-$repo/.venv}"
python_bin="$(command -v python3.11 || command -v python3)"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "anomalib-diffusion needs Python 3.11 (torch 2.14.1 wheels); found $("$python_bin" --version)." >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "==> Creating virtual environment $venv"
    "$python_bin" -m venv "$venv"
fi
echo "==> Installing anomalib-diffusion with the tested dependency set (constraints.txt: torch 2.14.1, anomalib 2.7.0, ...)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# A regular (non-editable) install, as users get it: the .pth import hook comes from the wheel. pyproject.toml
# declares ranges; constraints.txt pins every package to the set the suite is run with.
"$venv/bin/python" -m pip install --quiet --progress-bar on -c "$repo/constraints.txt" "$repo[test]"
export PATH="$venv/bin:$PATH"
