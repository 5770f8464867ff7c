#!/usr/bin/env bash
# Set up (once) and run the whole test suite: tiny random models, the real SmolLM2,
# real redis-server and uvicorn processes started by the tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
