#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv, install the package, run the whole test suite.
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k radar)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
echo "==> Running the test suite"
python -m pytest tests -p no:cacheprovider "$@"
