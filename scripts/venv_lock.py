"""Compare the running virtual environment with a lock file (standard library only).

    python scripts/venv_lock.py check requirements.lock [--verbose]
        exit 0 when every package the lock pins is installed at exactly its version, no
        other package is installed (pip and the project itself aside), and the project was
        installed from the current pyproject.toml; else exit 1 (with --verbose: say why)
    python scripts/venv_lock.py extra requirements.lock
        print the installed packages that the lock does not name (to uninstall)
    python scripts/venv_lock.py stamp
        record that the project was installed from the current pyproject.toml

scripts/setup.sh runs `check`, and syncs the environment when it fails.
"""

from __future__ import annotations

import hashlib
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "prefix-serve"
ALWAYS_ALLOWED = {PROJECT}
STAMP = Path(sys.prefix) / ".prefix-serve-pyproject"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            out[normalize(m.group(1))] = m.group(2)
    return out


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def problems(lock: Path) -> list[str]:
    want, have = pins(lock), installed()
    out = [f"{name}: lock pins {version}, installed {have.get(name, 'nothing')}"
           for name, version in sorted(want.items()) if have.get(name) != version]
    out += [f"{name} {version}: installed, not in the lock" for name, version in sorted(have.items())
            if name not in want and name not in ALWAYS_ALLOWED]
    if PROJECT not in have:
        out.append(f"{PROJECT}: not installed")
    elif not STAMP.exists() or STAMP.read_text().strip() != pyproject_digest():
        out.append(f"{PROJECT}: installed from another pyproject.toml")
    return out


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "stamp":
        STAMP.write_text(pyproject_digest() + "\n")
        return 0
    if command not in ("check", "extra") or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    lock = Path(argv[1])
    if command == "extra":
        want = pins(lock)
        print(" ".join(sorted(n for n in installed() if n not in want and n not in ALWAYS_ALLOWED)))
        return 0
    found = problems(lock)
    if found and "--verbose" in argv:
        print(f"{sys.prefix} differs from {lock}:\n  " + "\n  ".join(found[:20]), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
