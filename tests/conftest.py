"""Shared test fixtures: where the real data lives, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data (MVTec-layout hazelnut_toy and mvtec3d_rgb)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tiny bundle with every graph and all three branches (2 hazelnut shots), per session.

    Shared by the export end-to-end tests and the Triton repository/server tests, so the export
    runs once.
    """
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("e2e")
    summary = export_bundle(ExportOptions(
        category="hazelnut", out=root / "bundle", profile="tiny", data=shared_data / "hazelnut_toy",
        shots=2, seed=0, runs_dir=root / "runs", pool_size=2, personalize_steps=8, distill_steps=2,
        progress=False))
    return summary



@pytest.fixture(scope="session")
def lite64_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lite bundle at 64 px from 2 hazelnut shots (pool + statistics branches, coreset 0.1), per session.

    Shared by the learn tests and the learning-loop test (both only read it), so it is exported once.
    """
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("lite64")
    export_bundle(ExportOptions(category="hazelnut", out=root / "parent", profile="lite", image_size=64,
                                data=shared_data / "hazelnut_toy", shots=2, seed=0, progress=False))
    return root / "parent"

REQUIRE_GPU_ENV = "O2N_REQUIRE_GPU"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - a pytest hook
    """With O2N_REQUIRE_GPU=1 (the GPU check sets it), a gpu-marked test that skips FAILS instead.

    Why: on the machine lent for the GPU check a skipped GPU test means nothing was checked, and a
    run whose every GPU test skipped must not pass.
    """
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(REQUIRE_GPU_ENV) == "1" and report.skipped and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped with {REQUIRE_GPU_ENV}=1, which makes a GPU test's skip a failure: {reason}"
