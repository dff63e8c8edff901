"""`o2n-edge personalize / distill / transform / eval --run` on real photos with the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from o2n_edge.cli import app

runner = CliRunner()


def test_personalize_distill_transform_eval(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "hazelnut_toy"
    run = tmp_path / "run"
    res = runner.invoke(app, ["personalize", "--category", "hazelnut", "--data", str(data), "--profile", "tiny",
                              "--shots", "2", "--steps", "6", "--out", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "run.json").read_text())["steps"] == 6

    res = runner.invoke(app, ["distill", str(run), "--steps", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "student vs 50-step teacher: PSNR" in res.output

    query = sorted((data / "hazelnut/test/colour").glob("*.jpg"))[0]
    good = sorted((data / "hazelnut/test/good").glob("*.jpg"))[0]
    res = runner.invoke(app, ["transform", str(run), str(query), str(good), "--out", str(tmp_path / "pairs"),
                              "--grid", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    panel = np.asarray(Image.open(tmp_path / "pairs" / f"{query.stem}_normal.png"))
    assert panel.shape == (32, 96, 3)  # query | normal version | difference at the tiny diffusion size
    diff = np.abs(panel[:, :32].astype(int) - panel[:, 32:64].astype(int)).mean(axis=2) * 4
    assert np.abs(panel[:, 64:, 0].astype(int) - np.clip(diff, 0, 255).astype(np.uint8)).max() <= 1
    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (64, 96, 3)  # one row per query

    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--data", str(data), "--category", "hazelnut", "--profile", "tiny",
                              "--shots", "1", "--seeds", "0", "--run", str(run), "--pool-size", "2",
                              "--no-progress", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["branches"] == ["personalized", "pool", "text"] and doc["pool_size"] == 2
    assert 0.0 <= doc["runs"][0]["image_auroc"] <= 1.0


def test_distill_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    res = runner.invoke(app, ["distill", str(tmp_path)])
    assert res.exit_code == 2 and "o2n-edge personalize" in res.output


def test_lite_has_no_diffusion_model(shared_data: Path, tmp_path: Path) -> None:
    """lite is the memory-bank detector: the diffusion commands say so in one line."""
    res = runner.invoke(app, ["personalize", "--category", "hazelnut", "--data", str(shared_data / "hazelnut_toy"),
                              "--profile", "lite", "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 2 and "profile 'lite' has no diffusion model" in res.output, res.output
    assert "--profile tiny or sd15" in res.output and "Traceback" not in res.output
    old = tmp_path / "old-lite-run"  # a run written when lite still had a diffusion model
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"spec": {"kind": "lite", "image_size": 128, "keep_low_sigma": 2.0}}))
    for cmd in (["distill", str(old), "--no-progress"], ["transform", str(old), str(tmp_path / "q.png"),
                                                         "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and "profile 'lite'" in res.output and "tiny or sd15" in res.output, res.output
