"""Per-stage latency of a bundle on the runtime's backends, side by side.

Why interleaved: on a shared machine the load changes by the second, so the backends alternate
(A, B, A, B, ...) in one loop; a busy spell slows all of them alike. Why peak memory in a child
process: in one process no backend's peak can be isolated. Backends this machine lacks are
reported as unavailable with the reason, never estimated. A study adds its own backend (e.g.
torch eager) as a factory ``("module:function", kwargs)``, so the probe child can build it too.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from o2n_edge.bench.env import UNAVAILABLE, peak_memory, percentiles, set_threads

BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt")
ORT_PROVIDER = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                "ort-tensorrt": "TensorrtExecutionProvider"}
SOURCE_SIDE = 512  # camera image side fed to the pipeline (the hazelnut set's size): preprocess resizes it
PROBE_ITERS = 3
PROBE_TIMEOUT_S = 600
ExtraRunner = tuple[str, dict[str, Any]]  # ("module:function", JSON-able keyword arguments)


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not (detected, never assumed)."""
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if ORT_PROVIDER[backend] not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no {ORT_PROVIDER[backend]} (providers: "
                f"{', '.join(ort.get_available_providers())})")
    if backend != "ort-cpu" and not Path("/dev/nvidia0").exists() and not Path("/dev/nvhost-ctrl").exists():
        return "no NVIDIA GPU device node (/dev/nvidia0) on this machine"
    return None


class TimedSession:
    """An onnxruntime session that adds each ``run`` time to a shared counter: model execution vs the rest."""

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


def source_images(n: int, side: int = SOURCE_SIDE, seed: int = 0) -> list[np.ndarray]:
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


def open_ort(bundle: Path, threads: int, backend: str = "ort-cpu", overrides: dict[str, Path] | None = None,
             **knobs: Any) -> tuple[Any, dict[str, float]]:
    """An OrtPipeline whose model sessions are timed; ``knobs`` are SessionOptions fields, ``overrides`` swap graphs."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions, _make_session

    opts = SessionOptions(backend=backend.removeprefix("ort-"), intra_op_threads=int(threads), inter_op_threads=1,
                          **knobs)
    pipe = OrtPipeline(bundle, opts)
    for name, path in (overrides or {}).items():
        if name in pipe.sessions:
            pipe.sessions[name] = _make_session(Path(path), opts)
    counter: dict[str, float] = {}
    for name in list(pipe.sessions):
        pipe.sessions[name] = TimedSession(pipe.sessions[name], counter)
    return pipe, counter


@dataclass
class Runner:
    """One backend behind a uniform call: images -> (scores, stage timings incl. model_ms)."""

    name: str
    call: Callable[[list[np.ndarray]], tuple[np.ndarray, dict[str, float]]]
    samples: list[dict[str, float]] = field(default_factory=list)


def _ort_runner(bundle: Path, threads: int, backend: str, overrides: dict[str, Path] | None,
                jpegs: list[bytes], **knobs: Any) -> Runner:
    pipe, counter = open_ort(bundle, threads, backend, overrides, **knobs)

    def call(images: list[np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter()
        decoded = [pipe.decode(jpegs[i % len(jpegs)], "bench.jpg") for i in range(len(images))]
        decode_ms = (time.perf_counter() - t0) * 1000.0
        counter["model_ms"] = 0.0
        # a draft-decoding bundle scores what its decode gives (a reduced-scale JPEG decode)
        results = pipe.inspect_batch(decoded if pipe.jpeg_draft else images)
        t0 = time.perf_counter()
        [json.dumps(r.to_json()) for r in results]  # what a server does before answering
        timings = dict(results[0].timings_ms)
        timings.update(model_ms=counter["model_ms"], decode_jpeg=decode_ms,
                       encode_answer=(time.perf_counter() - t0) * 1000.0)
        return np.array([r.score for r in results]), timings

    return Runner(backend, call)


def make_runner(backend: str, bundle: Path, threads: int, overrides: dict[str, Path] | None = None,
                jpegs: list[bytes] | None = None, extra: ExtraRunner | None = None, **knobs: Any) -> Runner:
    """A runner for an available backend (call :func:`unavailable_reason` first) or a study's extra one."""
    if extra is not None:
        module, func = extra[0].split(":")
        runner = getattr(importlib.import_module(module), func)(bundle, threads, **extra[1])
        runner.name = backend
        return runner
    return _ort_runner(bundle, threads, backend, overrides, jpegs or [jpeg_bytes(source_images(1)[0])], **knobs)


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


