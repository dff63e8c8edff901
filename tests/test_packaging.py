"""Every Python package of the source tree ships in the wheel.

pyproject lists the packages explicitly (export/ and runtime/ are mapped folders), and an editable
install finds a package that is missing from that list anyway: only a fresh, non-editable install
shows the ModuleNotFoundError. This test catches it where everyone runs the tests.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {name: ROOT / folder for name, folder in config.get("package-dir", {}).items()}
    found = set()
    for init in (ROOT / "o2n_edge").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        found.add(".".join(rel.parts))
    for name, folder in mapped.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join((name, *rel.parts)) if rel.parts else name)
    return {p for p in found if "__pycache__" not in p}


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml (a fresh install lacks them): {missing}"
