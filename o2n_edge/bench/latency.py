"""Per-stage latency of a bundle: torch eager (the reference) vs ONNX Runtime, side by side.

Why interleaved: on a shared machine the load changes by the second, so iterations of the
compared backends alternate (torch, ORT, torch, ORT, ...) in one loop with the same thread
count; a busy spell then slows both rather than whichever ran during it.

Why peak memory in a child process: with both backends loaded in one process, neither's peak
can be isolated; a short child (load + a few inferences) per backend gives each its own VmHWM.

Backends that need hardware or libraries this machine lacks (CUDA, TensorRT) are *detected*
and reported as unavailable with the reason; nothing is estimated for them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from o2n_edge.bench.env import UNAVAILABLE, peak_memory, percentiles, set_threads

BACKENDS = ("torch", "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
ORT_PROVIDER = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                "ort-tensorrt": "TensorrtExecutionProvider"}
ORT_BACKEND_NAME = {"ort-cpu": "cpu", "ort-cuda": "cuda", "ort-tensorrt": "tensorrt"}
MODEL_SESSIONS = ("vae_encoder", "unet", "vae_decoder", "image_encoder")
SOURCE_SIDE = 512  # camera image side fed to the pipeline (the hazelnut set's size): preprocess resizes it
IMAGE_SEED = 0
PROBE_ITERS = 3
PROBE_TIMEOUT_S = 600


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not (detected, never assumed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed (o2n-edge[build])"
        return None
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (o2n-edge[trt]) and no NVIDIA GPU is visible"
        return _gpu_reason()
    import onnxruntime as ort

    provider = ORT_PROVIDER[backend]
    if provider not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no {provider} (providers: "
                f"{', '.join(ort.get_available_providers())})")
    return _gpu_reason() if backend != "ort-cpu" else None


def _gpu_reason() -> str | None:
    if not Path("/dev/nvidia0").exists() and not Path("/dev/nvhost-ctrl").exists():
        return "no NVIDIA GPU device node (/dev/nvidia0) on this machine"
    return None


class TimedSession:
    """Wraps an onnxruntime session and adds each ``run`` time to a shared counter.

    The pipeline's stage timings include numpy work between graphs (scheduler steps, resizes);
    summing session time separately splits end-to-end time into model execution and the rest.
    """

    def __init__(self, session: Any, counter: dict[str, float]) -> None:
        self._session = session
        self._counter = counter

    def run(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self._session.run(*args, **kwargs)
        self._counter["model_ms"] = self._counter.get("model_ms", 0.0) + (time.perf_counter() - t0) * 1000.0
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def source_images(n: int, side: int = SOURCE_SIDE, seed: int = IMAGE_SEED) -> list[np.ndarray]:
    """Seeded uint8 camera-size images: latency does not depend on pixel values, only sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    """The image as a JPEG, what a camera or client would send."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ort_session_options(threads: int, graph_optimization: str = "all", mem_arena: bool = True,
                        backend: str = "ort-cpu", bank_search: str = "onnxruntime") -> Any:
    """The runtime's SessionOptions with the benchmark's thread count."""
    from o2n_edge.runtime.pipeline import SessionOptions

    return SessionOptions(backend=ORT_BACKEND_NAME[backend], intra_op_threads=int(threads), inter_op_threads=1,
                          graph_optimization=graph_optimization, enable_mem_arena=mem_arena,
                          bank_search=bank_search)


def open_ort(bundle: Path, threads: int, backend: str = "ort-cpu", overrides: dict[str, Path] | None = None,
             **knobs: Any) -> tuple[Any, dict[str, float]]:
    """An OrtPipeline whose model sessions are timed; ``overrides`` swaps graphs (e.g. int8)."""
    from o2n_edge.runtime.pipeline import OrtPipeline, _make_session

    opts = ort_session_options(threads, backend=backend, **knobs)
    pipe = OrtPipeline(bundle, opts)
    for name, path in (overrides or {}).items():
        if name in pipe.sessions:
            pipe.sessions[name] = _make_session(Path(path), opts)
    counter: dict[str, float] = {}
    for name in list(pipe.sessions):
        pipe.sessions[name] = TimedSession(pipe.sessions[name], counter)
    return pipe, counter


class _Runner:
    """One backend behind a uniform call: images -> (scores, stage timings incl. model_ms)."""

    def __init__(self, name: str, call: Callable[[list[np.ndarray]], tuple[np.ndarray, dict[str, float]]]) -> None:
        self.name = name
        self.call = call
        self.samples: list[dict[str, float]] = []


def _ort_runner(bundle: Path, threads: int, backend: str, overrides: dict[str, Path] | None,
                jpegs: list[bytes], **knobs: Any) -> _Runner:
    pipe, counter = open_ort(bundle, threads, backend, overrides, **knobs)

    def call(images: list[np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter()
        decoded = [pipe.decode(jpegs[i % len(jpegs)], "bench.jpg") for i in range(len(images))]
        decode_ms = (time.perf_counter() - t0) * 1000.0
        if not pipe.jpeg_draft:
            assert decoded[0].shape == images[0].shape
        counter["model_ms"] = 0.0
        # a draft-decoding bundle scores what its decode gives (a reduced-scale JPEG decode)
        results = pipe.inspect_batch(decoded if pipe.jpeg_draft else images)
        t0 = time.perf_counter()
        answers = [json.dumps(r.to_json()) for r in results]
        assert answers
        timings = dict(results[0].timings_ms)
        timings.update(model_ms=counter["model_ms"], decode_jpeg=decode_ms,
                       encode_answer=(time.perf_counter() - t0) * 1000.0)
        return np.array([r.score for r in results]), timings

    return _Runner(backend, call)


def _torch_runner(bundle: Path, run_dir: Path | None) -> _Runner:
    from o2n_edge.bench.torch_reference import TorchPipeline

    pipe = TorchPipeline(bundle, run_dir)
    return _Runner("torch", pipe.inspect_batch)


def make_runner(backend: str, bundle: Path, threads: int, run_dir: Path | None = None,
                overrides: dict[str, Path] | None = None, jpegs: list[bytes] | None = None,
                **knobs: Any) -> _Runner:
    """A runner for an available backend (call :func:`unavailable_reason` first)."""
    if backend == "torch":
        return _torch_runner(bundle, run_dir)
    if backend.startswith("ort-"):
        return _ort_runner(bundle, threads, backend, overrides, jpegs or [jpeg_bytes(source_images(1)[0])], **knobs)
    raise ValueError(f"no runner for {backend!r} on this machine")


def summarize(samples: list[dict[str, float]], batch: int) -> dict[str, Any]:
    """Per-stage percentiles, per-image latency, throughput, and the model / non-model split."""
    stages = sorted({k for s in samples for k in s}, key=_stage_order)
    out: dict[str, Any] = {"stages_ms": {k: percentiles([s[k] for s in samples if k in s]) for k in stages}}
    total = np.array([s["total"] for s in samples])
    out["end_to_end_ms"] = percentiles(total)
    out["per_image_ms_p50"] = round(float(np.median(total)) / batch, 3)
    out["throughput_img_s"] = round(batch * 1000.0 / float(np.median(total)), 3)
    if all("model_ms" in s for s in samples):
        io = np.array([s["total"] + s.get("decode_jpeg", 0.0) + s.get("encode_answer", 0.0) for s in samples])
        model = np.array([s["model_ms"] for s in samples])
        out["with_io_ms"] = percentiles(io)
        out["model_ms_p50"] = round(float(np.median(model)), 3)
        out["non_model_fraction"] = round(float(np.median((io - model) / io)), 4)
    return out


def _stage_order(name: str) -> tuple[int, str]:
    order = ["decode_jpeg", "preprocess", "transform_preprocess", "vae_encode", "unet_step", "vae_decode",
             "image_encoder", "scoring", "postprocess", "encode_answer", "model_ms", "total"]
    for i, key in enumerate(order):
        if name.startswith(key):
            return i, name
    return len(order), name


def run_interleaved(runners: list[_Runner], images: list[np.ndarray], warmup: int, iters: int,
                    time_budget_s: float | None = None) -> dict[str, Any]:
    """Warm every runner up, then alternate them ``iters`` times; returns the first scores too."""
    scores = {}
    for r in runners:
        for _ in range(max(1, warmup)):
            scores[r.name], _ = r.call(images)
        r.samples = []
    t_start = time.perf_counter()
    done = 0
    for _ in range(iters):
        for r in runners:
            _, timings = r.call(images)
            r.samples.append(timings)
        done += 1
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            break
    return {"scores": scores, "iters_done": done}


def peak_rss_probe(backend: str, bundle: Path, batch: int, threads: int, run_dir: Path | None = None,
                   iters: int = PROBE_ITERS) -> dict[str, Any]:
    """Peak RSS (MiB) of a fresh process that loads ``backend`` and runs ``iters`` inferences."""
    cmd = [sys.executable, "-m", "o2n_edge.bench.latency", "--probe", backend, "--bundle", str(bundle),
           "--batch", str(batch), "--threads", str(threads), "--iters", str(iters)]
    if run_dir:
        cmd += ["--run-dir", str(run_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {PROBE_TIMEOUT_S}s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_main(backend: str, bundle: Path, batch: int, threads: int, iters: int, run_dir: Path | None) -> None:
    set_threads(threads)
    with peak_memory() as mem:
        runner = make_runner(backend, bundle, threads, run_dir)
        images = source_images(batch)
        for _ in range(iters):
            runner.call(images)
    print(json.dumps({k: v for k, v in mem.items() if k != "reset"} | {"iters": iters, "process": "fresh child"}))


def bench_bundle(bundle: Path, backends: list[str], batches: list[int], warmup: int, iters: int, threads: int,
                 run_dir: Path | None = None, memory: bool = True,
                 overrides: dict[str, Path] | None = None) -> dict[str, Any]:
    """Side-by-side per-stage latency of ``backends`` on ``bundle`` at each batch size."""
    from o2n_edge.runtime.bundle import load_bundle

    set_threads(threads)
    manifest = load_bundle(bundle).manifest
    rows: list[dict[str, Any]] = []
    available = []
    for b in backends:
        reason = unavailable_reason(b)
        if reason:
            rows.append({"backend": b, "status": UNAVAILABLE, "reason": reason})
        else:
            available.append(b)
    jpegs = [jpeg_bytes(im) for im in source_images(max(batches))]
    runners = [make_runner(b, bundle, threads, run_dir, overrides, jpegs) for b in available]
    for batch in batches:
        images = source_images(batch)
        res = run_interleaved(runners, images, warmup, iters)
        ref = res["scores"].get("torch")
        for r in runners:
            row = {"backend": r.name, "status": "measured", "batch": batch, "iters": len(r.samples),
                   "warmup": warmup, **summarize(r.samples, batch)}
            if ref is not None and r.name != "torch":
                diff = np.abs(res["scores"][r.name] - ref)
                row["max_abs_score_diff_vs_torch"] = float(diff.max())
                row["max_rel_score_diff_vs_torch"] = float((diff / np.maximum(1.0, np.abs(ref))).max())
            if memory:
                row["memory"] = peak_rss_probe(r.name, bundle, batch, threads, run_dir)
            rows.append(row)
    return {"kind": "bundle_latency", "bundle": str(bundle), "profile": manifest["profile"],
            "category": manifest["category"], "image_size": manifest["image_size"],
            "diffusion_image_size": manifest.get("diffusion_image_size"), "steps_run": manifest.get("steps_run"),
            "branches": manifest["scoring"]["branches"], "source_image_side": SOURCE_SIDE,
            "overrides": {k: str(v) for k, v in (overrides or {}).items()}, "rows": rows}


def speedups(result: dict[str, Any], baseline: str = "torch") -> dict[str, float]:
    """Per-image p50 speed-up of every measured row over ``baseline`` at the same batch."""
    base = {r["batch"]: r["per_image_ms_p50"] for r in result["rows"] if r.get("backend") == baseline and "batch" in r}
    out = {}
    for r in result["rows"]:
        if r.get("status") == "measured" and r["backend"] != baseline and r["batch"] in base:
            out[f"{r['backend']}@b{r['batch']}"] = round(base[r["batch"]] / r["per_image_ms_p50"], 3)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry of the peak-memory probe child (``--probe``)."""
    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=PROBE_ITERS)
    p.add_argument("--run-dir", type=Path, default=None)
    a = p.parse_args(argv)
    _probe_main(a.probe, a.bundle, a.batch, a.threads, a.iters, a.run_dir)


if __name__ == "__main__":
    main()
