"""Smoke tests of `o2n-edge bench` (o2n_edge.bench) and of the studies built on it (benchmarks/).

Fast tests use synthetic numbers; the ones that export a tiny bundle and run every benchmark on
it are marked slow. No timing is asserted anywhere: benchmarks, not tests, hold speed targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.bench.env import UNAVAILABLE, machine_stamp, peak_memory, percentiles


def test_percentiles_and_stamp() -> None:
    p = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["n"] == 5 and p["min"] == 1.0 and p["p99"] > p["p90"] >= p["p50"]
    assert percentiles([]) == {"n": 0}
    s = machine_stamp(1)
    assert s["threads"] == 1 and s["cores"] >= 1 and len(s["load_average_start"]) == 3
    assert s["versions"]["onnxruntime"] != "absent" and s["cpu"]


def test_peak_memory_sees_an_allocation() -> None:
    with peak_memory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB
        block[::4096] += 1
    assert mem["peak_rss_mb"] is not None and mem["peak_rss_mb"] >= mem["rss_before_mb"]
    if mem["reset"]:
        assert mem["peak_rss_mb"] - mem["rss_before_mb"] > 32


def test_gpu_backends_are_detected_not_faked() -> None:
    import onnxruntime as ort

    from o2n_edge.bench.latency import unavailable_reason

    assert unavailable_reason("ort-cpu") is None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider" in unavailable_reason("ort-cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        unavailable_reason("npu")


def test_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    from o2n_edge.bench.latency_report import write_latency

    stages = {k: percentiles([1.0, 2.0]) for k in ("preprocess", "vae_encode", "unet_step_0", "unet_step_1", "total")}
    row = {"backend": "ort-cpu", "status": "measured", "batch": 1, "iters": 2, "stages_ms": stages,
           "end_to_end_ms": percentiles([5.0, 6.0]), "per_image_ms_p50": 5.5, "throughput_img_s": 181.8}
    doc = {"name": "latency_test", "machine": machine_stamp(1), "results": [
        {"kind": "bundle_latency", "bundle": "b", "profile": "tiny", "category": "c", "image_size": 64,
         "diffusion_image_size": 32, "steps_run": 2, "branches": ["pool"], "source_image_side": 512,
         "rows": [row, {"backend": "ort-cuda", "status": UNAVAILABLE, "reason": "no GPU"}]}],
        "reference": "ort-cpu", "targets": [{"target": "t", "measured": "1x", "met": False}]}
    paths = write_latency(doc, tmp_path)
    md = Path(paths["md"]).read_text()
    assert "ort-cuda" in md and UNAVAILABLE in md and "unet_step_1" in md and "load average" in md
    assert json.loads(Path(paths["json"]).read_text())["machine"]["load_average_end"]
    pytest.importorskip("matplotlib")
    assert Path(paths["png"]).stat().st_size > 1000


def test_bench_main_rejects_bad_arguments(tmp_path: Path) -> None:
    from o2n_edge.bench import bench_main

    with pytest.raises(ValueError, match="unknown backend"):
        bench_main(tmp_path, ["torch"], ["fp32"], [1], tmp_path, 0, 1, 1)  # torch eager is a study's extra runner
    with pytest.raises(ValueError, match="unknown precision"):
        bench_main(tmp_path, ["ort-cpu"], ["int8"], [1], tmp_path, 0, 1, 1)
    with pytest.raises(ValueError, match="batch sizes"):
        bench_main(tmp_path, ["ort-cpu"], ["fp32"], [0], tmp_path, 0, 1, 1)


def test_every_study_has_a_help() -> None:
    """Each study stays runnable as `python -m benchmarks.<name> --help` (imports resolve, no work done)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    studies = sorted(p.stem for p in (root / "benchmarks").glob("*.py")
                     if p.stem not in ("__init__", "harness", "triton_server", "sd15_stages"))
    code = "import runpy, sys\nfor m in sys.argv[1:]:\n    sys.argv = [m, '--help']\n    try:\n" \
           "        runpy.run_module('benchmarks.' + m, run_name='__main__')\n    except SystemExit as e:\n" \
           "        assert e.code in (0, None), (m, e.code)\n"
    res = subprocess.run([sys.executable, "-c", code, *studies], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------ slow: on a real tiny bundle


@pytest.fixture(scope="module")
def tiny(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bench")
    runs = root / "runs"
    s = export_bundle(ExportOptions(category="hazelnut", out=root / "bundle", profile="tiny",
                                    data=shared_data / "hazelnut_toy", shots=2, seed=0, runs_dir=runs, pool_size=2,
                                    personalize_steps=8, distill_steps=2, progress=False))
    run_dir = next(runs.iterdir())
    return s.bundle, run_dir


@pytest.mark.slow
def test_torch_twin_matches_the_runtime_and_bundle_latency_runs(tiny, tmp_path: Path) -> None:
    from benchmarks.latency_vs_torch import speedups
    from o2n_edge.bench.latency import bench_bundle

    bundle, run_dir = tiny
    extra = {"torch": ("benchmarks.latency_vs_torch:torch_runner", {"run_dir": str(run_dir)})}
    res = bench_bundle(bundle, ["torch", "ort-cpu", "ort-tensorrt"], [1, 2], 1, 2, 1, memory=True, extra_runners=extra)
    measured = [r for r in res["rows"] if r["status"] == "measured"]
    assert {(r["backend"], r["batch"]) for r in measured} == {("torch", 1), ("ort-cpu", 1), ("torch", 2), ("ort-cpu", 2)}
    assert res["reference"] == "torch"
    for r in measured:
        assert {"vae_encode", "unet_step_0", "vae_decode", "image_encoder", "scoring"} <= set(r["stages_ms"])
        assert r["memory"].get("peak_rss_mb"), r["memory"]
        if r["backend"] == "ort-cpu":
            assert r["max_rel_score_diff_vs_ref"] < 1e-3  # the twin computes what the runtime computes
            assert 0 < r["non_model_fraction"] < 1
    assert set(speedups(res)) == {"ort-cpu@b1", "ort-cpu@b2"}


@pytest.mark.slow
def test_server_load_and_bench_main_on_a_bundle(tiny, shared_data: Path, tmp_path: Path) -> None:
    from benchmarks.server_load import bench_server
    from o2n_edge.bench import bench_main

    bundle, _ = tiny
    jpegs = [p.read_bytes() for p in sorted((shared_data / "hazelnut_toy/hazelnut/test/good").glob("*.jpg"))[:2]]
    srv = bench_server(bundle, 1, jpegs, clients=(1, 2), per_client=2, warmup=1)
    assert [r["clients"] for r in srv["rows"]] == [1, 2] and srv["rows"][0]["serve"]["requests"] == 2
    doc = bench_main(bundle, ["ort-cpu", "ort-cuda"], ["fp32", "fp16"], [1], tmp_path / "out", 1, 2, 1)
    assert Path(doc["paths"]["md"]).is_file() and len(doc["results"]) == 2
