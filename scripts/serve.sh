#!/usr/bin/env bash
# Set up (once) and run the server on its embedded default: SmolLM2-135M-Instruct and a
# local redis-server that it starts and owns. Extra arguments go to `prefix-serve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/prefix-serve serve "$@"
