"""`o2n-edge learn` on a real (small) lite bundle: only vouched-for images enter, every change is a
new verified bundle with its lineage, a crash leaves nothing half-written, and rollback gives back
the parent. The log's ``feedback`` table is created here with plain sqlite3, in the layout the
server writes (request_id, label, note, who, at, score, bundle_hash, image_sha256).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.runtime.bundle import verify_bundle
from o2n_edge.runtime.coreset import greedy_coreset
from o2n_edge.runtime.learn_bundle import LearnOptions, learn, rollback
from o2n_edge.runtime.learn_vetting import LearnError
from o2n_edge.runtime.manifest import BundleManifest, load_manifest
from o2n_edge.runtime.results_log import ResultsLog


@pytest.fixture(scope="module")
def lite(lite64_bundle: Path) -> Path:
    """The session's 64-px lite bundle (tests/conftest.py): the parent every learn run reads."""
    return lite64_bundle


class Line:
    """A keep directory and a results log, as serve --keep-images and POST /v1/feedback leave them."""

    def __init__(self, root: Path, bundle: Path) -> None:
        from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

        self.keep, self.db = root / "keep", root / "log.sqlite"
        self.keep.mkdir()
        self.pipe = OrtPipeline(bundle, SessionOptions(bank_search="numpy"))
        self.log = ResultsLog(self.db)
        self.n = 0

    def inspect(self, path: Path) -> tuple[str, float]:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (self.keep / f"{sha}{path.suffix}").write_bytes(data)
        score = float(self.pipe.inspect(self.pipe.decode(data, path.name)).score)
        self.log.append(image_sha256=sha, score=score, decision=score > self.pipe.threshold,
                        threshold=self.pipe.threshold, bundle_hash=self.pipe.bundle_hash)
        return sha, score

    def verdict(self, sha: str, label: str, score: float = 0.0) -> None:
        self.n += 1
        with sqlite3.connect(self.db) as con:
            con.execute("INSERT INTO feedback VALUES (?,?,?,?,?,?,?,?)",
                        (f"r{self.n}", label, "", "op", f"2025-01-01T00:00:{self.n:02d}Z", score,
                         self.pipe.bundle_hash, sha))


@pytest.fixture
def line(lite: Path, shared_data: Path, tmp_path: Path) -> dict:
    """20 good verdicts (train goods), 4 defect verdicts (colour defects), 6 test goods with no verdict."""
    cat = shared_data / "hazelnut_toy" / "hazelnut"
    ln = Line(tmp_path, lite)
    goods = [ln.inspect(p)[0] for p in sorted((cat / "train" / "good").iterdir())[:20]]
    defects = [ln.inspect(p) for p in sorted((cat / "test" / "colour").iterdir())[:4]]
    quiet = [ln.inspect(p) for p in sorted((cat / "test" / "good").iterdir())]
    for s in goods:
        ln.verdict(s, "good")
    for s, score in defects:
        ln.verdict(s, "defect", score)
    ln.log.close()
    return {"line": ln, "goods": goods, "defects": [s for s, _ in defects], "quiet": quiet, "tmp": tmp_path}


def _opts(lite: Path, line: dict, **kw) -> LearnOptions:
    ln = line["line"]
    return LearnOptions(bundle=lite, log=ln.db, images=ln.keep, out=line["tmp"] / "child", **kw)


def test_learn_adds_only_good_marked_images_and_recalibrates_on_held_out_ones(lite: Path, line: dict) -> None:
    parent_hash = load_manifest(lite).manifest_sha256
    s = learn(_opts(lite, line, holdout=0.5))
    child = line["tmp"] / "child"
    assert verify_bundle(child) == []
    m = load_manifest(child)
    lin = m.lineage
    assert lin is not None and lin.parent_hash == parent_hash and lin.parent_path == str(lite.resolve())
    added = {a["sha256"] for a in lin.added or []}
    cal = {c["sha256"] for c in lin.calibration or []}
    assert added | cal == set(line["goods"]) and not added & cal  # held out of the bank they calibrate
    assert not (added | cal) & set(line["defects"])
    assert {a["rule"] for a in lin.added or []} == {"operator:good"} and lin.created_at
    assert len(cal) == 10 and s.threshold["recalibrated"]
    scores = [c["score"] for c in lin.calibration or []]
    assert m.threshold is not None and m.threshold.value == pytest.approx(np.quantile(scores, 0.99))
    assert m.threshold.scores == pytest.approx(scores) and m.threshold.n_images == 10
    assert m.memory_bank is not None and m.memory_bank.coreset["rows_added"] == 10 * 6 * 64
    assert m.memory_bank.rows == m.memory_bank.coreset["rows_after"] > load_manifest(lite).memory_bank.rows
    assert BundleManifest.from_dict(json.loads((child / "manifest.json").read_text())).digest_ok()
    from o2n_edge.runtime.pipeline import OrtPipeline

    pipe = OrtPipeline(child)  # loads and scores; the held-out goods score as the lineage says
    got = [pipe.inspect(pipe.decode(next(line["line"].keep.glob(f"{c['sha256']}.*")).read_bytes())).score
           for c in (lin.calibration or [])[:3]]
    assert got == pytest.approx(scores[:3], rel=1e-5)
    assert verify_bundle(lite) == []  # the parent is untouched


