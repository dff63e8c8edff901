"""`o2n-edge eval` end to end on real data (tiny profile for speed) and its user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from o2n_edge.cli import app

runner = CliRunner()
METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_pro")


def test_eval_hazelnut_tiny_writes_json(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--data", str(shared_data / "hazelnut_toy"), "--category", "hazelnut",
                              "--profile", "tiny", "--shots", "1,2", "--seeds", "0,1", "--no-progress",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "mvtec" and doc["category"] == "hazelnut" and doc["profile"] == "tiny"
    assert doc["branches"] == ["pool", "text"]
    assert len(doc["runs"]) == 4 and [s["shots"] for s in doc["summary"]] == [1, 2]
    for run in doc["runs"]:
        for key in METRICS:
            assert 0.0 <= run[key] <= 1.0, (key, run[key])
        assert len(run["shot_images"]) == run["shots"]
    # shots are nested across k for the same seed, and differ across seeds
    by = {(r["shots"], r["seed"]): r["shot_images"] for r in doc["runs"]}
    assert by[(1, 0)][0] in by[(2, 0)] and by[(1, 0)] != by[(1, 1)]
    assert "AUROC" in res.output


def test_eval_branch_subset(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--data", str(shared_data / "hazelnut_toy"), "--category", "hazelnut",
                              "--profile", "tiny", "--shots", "1", "--seeds", "0", "--branches", "text",
                              "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["branches"] == ["text"]


def test_eval_lite_prints_its_setting_and_scores_with_the_coreset(shared_data: Path, tmp_path: Path) -> None:
    """The lite default is one fixed setting: eval says which, and scores with the bank a bundle ships."""
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--data", str(shared_data / "hazelnut_toy"), "--category", "hazelnut",
                              "--profile", "lite", "--image-size", "224", "--stats-weight", "1", "--shots", "2", "--seeds", "0",
                              "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert "self_tuned" not in doc and doc["coreset"] == 0.1
    assert doc["setting"].startswith("lite0@224 L2,4 k3 g1, border rings 0.15")
    assert f"setting: {doc['setting']} (fixed)" in res.output
    assert doc["runs"][0]["image_auroc"] > 0.9  # hazelnut's blue paint is easy at any setting
    run = doc["runs"][0]  # 2 shots x 6 views x 784 patches, 10% kept, under lite's row budget
    assert run["bank_rows_before"] == 9408 and run["bank_rows"] == 941 and run["bank_method"] == "exact"


def test_eval_all_shots_within_the_row_budget(shared_data: Path, tmp_path: Path) -> None:
    """``--shots all`` takes every training good; the bank stays within ``--bank-rows``, and the
    run records how many shots and rows it used."""
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--data", str(shared_data / "hazelnut_toy"), "--category", "hazelnut",
                              "--profile", "tiny", "--branches", "pool", "--shots", "2,all", "--seeds", "0",
                              "--bank-rows", "50", "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output
    two, every = json.loads(out.read_text())["runs"]
    assert two["shots"] == 2 and "shots_requested" not in two
    assert every["shots"] == 28 and every["shots_requested"] == "all" and len(every["shot_images"]) == 28
    assert every["bank_rows"] == 50 < every["bank_rows_before"] and every["constants_shots"] == 8
    assert two["bank_rows"] == 50 and set(two["shot_images"]) < set(every["shot_images"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/o2n", "--category", "pcb"], "/nonexistent/o2n"),
        (["--category", "hazelnut", "--profile", "huge"], "unknown profile"),
        (["--category", "hazelnut", "--shots", "one"], "--shots"),
        (["--category", "hazelnut", "--shots", "0"], "--shots"),
        (["--category", "hazelnut", "--bank-rows", "0"], "--bank-rows"),
        (["--category", "hazelnut", "--branches", "text", "--profile", "lite"], "not available"),
        (["--category", "hazelnut", "--branches", "personalized", "--profile", "tiny"], "--run"),
        # lite is the memory-bank detector: no transform, no personalization
        (["--category", "hazelnut", "--branches", "personalized"], "profile 'lite' has no diffusion model"),
        (["--category", "hazelnut", "--personalize"], "profile 'lite' has no diffusion model"),
        (["--category", "walnut"], "hazelnut"),  # the message lists the categories that exist
        (["--category", "hazelnut", "--shots", "99", "--profile", "tiny"], "28"),  # only 28 good images
        (["--category", "hazelnut", "--image-size", "5000"], "--image-size"),
        (["--category", "hazelnut", "--image-size", "448", "--profile", "sd15"], "fixed 240 px"),
        (["--category", "hazelnut", "--coreset", "0"], "--coreset"),
        (["--category", "hazelnut", "--stats-weight", "-1"], "--stats-weight"),
    ],
)
def test_eval_user_errors_are_one_line(shared_data: Path, args: list[str], message: str) -> None:
    base = ["eval", "--no-progress"]
    if "--data" not in args:
        base += ["--data", str(shared_data / "hazelnut_toy")]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert "Traceback" not in res.output


def test_missing_data_root_names_option_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("O2N_DATA", raising=False)
    res = runner.invoke(app, ["eval", "--category", "pcb", "--no-progress"])
    assert res.exit_code == 2
    assert "--data" in res.output and "O2N_DATA" in res.output


def test_removed_options_are_unknown() -> None:
    """Self-tuning was measured no better than the fixed lite setting and is gone."""
    for cmd in (["eval", "--category", "hazelnut"], ["export", "--category", "hazelnut"]):
        res = runner.invoke(app, cmd + ["--self-tune"])
        assert res.exit_code == 2 and "--self-tune" in res.output


def test_export_refuses_a_bad_row_budget(shared_data: Path, tmp_path: Path) -> None:
    """``export --bank-rows`` goes through the same profile option as ``eval``: refused before any model loads."""
    res = runner.invoke(app, ["export", "--category", "hazelnut", "--data", str(shared_data / "hazelnut_toy"),
                              "--bank-rows", "0", "--out", str(tmp_path / "b"), "--no-progress"])
    assert res.exit_code == 2 and "--bank-rows must be a positive number" in res.output, res.output
