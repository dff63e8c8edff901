"""One-shot GPU check of the sd15 dry-run bundle: doctor, native engines, ORT CUDA, ORT TensorRT, native.

Why: no GPU is lent where this project is developed, so the whole GPU path (install, engine
build with the installed TensorRT 10 or 11, the three GPU backends, scores against the CPU run)
must be verifiable by ONE prepared command on any NVIDIA machine: ``benchmarks/gpu_check.sh``.
Each backend scores the images the CPU dry run scored and is compared with those CPU scores.
Writes ``gpu_check.{json,md}``; exits non-zero when a backend fails, falls back to the CPU, or
disagrees with the CPU beyond the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("cuda", "tensorrt", "trt-native")
# Smoke bound on |GPU - CPU| score, relative to max(1, |CPU score|): random weights and fp16
# kernels that differ between devices; the real parity bound is the export's (2e-3, fp32, CPU).
SCORE_RTOL = 0.05
WARM_RUNS = 2


def _score(pipe: Any, images: list[np.ndarray]) -> tuple[list[float], list[float]]:
    scores, walls = [], []
    for img in images:
        t = time.perf_counter()
        scores.append(float(pipe.inspect(img).score))
        walls.append(time.perf_counter() - t)
    return scores, walls


def run_check(bundle: Path, cpu_stage: Path, data: Path, out: Path) -> int:
    """Run every check; write results; return the process exit code."""
    from o2n_edge.data import load_image
    from o2n_edge.runtime.engine_cache import gpu_info, tensorrt_version
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
    from o2n_edge.runtime.providers import install_problems

    cpu = json.loads(cpu_stage.read_text())["info"]
    images = [load_image(data / rel) for rel in cpu["images_paths"]]
    doc: dict[str, Any] = {"bundle": str(bundle), "gpu": gpu_info(), "tensorrt": tensorrt_version(),
                           "cpu_scores": cpu["scores"], "checks": {}, "score_rtol": SCORE_RTOL}
    try:
        import onnxruntime as ort

        doc["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError as exc:
        doc["onnxruntime"] = {"error": str(exc)}
    problems = install_problems(doc["onnxruntime"].get("providers", []), doc["gpu"] is not None)
    doc["checks"]["doctor"] = {"ok": not problems, "problems": [p.line() for p in problems]}

    t = time.perf_counter()
    try:
        from o2n_edge.export.tensorrt_build import build_engines

        reports = build_engines(bundle)
        doc["checks"]["build_engines"] = {"ok": True, "wall_s": round(time.perf_counter() - t, 1),
                                          "engines": {k: r.to_dict() for k, r in reports.items()}}
    except Exception as exc:  # noqa: BLE001 - recorded and reported, the other checks still run
        doc["checks"]["build_engines"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    want = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    for backend in BACKENDS:
        rec: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            pipe = OrtPipeline(bundle, SessionOptions(backend=backend))
            rec["load_s"] = round(time.perf_counter() - t, 1)  # includes the TensorRT EP's engine builds
            sessions = {n: type(s).__name__ if not hasattr(s, "get_providers") else s.get_providers()[0]
                        for n, s in pipe.sessions.items()}
            rec["sessions"] = sessions
            for _ in range(WARM_RUNS - 1):
                _score(pipe, images[:1])
            scores, walls = _score(pipe, images)
            diff = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(scores, cpu["scores"])]
            rec.update(scores=scores, per_image_s=[round(w, 3) for w in walls], max_rel_diff_vs_cpu=max(diff),
                       timings_ms=pipe.inspect(images[0]).timings_ms)
            on_gpu = (all(v != "CPUExecutionProvider" for v in sessions.values()) if backend != "trt-native"
                      else any(v == "TrtSession" for v in sessions.values()))
            if backend in want:
                on_gpu = on_gpu and all(v == want[backend] for v in sessions.values())
            rec["ok"] = bool(on_gpu and np.isfinite(scores).all() and max(diff) <= SCORE_RTOL)
            if not on_gpu:
                rec["error"] = f"sessions not on the {backend} provider: {sessions}"
        except Exception as exc:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        doc["checks"][backend] = rec
    doc["ok"] = all(c.get("ok") for c in doc["checks"].values())
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    lines = ["# GPU check of the sd15 dry-run bundle", "",
             f"Bundle `{bundle}`; GPU {doc['gpu']}; TensorRT {doc['tensorrt']}; onnxruntime "
             f"{doc['onnxruntime'].get('version')}. Scores compared with the CPU run ({cpu_stage.name}), "
             f"relative tolerance {SCORE_RTOL}.", "",
             "| check | ok | s/image | max rel. diff vs CPU | notes |", "|---|---|---|---|---|"]
    for name, c in doc["checks"].items():
        note = c.get("error") or (", ".join(c.get("problems", [])) if name == "doctor" else
                                  (f"load {c.get('load_s')} s" if "load_s" in c else f"{c.get('wall_s')} s"))
        lines.append(f"| {name} | {'yes' if c.get('ok') else 'NO'} | {c.get('per_image_s', '')} | "
                     f"{c.get('max_rel_diff_vs_cpu', '')} | {note} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if doc["ok"] else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--cpu-stage", type=Path, required=True, help="the dry run's runtime_<bundle>.json")
    p.add_argument("--data", type=Path, required=True, help="the dry run's data folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    sys.exit(run_check(a.bundle, a.cpu_stage, a.data, a.out))


if __name__ == "__main__":
    main()
