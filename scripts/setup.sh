#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: redis-server (and prometheus and haproxy for
# the observability tests) from apt, and a virtual environment in .venv holding exactly the
# packages of requirements.lock (exact versions, sha256-checked, torch the CPU build from
# local disk) plus the project itself, editable.
#
# Each run checks .venv against the lock and syncs it when they differ: a package at another
# version is reinstalled from the lock, and one the lock does not name is removed. Refresh
# the lock with `bash scripts/lock.sh` (see README, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
if [ "${PREFIX_SERVE_SETUP_PROMETHEUS:-1}" = 1 ]; then
  command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # The Debian packages start system services; prefix-serve starts its own on loopback.
  $SUDO systemctl disable --now redis-server prometheus haproxy >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python scripts/venv_lock.py check requirements.lock; then
  echo "setup.sh: syncing .venv with requirements.lock" >&2
  .venv/bin/python -m pip install -q --no-deps --require-hashes -r requirements.lock
  # --no-build-isolation: build with the locked setuptools instead of fetching one
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  .venv/bin/python scripts/venv_lock.py stamp
  extra=$(.venv/bin/python scripts/venv_lock.py extra requirements.lock)
  [ -z "$extra" ] || .venv/bin/python -m pip uninstall -q -y $extra
  .venv/bin/python scripts/venv_lock.py check requirements.lock --verbose
fi

# A first start converts the embedded model (~15 s) and compiles the CPU kernels (~30 s).
# Both are done here, once per machine, so that no server start and no test pays for them
# under its own deadline. Each is a no-op when its result is already in the cache.
.venv/bin/python -c "
from server.engine.model_loader import ensure_default_model
from kernels import cpu_ops
ensure_default_model()
cpu_ops.ops()
"
