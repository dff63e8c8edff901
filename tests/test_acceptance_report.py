"""`o2n-edge report` end to end on a tiny bundle and real photos, and its one-line errors.

The tiny bundle has every branch (the personalized one included), so the gallery's
"normal version" column is exercised; the report runs in a subprocess where `import torch` fails,
as on a line-side box with the base install + the report extra.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from o2n_edge.cli import app
from o2n_edge.runtime.manifest import SCHEMA_VERSION

runner = CliRunner(env={"COLUMNS": "400"})  # rich wraps errors at the terminal width
HAZELNUT_GOOD, HAZELNUT_BAD = 6, 17  # hazelnut_toy's test split
# Hide torch as an install without it would: a finder that says "no such module". Setting
# sys.modules['torch'] = None is not enough here: scipy's array-API helpers look torch up there.
BLOCK_TORCH = (
    "import sys\n"
    "class _NoTorch:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


@pytest.fixture(scope="module")
def tiny_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("report")
    summary = export_bundle(ExportOptions(
        category="hazelnut", out=root / "bundle", profile="tiny", data=shared_data / "hazelnut_toy",
        shots=2, seed=0, runs_dir=root / "runs", pool_size=2, personalize_steps=8, distill_steps=2,
        progress=False))
    return summary.bundle


@pytest.fixture(scope="module")
def report_dir(tiny_bundle: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report, written by the CLI in a process where torch cannot be imported."""
    out = tmp_path_factory.mktemp("reports") / "hz"
    code = (
        f"{BLOCK_TORCH}"
        "from o2n_edge.cli import app\n"
        f"try:\n    app(['report', '--bundle', {str(tiny_bundle)!r}, '--data', {str(shared_data / 'hazelnut_toy')!r},"
        f" '--out', {str(out)!r}, '--no-progress', '--threads', '1', '--gallery', '3', '--target-frr', '0.2'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "wrote" in res.stdout and "false rejects" in res.stdout, res.stdout
    return out


def test_report_files_and_figures_are_consistent(report_dir: Path, tiny_bundle: Path) -> None:
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.html", "report.json"]
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    doc = json.loads((report_dir / "report.json").read_text())
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert (doc["n_test"], doc["n_good"], doc["n_defective"]) == (HAZELNUT_GOOD + HAZELNUT_BAD, HAZELNUT_GOOD, HAZELNUT_BAD)
    threshold = manifest["threshold"]["value"]
    op = doc["at_bundle_threshold"]
    assert op["threshold"] == threshold
    # the counts are the per-image scores against the manifest's threshold, recomputed here
    scores = np.array([r["score"] for r in doc["images"]])
    labels = np.array([r["label"] for r in doc["images"]])
    assert op["false_reject"]["count"] == int((scores[labels == 0] > threshold).sum())
    assert op["escape"]["count"] == int((scores[labels == 1] <= threshold).sum())
    assert op["false_reject"]["ci_low"] <= op["false_reject"]["rate"] <= op["false_reject"]["ci_high"]
    # the target-FRR threshold (20%: one of six goods may be rejected) is the 2nd highest good score
    t_target = doc["at_target_frr"]["threshold"]
    assert t_target == pytest.approx(np.sort(scores[labels == 0])[-2])
    assert doc["at_target_frr"]["false_reject"]["count"] <= 1
    # per type: one type here, so it equals the overall figures; masks exist -> pixel metrics
    (colour,) = doc["per_type"]
    assert colour["defect"] == "colour" and colour["n"] == HAZELNUT_BAD
    assert colour["escape"] == op["escape"]
    assert colour["image_auroc"] == pytest.approx(doc["metrics"]["image_auroc"])
    assert 0.0 <= colour["pixel_auroc"] <= 1.0 and 0.0 <= colour["pixel_pro"] <= 1.0
    assert doc["bundle"]["has_normal_version"] is True
    assert len(doc["gallery"]["escapes"]) == 3 and len(doc["gallery"]["false_rejects"]) == 3


def test_report_page_is_self_contained(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", html), "the page links to an external asset"
    assert "http://" not in html and "https://" not in html
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(pngs) == 4  # histogram, ROC, PR, per type
    for b64 in pngs:
        assert Image.open(io.BytesIO(base64.b64decode(b64))).size[0] > 500
    strips = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", html)
    assert len(strips) == 6  # 3 escapes + 3 false rejects
    strip = Image.open(io.BytesIO(base64.b64decode(strips[0])))
    assert strip.size[0] > 2.5 * strip.size[1]  # query | normal version | overlay
    for text in ("good parts rejected", "escapes", "colour", "query | normal version | heat-map overlay",
                 "Clopper-Pearson", "Worst false rejects",
                 "a single unusual good image sets it"):  # 0.99 quantile of 26 calibration images
        assert text in html, text


def test_report_replaces_a_previous_report_but_never_other_directories(
    tiny_bundle: Path, shared_data: Path, tmp_path: Path
) -> None:
    from o2n_edge.acceptance.report_builder import write_atomically

    out = tmp_path / "rep"
    write_atomically(out, {"report.json": b"{}", "report.html": b"old"})
    write_atomically(out, {"report.json": b"{}", "report.html": b"new"})
    assert (out / "report.html").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["report", "--bundle", str(tiny_bundle), "--data", str(shared_data / "hazelnut_toy"),
                              "--out", str(other), "--no-progress"])
    assert res.exit_code == 2 and "not a report directory" in res.output, res.output
    assert (other / "notes.txt").read_text() == "keep me"


def _mvtec_copy(src: Path, dst: Path, test_types: list[str]) -> Path:
    """A hazelnut copy (symlinks) whose test split holds only ``test_types``."""
    cat = dst / "hazelnut"
    (cat / "train").mkdir(parents=True)
    (cat / "train" / "good").symlink_to(src / "train" / "good")
    (cat / "test").mkdir()
    for t in test_types:
        (cat / "test" / t).symlink_to(src / "test" / t)
    return dst


@pytest.mark.parametrize("types, message", [(["good"], "no defective images"), (["colour"], "no good images")])
def test_a_split_without_goods_or_defects_is_a_one_line_error(
    tiny_bundle: Path, shared_data: Path, tmp_path: Path, types: list[str], message: str
) -> None:
    root = _mvtec_copy(shared_data / "hazelnut_toy" / "hazelnut", tmp_path / "data", types)
    res = runner.invoke(app, ["report", "--bundle", str(tiny_bundle), "--data", str(root), "--out",
                              str(tmp_path / "rep"), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "rep").exists()


def test_missing_report_extra_names_it(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from o2n_edge.acceptance import report_builder as build

    monkeypatch.setitem(build.REPORT_MODULES, "o2n_edge_no_such_module", "a test")
    res = runner.invoke(app, ["report", "--bundle", str(tiny_bundle), "--data", str(shared_data / "hazelnut_toy"),
                              "--out", str(tmp_path / "rep"), "--no-progress"])
    assert res.exit_code == 2 and "o2n-edge[report]" in res.output, res.output


def test_wrong_category_is_refused(tiny_bundle: Path, shared_data: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["report", "--bundle", str(tiny_bundle), "--data", str(shared_data / "mvtec3d_rgb"),
                              "--category", "tire", "--out", str(tmp_path / "rep"), "--no-progress"])
    assert res.exit_code == 2 and "'hazelnut'" in res.output and "'tire'" in res.output, res.output


def test_report_page_renders_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    """Every embedded image decodes in a real browser, and a full-page screenshot is taken."""
    from benchmarks.harness import BrowserUnavailable, screenshot_page

    png = tmp_path / "shot.png"
    try:
        info = screenshot_page(report_dir / "report.html", png)
    except BrowserUnavailable as exc:
        pytest.skip(str(exc))
    assert info["images"] == 10 and info["images_loaded"] == 10, info
    assert info["page_height"] > 1500
    shot = Image.open(png)
    assert shot.size[0] >= 1000 and shot.size[1] > 1000


class _ManifestFake:
    """FakeInspector (brightness as the score) with the manifest the report reads; no bundle needed."""

    def __new__(cls, threshold: float, rule_offset: float = 0.0):
        from fakes import FakeInspector

        fake = FakeInspector(threshold=threshold, with_normal=False)
        fake.manifest = {"schema_version": SCHEMA_VERSION, "files": {},
                         "category": "tire", "profile": "fake", "dataset": "mvtec", "precision": "fp32",
                         "scoring": {"branches": ["pool"]}, "shots": {"k": 1, "images": []},
                         "threshold": {"value": threshold, "method": "fixed for the test"},
                         "manifest_sha256": "0" * 64}
        if rule_offset:  # a runtime whose decisions do not follow score > threshold
            inspect_batch = fake.inspect_batch

            def shifted(images):
                out = inspect_batch(images)
                for r in out:
                    r.decision = r.score > threshold + rule_offset
                return out

            fake.inspect_batch = shifted
        return fake


def test_report_with_a_stand_in_inspector_on_four_defect_types(shared_data: Path, tmp_path: Path) -> None:
    """Per-type rows, misses on both sides and a gallery without normal versions (fast: no bundle)."""
    from o2n_edge.acceptance import build_report
    from o2n_edge.data import load_dataset

    ds = load_dataset(shared_data / "mvtec3d_rgb", None, "tire")
    probe = _ManifestFake(0.0)
    scores = np.array([probe.expected_score(np.asarray(Image.open(s.path).convert("RGB"))) for s in ds.test])
    threshold = float(np.median(scores))
    summary = build_report(Path("fake-bundle"), ds, tmp_path / "rep", inspector=_ManifestFake(threshold),
                           progress=False, gallery_size=2, provenance={"bundle from": "a test"})
    doc = summary.doc
    labels = ds.labels
    assert doc["at_bundle_threshold"]["false_reject"]["count"] == int((scores[labels == 0] > threshold).sum())
    assert doc["at_bundle_threshold"]["escape"]["count"] == int((scores[labels == 1] <= threshold).sum())
    assert [r["defect"] for r in doc["per_type"]] == ["combined", "contamination", "cut", "hole"]
    assert sum(r["escape"]["count"] for r in doc["per_type"]) == doc["at_bundle_threshold"]["escape"]["count"]
    assert all(r["pixel_auroc"] is not None for r in doc["per_type"])
    assert doc["bundle"]["has_normal_version"] is False
    html = summary.html.read_text()
    assert "query | heat-map overlay" in html and "bundle from: a test" in html
    assert ("ESCAPE" in html) == (doc["at_bundle_threshold"]["escape"]["count"] > 0)
    # the lowest-scoring defect leads the escapes row, the highest-scoring good the false rejects
    first_escape = doc["images"][doc["gallery"]["escapes"][0]]
    assert first_escape["score"] == min(r["score"] for r in doc["images"] if r["label"] == 1)


def test_report_refuses_a_runtime_whose_decisions_it_cannot_recount(shared_data: Path, tmp_path: Path) -> None:
    from o2n_edge.acceptance import build_report
    from o2n_edge.data import load_dataset

    ds = load_dataset(shared_data / "hazelnut_toy", None, "hazelnut")
    ds.category = "tire"  # the stand-in's manifest says tire
    with pytest.raises(ValueError, match="decision differs"):
        build_report(Path("fake-bundle"), ds, tmp_path / "rep", inspector=_ManifestFake(0.0, rule_offset=1e6),
                     progress=False)
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("option, value, message", [("--target-frr", "1.5", "--target-frr"),
                                                    ("--confidence", "1", "--confidence"),
                                                    ("--gallery", "-1", "--gallery")])
def test_bad_options_are_one_line_errors(tiny_bundle: Path, shared_data: Path, tmp_path: Path,
                                         option: str, value: str, message: str) -> None:
    res = runner.invoke(app, ["report", "--bundle", str(tiny_bundle), "--data", str(shared_data / "hazelnut_toy"),
                              "--out", str(tmp_path / "rep"), "--no-progress", option, value])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "rep").exists()
