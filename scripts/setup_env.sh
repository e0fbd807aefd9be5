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
# torch 2.14.1's x86_64 wheel brings its CUDA libraries: the installed set is about 7 GB, and pip unpacks beside it.
# Say so before pip fails half-way with "No space left on device".
if ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    free_kib="$(df -Pk "$venv" | awk 'NR == 2 {print $4}')"
    need_kib=$((9 * 1024 * 1024))
    if [ "$free_kib" -lt "$need_kib" ]; then
        echo "Not enough disk space for the tested dependency set: torch 2.14.1 with its CUDA libraries needs about" \
            "9 GB free while installing, $((free_kib / 1024 / 1024)) GB is free under $venv. Free some space, or" \
            "set ANOMALIB_DIFFUSION_VENV to a folder on a larger disk." >&2
        exit 1
    fi
fi
echo "==> Installing anomalib-diffusion with the tested dependency set (constraints.txt: torch 2.14.1, anomalib 2.7.0, ...)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# A regular (non-editable) install, as users get it: the .pth import hook comes from the wheel. pyproject.toml
# declares ranges; constraints.txt pins every package to the set the suite is run with.
"$venv/bin/python" -m pip install --quiet --progress-bar on -c "$repo/constraints.txt" "$repo[test]"
export PATH="$venv/bin:$PATH"
