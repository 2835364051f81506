"""environment.yml and pyproject.toml list the same dependencies (the dev extra included), and
torch is pinned."""

from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_environment_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [p for p in pip if not p.startswith("-")]
    assert sorted(listed) == sorted(deps)
    assert "torch==2.13.0" in deps


def test_constraints_pin_torch():
    lines = (REPO / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
