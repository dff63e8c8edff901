"""The repository's shape: unique module names, modules a reader can hold in mind, no stale references.

Why unique basenames: two ``report.py`` or ``metrics.py`` make tracebacks, editor tabs and
review comments ambiguous, and hide which of them an import meant. Why no issue numbers or design
notes in code: the code outlives the tracker and the notes, and a reader of the file has neither;
the reason belongs in the docstring. An upstream project's issue is fine, written with its name
(``microsoft/onnxruntime#26996`` or ``onnxruntime issue 26996``): that reference stays valid.
Why the documents are checked too: commands and links in them are what a reader copies first.
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
# "issue 12", "issues #3": flagged unless the word before names an upstream project.
ISSUE_WORDS = re.compile(r"(?:(\S+)\s+)?\bissues?[ -]#?\d+\b", re.IGNORECASE)
UPSTREAM = {"onnxruntime", "pytorch", "torch", "tensorrt", "triton", "diffusers", "transformers", "open_clip",
            "timm", "onnx", "onnxslim", "numpy", "pillow", "fastapi", "uvicorn", "kserve", "github"}
# "#12" on its own; not "owner/repo#12" (a word before it), HTML entities, or CSS colours ("color:#222").
HASH_REF = re.compile(r"(?<![\w&:\"'#])#\d{2,}\b")
DESIGN_NOTE = re.compile(r"DESIGN\.md", re.IGNORECASE)
DOCS = ("README.md", "benchmarks/README.md", "benchmarks/results/README.md")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
STUDY_COMMAND = re.compile(r"python -m benchmarks\.(\w+)")


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


def cites_project_issue(line: str) -> bool:
    """True when ``line`` names an issue or design note of this project (see the module docstring)."""
    for m in ISSUE_WORDS.finditer(line):
        words = re.findall(r"[\w/.-]+", m.group(1) or "")  # the last one: 'f"onnxruntime' -> onnxruntime
        name = words[-1].lower() if words else ""
        if name not in UPSTREAM and "/" not in name:  # owner/repo names its project too
            return True
    return bool(HASH_REF.search(line) or DESIGN_NOTE.search(line))


def _markdown_files() -> list[Path]:
    return [ROOT / d for d in DOCS] + sorted((ROOT / "docs").rglob("*.md"))


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _py_files(SOURCE_DIRS)
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_code_cites_no_issue_numbers_or_design_notes() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _py_files(SOURCE_DIRS)
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if cites_project_issue(line)]
    assert not hits, "\n".join(hits[:50])


@pytest.mark.parametrize(("line", "flagged"), [
    ("see issue 12 for why", True), ("(issues #3, #4)", True), ("fixed in #123", True), ("per DESIGN.md", True),
    ("onnxruntime issue 26996)", False), ('f"(onnxruntime issue 26996)")', False),
    ("microsoft/onnxruntime issue 26996", False), ("microsoft/onnxruntime#26996", False),
    ("body{color:#222;padding:0}", False), ('{"color": "#555555"}', False), ("&#8212;", False),
])
def test_issue_reference_check_is_precise(line: str, flagged: bool) -> None:
    assert cites_project_issue(line) is flagged


def test_documented_study_commands_exist() -> None:
    """Every ``python -m benchmarks.X`` in the README and docs names a study that exists."""
    missing = [f"{md.relative_to(ROOT)}: benchmarks.{name}" for md in _markdown_files()
               for name in STUDY_COMMAND.findall(md.read_text(encoding="utf-8"))
               if not (ROOT / "benchmarks" / f"{name}.py").is_file()]
    assert not missing, "\n".join(missing)


def test_relative_links_point_at_existing_files() -> None:
    """Relative markdown links in the README, docs and benchmark indexes resolve (anchors ignored)."""
    broken = []
    for md in _markdown_files():
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor in the same file
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
