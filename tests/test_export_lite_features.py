"""Export -> runtime with the lite feature options: tiles through the encoder graph, the global
statistics branch, JPEG draft decoding and the int8 search travel in the bundle and score as the
torch reference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiled_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    from o2n_edge.export.build import ExportOptions, export_bundle

    from o2n_edge import profiles

    lite = profiles.PROFILES["lite"]
    spec = replace(lite.encoder, image_size=96, tiles=2, tile_overlap=0.5, layers=(2, 3))
    patched = replace(lite, encoder=spec, stats_weight=1.0, jpeg_draft=True)
    mp = pytest.MonkeyPatch()
    mp.setitem(profiles.PROFILES, "lite", patched)
    try:
        root = tmp_path_factory.mktemp("lite-tiled")
        yield export_bundle(ExportOptions(
            category="hazelnut", out=root / "bundle", profile="lite", data=shared_data / "hazelnut_toy",
            shots=2, seed=0, branches="pool", pool_size=0, runs_dir=root / "runs", progress=False,
            search_precision="int8"))
    finally:
        mp.undo()


def test_tiled_stats_bundle_matches_reference(tiled_bundle, shared_data: Path) -> None:
    from o2n_edge.runtime.bank_search import Int8BankSearch, NumpyBankSearch, OrtBankSearch
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    m = tiled_bundle.manifest
    assert m["image_size"] == 96 + 64 and m["encoder"]["tiling"] == {"tile": 96, "tiles": 2, "step": 64, "side": 160}
    assert m["decode"] == {"jpeg_draft": True} and m["scoring"]["stats_weight"] == 1.0
    assert "global_stats" in m["scoring"]["norm"] and "stats_bank.npy" in m["files"]
    # border rings (lite default 15% of the grid side): the 20-cell stitched grid gets 3 rings + interior,
    # each with its own constants (on hazelnut the part sits in the middle: the interior is the far one)
    rings = m["scoring"]["ring_norm"]["pool"]
    assert m["scoring"]["border_fraction"] == 0.15 and len(rings) == 4 and len({c for c, _ in rings}) == 4
    assert tiled_bundle.parity["max_abs"] < 1e-3  # export's own runtime-vs-torch check, int8 search on both sides
    pipe = OrtPipeline(tiled_bundle.bundle)
    assert pipe.layout.count == 4 and pipe.jpeg_draft
    assert m["scoring"]["search_precision"] == "int8" and isinstance(pipe.scorer.search, Int8BankSearch)
    # a GPU backend searches the float32 bank exactly on the device (here: its CPU fallback)
    gpu = OrtPipeline(tiled_bundle.bundle, SessionOptions(backend="cuda"))
    assert isinstance(gpu.scorer.search, OrtBankSearch)
    # an explicit numpy search (Triton's BLS model: no onnxruntime session) is the exact float32 one
    plain = OrtPipeline(tiled_bundle.bundle, SessionOptions(bank_search="numpy"))
    assert isinstance(plain.scorer.search, NumpyBankSearch)
    jpg = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "test" / "colour").glob("*.jpg"))[0]
    img = pipe.decode(jpg.read_bytes(), jpg.name)
    assert img.shape == (256, 256, 3)  # 512 px decoded at 1/2 (1/4 = 128 would not cover 160)
    good = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "test" / "good").glob("*.jpg"))[0]
    res = pipe.inspect_batch([img, pipe.decode(good.read_bytes())])
    assert res[0].anomaly_map.shape == (160, 160) and res[0].score > res[1].score


def test_inspect_prints_the_settings(tiled_bundle) -> None:
    import json

    from typer.testing import CliRunner

    from o2n_edge.cli import app

    res = CliRunner().invoke(app, ["inspect", str(tiled_bundle.bundle), "--json"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output)["settings"]
    assert "2x2 tiles" in line and "layers [2, 3]" in line and "statistics weight 1.0" in line and "JPEG draft True" in line
    assert "border rings 0.15" in line and "global cosine weight 0.0" in line and "search int8 on a CPU" in line