def test_auto_good_records_its_rule_and_never_admits_a_defect_verdict(lite: Path, line: dict) -> None:
    ln = line["line"]
    defect = line["defects"][0]
    with sqlite3.connect(ln.db) as con:  # a defect the parent scored low: the rule must still keep it out
        con.execute("UPDATE results SET score = -100 WHERE image_sha256 = ?", (defect,))
    s = learn(_opts(lite, line, auto_good=0.9))
    lin = load_manifest(line["tmp"] / "child").lineage
    assert lin is not None
    rules = {a["sha256"]: a["rule"] for a in lin.added or []}
    assert defect not in rules and not set(rules) & set(line["defects"])
    auto = {sha for sha, r in rules.items() if r == "auto-good:q=0.9"}
    assert auto and auto <= {sha for sha, _ in line["quiet"]}
    assert all(score < s.auto_good["cutoff"] for sha, score in line["quiet"] if sha in auto)
    assert "calibration scores" in s.auto_good["from"]
    with pytest.raises(LearnError, match="above the threshold's own quantile"):
        learn(_opts(lite, line, auto_good=0.999, force=True))


def test_an_image_marked_both_ways_is_refused_naming_it(lite: Path, line: dict) -> None:
    both = line["goods"][3]
    line["line"].verdict(both, "defect")
    with pytest.raises(LearnError, match=both):
        learn(_opts(lite, line))
    assert not (line["tmp"] / "child").exists()
    s = learn(_opts(lite, line, skip_conflicts=True))
    assert both in {x["sha256"] for x in s.skipped} and both not in {a["sha256"] for a in s.added}


def test_missing_or_corrupted_kept_images_are_skipped_and_few_calibration_images_keep_the_threshold(
        lite: Path, line: dict) -> None:
    keep = line["line"].keep
    gone, bad = line["goods"][0], line["goods"][1]
    next(keep.glob(f"{gone}.*")).unlink()
    next(keep.glob(f"{bad}.*")).write_bytes(b"not the image that was inspected")
    s = learn(_opts(lite, line, holdout=0.2))  # 4 held-out images: too few to calibrate on
    reasons = {x["sha256"]: x["reason"] for x in s.skipped}
    assert "not in the keep directory" in reasons[gone] and "sha256 mismatch" in reasons[bad]
    assert not s.threshold["recalibrated"] and "fewer than" in s.threshold["reason"]
    m = load_manifest(line["tmp"] / "child")
    assert m.threshold is not None and m.threshold.value == load_manifest(lite).threshold.value


def test_nothing_vetted_is_an_error_and_writes_nothing(lite: Path, line: dict, tmp_path: Path) -> None:
    ln = line["line"]
    with sqlite3.connect(ln.db) as con:
        con.execute("DELETE FROM feedback WHERE label = 'good'")
    with pytest.raises(LearnError, match="nothing vetted"):
        learn(_opts(lite, line))
    assert not (line["tmp"] / "child").exists()
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(LearnError, match="no feedback table"):
        learn(LearnOptions(bundle=lite, log=empty, images=ln.keep, out=tmp_path / "x"))


