"""The repository's shape: unique module names, modules a reader can hold in mind, no stale references.

Why unique basenames: two ``report.py`` or ``metrics.py`` make tracebacks, editor tabs and
review comments ambiguous, and hide which of them an import meant.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("o2n_edge", "export", "runtime", "benchmarks")
BASENAME_DIRS = SOURCE_DIRS + ("tests",)
NOT_MODULES = {"__init__.py", "conftest.py"}
MAX_LINES = 400
ISSUE_REF = re.compile(r"\bissues?[ -]#?\d+\b|(?<![\w&])#\d{2,}\b|DESIGN\.md", re.IGNORECASE)


def _py_files(dirs: tuple[str, ...]) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py")
                  if ".venv" not in p.parts and "__pycache__" not in p.parts)


def test_module_basenames_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for p in _py_files(BASENAME_DIRS):
        if p.name not in NOT_MODULES:
            seen[p.name].append(str(p.relative_to(ROOT)))
    dupes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not dupes, dupes


@pytest.mark.xfail(strict=False, reason="modules are still being split by the ongoing clean-up")
def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _py_files(SOURCE_DIRS)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.xfail(strict=False, reason="issue references are still being removed by the ongoing clean-up")
def test_code_cites_no_issue_numbers_or_design_notes() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _py_files(SOURCE_DIRS)
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ISSUE_REF.search(line)]
    assert not hits, "\n".join(hits[:50])
