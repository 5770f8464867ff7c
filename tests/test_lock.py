"""The locks agree with pyproject.toml, with each other, and with the environment under test."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, str]:
    return {canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", path.read_text(), re.M)}


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_requirement_is_pinned_within_its_range_and_hashed():
    lock = REPO / "requirements.lock"
    pinned = pins(lock)
    for req in project_requirements("test", "train", "eval", "bench"):
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(version, prereleases=True), \
            f"requirements.lock pins {req.name}=={version}, outside pyproject's {req.specifier}: run scripts/lock.sh"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    unhashed = [b.split()[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=sha256:" not in b]
    assert not unhashed, f"pins without a hash: {unhashed}"


def test_the_image_lock_pins_the_same_versions():
    dev, image = pins(REPO / "requirements.lock"), pins(REPO / "docker" / "requirements.lock")
    assert "torch" not in image  # the image installs its own torch build (TORCH_SPEC)
    for req in project_requirements():
        assert canonicalize_name(req.name) in image or req.name == "torch", f"{req.name} missing from the image lock"
    differ = {name: (version, dev.get(name)) for name, version in image.items() if dev.get(name) != version}
    assert not differ, f"the image lock and requirements.lock disagree (image, dev): {differ}"


def test_the_environment_under_test_is_exactly_the_lock():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        return  # another environment on purpose (scripts/check-latest.sh)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "venv_lock.py"), "check",
                             str(REPO / "requirements.lock"), "--verbose"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