def test_a_run_killed_midway_leaves_the_parent_whole_and_no_new_bundle(lite: Path, line: dict,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from o2n_edge.runtime.bundle_writer import BundleWriter

    before = (lite / "manifest.json").read_bytes()

    def die(self, manifest):  # the bank is built and its arrays are staged: now the process "dies"
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(BundleWriter, "write_manifest", die)
    with pytest.raises(KeyboardInterrupt):
        learn(_opts(lite, line))
    assert not (line["tmp"] / "child").exists()
    assert not [p for p in line["tmp"].iterdir() if p.name.startswith(".child")]  # no staging left behind
    assert verify_bundle(lite) == [] and (lite / "manifest.json").read_bytes() == before


def test_rollback_gives_back_the_verified_parent(lite: Path, line: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from o2n_edge.cli import app

    learn(_opts(lite, line))
    child = line["tmp"] / "child"
    res = rollback(child)
    assert res.parent == lite.resolve() and res.parent_hash == load_manifest(lite).manifest_sha256
    r = CliRunner().invoke(app, ["learn", "--rollback", str(child), "--out", str(tmp_path / "restored")])
    assert r.exit_code == 0, r.output
    assert verify_bundle(tmp_path / "restored") == []
    assert load_manifest(tmp_path / "restored").manifest_sha256 == res.parent_hash
    with pytest.raises(LearnError, match="no lineage"):
        rollback(lite)
    moved = tmp_path / "moved"
    shutil.copytree(child, moved)
    with pytest.raises(LearnError, match="not the parent"):  # a directory holding another bundle
        rollback(moved, parent=child)
    assert rollback(moved, parent=tmp_path / "restored").parent_hash == res.parent_hash
    r = CliRunner().invoke(app, ["learn", "--rollback", str(moved), "--parent", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no longer exists" in r.output
    r = CliRunner().invoke(app, ["inspect", str(child)])
    assert "lineage" in r.output and res.parent_hash[:16] in r.output


def test_acceptance_report_header_names_the_lineage(lite: Path, line: dict) -> None:
    from o2n_edge.acceptance.page import _lineage
    from o2n_edge.acceptance.report_builder import _bundle_info
    from o2n_edge.runtime.pipeline import OrtPipeline

    s = learn(_opts(lite, line))
    info = _bundle_info(OrtPipeline(s.out), s.out)
    assert info["lineage"]["parent_hash"] == load_manifest(lite).manifest_sha256
    assert {a["sha256"] for a in info["lineage"]["added"]} == {a["sha256"] for a in s.added}
    html = _lineage(info["lineage"])
    assert info["lineage"]["parent_hash"][:16] in html and f"{len(s.added)} images added" in html
    assert _bundle_info(OrtPipeline(lite), lite)["lineage"] is None


def test_learn_cli_and_a_second_generation(lite: Path, line: dict) -> None:
    from typer.testing import CliRunner

    from o2n_edge.cli import app

    ln, child = line["line"], line["tmp"] / "child"
    r = CliRunner().invoke(app, ["learn", str(lite), "--log", str(ln.db), "--images", str(ln.keep),
                                 "--out", str(child), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["added"] and doc["manifest_sha256"] == load_manifest(child).manifest_sha256
    r = CliRunner().invoke(app, ["learn", str(child), "--log", str(ln.db), "--images", str(ln.keep),
                                 "--out", str(line["tmp"] / "grand")])
    assert r.exit_code == 2 and "nothing vetted" in r.output  # nothing new: the same images are not added twice


def test_learn_runs_without_torch(lite: Path, line: dict) -> None:
    ln = line["line"]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from o2n_edge.runtime.learn_bundle import LearnOptions, learn\n"
        f"learn(LearnOptions(bundle=Path({str(lite)!r}), log=Path({str(ln.db)!r}), images=Path({str(ln.keep)!r}),"
        f" out=Path({str(line['tmp'] / 'child')!r})))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_bundle(line["tmp"] / "child") == []


def test_numpy_coreset_is_a_k_center_subset() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 200)) * 10
    bank = (np.repeat(centers, 50, axis=0) + 0.01 * rng.standard_normal((500, 200))).astype(np.float32)
    idx = greedy_coreset(bank, 0.02, seed=0)  # 10 rows: k-center picks one in every cluster
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert sorted(set(idx // 50)) == list(range(10))
    assert len(greedy_coreset(bank, 0.5, max_rows=20)) == 20 and len(greedy_coreset(bank, 1.0)) == 500


def test_one_added_image_moves_the_constants_by_at_most_its_pooling_weight(lite: Path, shared_data: Path) -> None:
    from o2n_edge.runtime.learn_bank import encode_views, extend_reference
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(lite, SessionOptions(bank_search="numpy"))
    img = next(iter(sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").iterdir())))
    feats = encode_views(pipe, [pipe.decode(img.read_bytes(), img.name)])
    parent = pipe.scorer.reference
    got = {rule: extend_reference(parent, pipe.params, feats, ratio=0.1, max_rows=50_000, constants=rule,
                                  parent_images=4) for rule in ("remeasure", "pooled", "keep")}
    fresh, pooled, kept = (got[r][0] for r in ("remeasure", "pooled", "keep"))
    assert set(fresh.norm) >= {"pool", "global_pool", "global_stats"}
    from o2n_edge.runtime.scoring import feature_stats, stats_distance

    one = stats_distance(feature_stats(feats[0]["patch"])[:1], parent.stats_bank.astype(np.float64),
                         parent.stats_scale.astype(np.float64))  # measured in the parent's statistics unit
    new = {"pool": fresh.norm["pool"][0], "global_pool": fresh.norm["global_pool"][0],
           "global_stats": float(np.mean(one))}
    for k in ("pool", "global_pool", "global_stats"):
        moved, full = pooled.norm[k][0] - parent.norm[k][0], new[k] - parent.norm[k][0]
        assert moved == pytest.approx(full / 5, rel=1e-5, abs=1e-9)  # 1 image against 4: a fifth of the way
        assert kept.norm[k] == parent.norm[k]
    for (pc, _), (fc, _), (qc, _) in zip(parent.ring_norm["pool"], fresh.ring_norm["pool"], pooled.ring_norm["pool"]):
        assert abs(qc - pc) <= abs(fc - pc) / 5 + 1e-9
    assert np.array_equal(pooled.stats_scale, parent.stats_scale)  # the pooled distances share one unit
    assert got["pooled"][1]["constants"] == {"rule": "pooled", "parent_images": 4, "added_images": 1}
    assert pooled.memory_bank.shape[0] > parent.memory_bank.shape[0]  # the banks grow under every rule


def test_the_lineage_names_the_constants_rule_and_its_weights(lite: Path, line: dict) -> None:
    s = learn(_opts(lite, line, holdout=0.5))
    lin = load_manifest(line["tmp"] / "child").lineage
    assert lin is not None and lin.constants == {"rule": "pooled", "parent_images": 2, "added_images": len(s.added)}
