#!/usr/bin/env bash
# Set up (once) and run the whole test suite: tiny random models, the real SmolLM2,
# real redis-server and uvicorn processes started by the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the slowest tests, so the suite's time (kept under 15 min on 2 cores) is watched in every CI log
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
