#!/usr/bin/env bash
# One command from a fresh clone: set up ./.venv, install the package, run the whole test suite.
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k radar)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# One pytest-xdist worker per core, at most two (each trains models; tests/conftest.py keeps the tests that share a
# trained model on one worker). PYTEST_WORKERS=0 runs everything in this process.
workers="${PYTEST_WORKERS:-$(python -c 'import os; print(min(2, len(os.sched_getaffinity(0))))')}"
echo "==> Running the test suite ($workers worker(s))"
python -m pytest tests -p no:cacheprovider -n "$workers" "$@"
