"""What the `triton` extra costs: its install time on a fresh venv, and the Triton tests' wall time.

Usage: python -m benchmarks.triton_install [--skip-install]
The install runs `pip install --no-cache-dir` of the extra's pinned packages into a new temporary
venv (network + unpacking; the figure depends on the mirror's speed). The tests run as one pytest
subprocess (the shared tiny bundle's export included, since that is what a run pays).
Writes benchmarks/results/triton_install.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine_stamp
from benchmarks.harness import stamp_lines, write_json, write_text
from benchmarks.triton_server import SITE_ENV

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0"]  # = pyproject's `triton` extra
TESTS = ["tests/test_triton_server.py", "tests/test_triton_repository.py"]


def _install() -> dict:
    with tempfile.TemporaryDirectory(prefix="o2n-triton-install-") as tmp:
        venv = Path(tmp) / "venv"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        out = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", *PACKAGES],
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file())
        return {"packages": PACKAGES, "returncode": out.returncode, "wall_s": round(wall, 1),
                "venv_mb": round(size / 2**20, 1), "stderr_tail": out.stderr[-500:] if out.returncode else ""}


def _tests() -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *TESTS],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    summary = (out.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"files": TESTS, "returncode": out.returncode, "wall_s": round(wall, 1), "summary": summary,
            "counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-install", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    site = os.environ.get(SITE_ENV)
    doc = {"name": "triton_install", "machine": machine_stamp(1),
           "command": (f"{SITE_ENV}={site} " if site else "") + "python -m benchmarks.triton_install"
           + (" --skip-install" if a.skip_install else "")}
    if not a.skip_install:
        doc["install"] = _install()
    doc["tests"] = _tests()
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", f"Command: `{doc['command']}`", ""]
    if "install" in doc:
        i = doc["install"]
        lines += [f"Fresh venv + `pip install --no-cache-dir {' '.join(i['packages'])}`: **{i['wall_s']} s** "
                  f"(exit {i['returncode']}), {i['venv_mb']} MB installed.", ""]
    t = doc["tests"]
    lines += [f"`pytest {' '.join(t['files'])}`: **{t['wall_s']} s** wall, {t['summary']}.", ""]
    write_json(a.out / "triton_install.json", doc)
    write_text(a.out / "triton_install.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