def run_interleaved(runners: list[Runner], images: list[np.ndarray], warmup: int, iters: int) -> dict[str, Any]:
    """Warm every runner up, then alternate them ``iters`` times; returns the warm-up scores too."""
    scores = {}
    for r in runners:
        for _ in range(max(1, warmup)):
            scores[r.name], _ = r.call(images)
        r.samples = []
    for _ in range(iters):
        for r in runners:
            r.samples.append(r.call(images)[1])
    return {"scores": scores}


def peak_rss_probe(backend: str, bundle: Path, batch: int, threads: int, extra: ExtraRunner | None = None,
                   iters: int = PROBE_ITERS) -> dict[str, Any]:
    """Peak RSS (MiB) of a fresh process that loads ``backend`` and runs ``iters`` inferences."""
    spec = {"backend": backend, "bundle": str(bundle), "batch": batch, "threads": threads, "iters": iters,
            "extra": extra}
    cmd = [sys.executable, "-m", "o2n_edge.bench.latency", json.dumps(spec, default=str)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {PROBE_TIMEOUT_S}s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_bundle(bundle: Path, backends: list[str], batches: list[int], warmup: int, iters: int, threads: int,
                 memory: bool = True, overrides: dict[str, Path] | None = None,
                 extra_runners: dict[str, ExtraRunner] | None = None) -> dict[str, Any]:
    """Side-by-side per-stage latency of ``backends`` on ``bundle`` at each batch size.

    The first measured backend is the reference: every other row carries its largest score
    difference from it, so a backend that computed something else shows up next to its speed.
    """
    from o2n_edge.runtime.bundle import load_bundle

    set_threads(threads)
    extra_runners, manifest = extra_runners or {}, load_bundle(bundle).manifest_data
    rows: list[dict[str, Any]] = []
    available: list[str] = []
    for b in backends:
        reason = None if b in extra_runners else unavailable_reason(b)
        if reason:
            rows.append({"backend": b, "status": UNAVAILABLE, "reason": reason})
        else:
            available.append(b)
    jpegs = [jpeg_bytes(im) for im in source_images(max(batches))]
    runners = [make_runner(b, bundle, threads, overrides, jpegs, extra_runners.get(b)) for b in available]
    reference = runners[0].name if runners else None
    for batch in batches:
        images = source_images(batch)
        res = run_interleaved(runners, images, warmup, iters)
        for r in runners:
            row = {"backend": r.name, "status": "measured", "batch": batch, "iters": len(r.samples),
                   "warmup": warmup, **summarize(r.samples, batch)}
            if r.name != reference:
                ref = res["scores"][reference]
                diff = np.abs(res["scores"][r.name] - ref)
                row["max_abs_score_diff_vs_ref"] = float(diff.max())
                row["max_rel_score_diff_vs_ref"] = float((diff / np.maximum(1.0, np.abs(ref))).max())
            if memory:
                row["memory"] = peak_rss_probe(r.name, bundle, batch, threads, extra_runners.get(r.name))
            rows.append(row)
    return {"kind": "bundle_latency", "bundle": str(bundle), "profile": manifest.profile,
            "category": manifest.category, "image_size": manifest.image_size,
            "diffusion_image_size": manifest.diffusion_image_size, "steps_run": manifest.steps_run,
            "branches": list(manifest.branches), "source_image_side": SOURCE_SIDE, "reference": reference,
            "overrides": {k: str(v) for k, v in (overrides or {}).items()}, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """The peak-memory probe child: load one backend, run a few inferences, print the peak as JSON."""
    a = json.loads((argv or sys.argv[1:])[0])
    set_threads(a["threads"])
    with peak_memory() as mem:
        runner = make_runner(a["backend"], Path(a["bundle"]), a["threads"], extra=a["extra"])
        images = source_images(a["batch"])
        for _ in range(a["iters"]):
            runner.call(images)
    print(json.dumps({k: v for k, v in mem.items() if k != "reset"} | {"iters": a["iters"], "process": "fresh child"}))


if __name__ == "__main__":
    main()
