"""The frozen constraints that scripts/setup.sh installs with agree with the project's own pins.

A pin moved in pyproject.toml (or in setup.sh) without running scripts/freeze.sh would make pip
refuse the install on a fresh clone; these tests say so before CI does.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "scripts" / "constraints"


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[_norm(name)] = version
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_exact_pin_of_pyproject_is_the_frozen_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["dev"]
    frozen = _pins(CONSTRAINTS / "main.txt")
    exact = [re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^*;\s]+)$", s) for s in specs]
    exact = [m for m in exact if m]
    assert len(exact) >= 20  # torch, ray, the mm stack…: the parse found the pins
    wrong = {m[1]: (m[3], frozen.get(_norm(m[1]))) for m in exact if frozen.get(_norm(m[1])) != m[3]}
    assert not wrong, f"pyproject pin vs scripts/constraints/main.txt (run scripts/freeze.sh): {wrong}"


def test_the_side_environments_hold_what_their_setup_installs():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for venv, package, file in ((".venv-ls", "label-studio", "label-studio.txt"),
                                (".venv-mp", "mediapipe", "mediapipe.txt")):
        version = re.search(rf"side_venv {re.escape(venv)} (\S+) \w+ {re.escape(file)}", setup)
        assert version, f"setup.sh does not make {venv} from {file}"
        assert _pins(CONSTRAINTS / file)[package] == version[1]
    # sentry-sdk 3 drops an option Label Studio 1.23 passes, and the server then does not start.
    assert _pins(CONSTRAINTS / "label-studio.txt")["sentry-sdk"].startswith("2.")


def test_this_environment_was_installed_from_the_constraints():
    frozen = _pins(CONSTRAINTS / "main.txt")
    for name in ("torch", "ray", "numpy", "mmcv", "pydantic", "fastapi"):
        assert metadata.version(name).split("+")[0] == frozen[name], name
