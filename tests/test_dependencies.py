"""The dependency ranges in pyproject.toml exclude releases with published advisories
(these machines reach no vulnerability database: the floors are the guard)."""
from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
REQUIRED = {Requirement(r).name.lower(): Requirement(r).specifier
            for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}

# The newest release of each with a published advisory.
VULNERABLE = {"waitress": "3.0.1", "requests": "2.32.5", "urllib3": "2.6.3"}


@pytest.mark.parametrize("name,last_vulnerable", sorted(VULNERABLE.items()))
def test_floors_are_past_published_advisories(name, last_vulnerable):
    spec = REQUIRED[name]
    assert not spec.contains(last_vulnerable), f"{name} {spec} admits {last_vulnerable}"
    assert spec.contains(version(name)), f"the installed {name} {version(name)} is outside {spec}"
