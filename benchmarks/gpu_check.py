"""The stages of the one GPU check (``benchmarks/gpu_check.sh``): each records its verdict as it ends.

Why staged: the check runs once, on a lent GPU, with minutes to spare; a stage that hangs or runs
past its budget must not erase what the others found. So the shell script runs every stage under
its own ``timeout`` and each stage merges its checks into ``gpu_check.json`` the moment it has
them; a stage killed by its budget is recorded by the script (``record``). Every check ends in one
of three states: ``passed``, ``failed`` (with the reason) or ``not checked`` (with the reason,
e.g. "onnxruntime-gpu not installed" on an offline box), and only ``passed`` counts as passed.

Stages: ``doctor`` (the install: real sessions, not provider lists), ``backends`` (a bundle on
ORT CUDA, ORT TensorRT with its engine files, native TensorRT; scores against the CPU), ``triton``
(a GPU repository's configs), ``record`` and ``summary`` (table, exit code: 0 all passed, 1 not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

PASSED, FAILED, NOT_CHECKED = "passed", "failed", "not checked"
BACKENDS = ("cuda", "tensorrt", "trt-native")
PROVIDER = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# |GPU - CPU| score bound relative to max(1, |CPU|), by the bundle's precision: fp32 graphs differ
# only in kernel order; fp16 graphs in fp16 kernels that differ between devices. A manifest's own
# "gpu_score_rtol" wins.
SCORE_RTOL = {"fp32": 5e-3, "fp16": 5e-2}
DEFAULT_RESULTS = Path("benchmarks/results/gpu_check.json")
N_IMAGES = 4
TENSORRT_SDIST_NOTE = ("tensorrt-cu12 on PyPI is an sdist that downloads its wheels from NVIDIA's index "
                       "(pypi.nvidia.com) at install time: carry the tensorrt_cu12_libs/bindings wheels")


# ------------------------------------------------------------------------------ results file


def record(results: Path, name: str, status: str, reason: str = "", only_if_missing: bool = False,
           **facts: Any) -> dict[str, Any]:
    """Merge one check into ``results`` now (atomic rewrite): what a killed stage leaves behind."""
    if status not in (PASSED, FAILED, NOT_CHECKED):
        raise ValueError(f"status must be {PASSED!r}, {FAILED!r} or {NOT_CHECKED!r}, got {status!r}")
    doc = load(results)
    if only_if_missing and name in doc["checks"]:
        return doc
    doc["checks"][name] = {"status": status, **({"reason": reason} if reason else {}), **facts,
                           "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(f".{results.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, results)
    return doc


def load(results: Path) -> dict[str, Any]:
    """The results so far (an empty document when none)."""
    if results.is_file():
        doc = json.loads(results.read_text())
        doc.setdefault("checks", {})
        return doc
    return {"checks": {}}


def missing(offline: bool) -> str:
    """How a check whose package is absent ends: not checked offline (nothing can be installed), failed online."""
    return NOT_CHECKED if offline else FAILED


# ------------------------------------------------------------------------------ verdicts


def session_kinds(sessions: Mapping[str, Any]) -> dict[str, str]:
    """What each graph really runs on: ``"native"`` for a TrtSession, else its session's first provider."""
    from o2n_edge.runtime.trt_session import TrtSession

    return {n: "native" if isinstance(s, TrtSession) else str(s.get_providers()[0]) for n, s in sessions.items()}


def off_backend(backend: str, kinds: Mapping[str, str]) -> dict[str, str]:
    """The graphs NOT on ``backend`` (empty = every graph is): all graphs must be, not any."""
    want = "native" if backend == "trt-native" else PROVIDER[backend]
    return {n: k for n, k in kinds.items() if k != want}


def score_rtol(manifest: Mapping[str, Any]) -> float:
    """The bundle's tolerance for GPU-vs-CPU scores (its own when the manifest has one)."""
    return float(manifest.get("gpu_score_rtol", SCORE_RTOL.get(str(manifest.get("precision", "fp32")), 5e-2)))


def compare(scores: list[float], cpu: list[float], rtol: float) -> tuple[bool, float]:
    """``(within tolerance and finite, max relative difference)``."""
    diff = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(scores, cpu)]
    worst = max(diff) if diff else float("inf")
    return bool(np.isfinite(scores).all() and len(scores) == len(cpu) and worst <= rtol), worst


# ------------------------------------------------------------------------------ stages


def stage_doctor(results: Path, offline: bool) -> None:
    """The execution install as serving sees it: packages, GPU, and a real session per GPU provider."""
    from o2n_edge.runtime.engine_cache import gpu_info, tensorrt_version
    from o2n_edge.runtime.providers import install_problems, probe_problems, probe_sessions

    gpu, trt = gpu_info(), tensorrt_version()
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception as exc:  # noqa: BLE001
        record(results, "doctor", missing(offline), f"onnxruntime does not import ({exc})", gpu=gpu)
        return
    facts = {"gpu": gpu, "tensorrt": trt, "onnxruntime": ort.__version__, "providers": providers}
    if "CUDAExecutionProvider" not in providers and offline:
        record(results, "doctor", NOT_CHECKED, "onnxruntime-gpu not installed (only a CPU onnxruntime)", **facts)
        return
    probes = probe_sessions(providers)
    problems = install_problems(providers, gpu is not None) + probe_problems(probes)
    facts["sessions"] = [p.line() for p in probes]
    if problems:
        record(results, "doctor", FAILED, "; ".join(p.line() for p in problems), **facts)
    else:
        record(results, "doctor", PASSED, **facts)


def _images(n: int = N_IMAGES) -> list[np.ndarray]:
    """Test images of the built-in textile set (what the check's bundles are made from)."""
    from o2n_edge.data import load_dataset, load_image

    ds = load_dataset(None, "textile", "textile")
    return [load_image(s.path) for s in list(ds.test)[:n]]


def _scores(pipe: Any, images: list[np.ndarray]) -> list[float]:
    return [float(r.score) for r in pipe.inspect_batch(images)]


def stage_backends(results: Path, bundle: Path, label: str, offline: bool,
                   images: Callable[[], list[np.ndarray]] = _images) -> None:
    """``bundle`` on the three GPU backends, each recorded as ``<label>:<backend>`` when it ends."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
    from o2n_edge.runtime.providers import ort_trt_engine_files
    from o2n_edge.runtime.trt_session import trt_available

    imgs = images()
    cpu_pipe = OrtPipeline(bundle)
    cpu = _scores(cpu_pipe, imgs)
    rtol = score_rtol(cpu_pipe.manifest)
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    for backend in BACKENDS:
        name = f"{label}:{backend}"
        facts: dict[str, Any] = {"bundle": str(bundle), "cpu_scores": cpu, "score_rtol": rtol}
        if backend in PROVIDER and PROVIDER[backend] not in available:
            why = ("onnxruntime-gpu not installed (only a CPU onnxruntime)" if "CUDAExecutionProvider" not in available
                   else f"this onnxruntime build has no {PROVIDER[backend]}")
            record(results, name, missing(offline), why, **facts)
            continue
        if backend == "trt-native":
            ok, why = trt_available()
            if not ok:
                record(results, name, missing(offline), f"{why}; {TENSORRT_SDIST_NOTE}", **facts)
                continue
        try:
            t = time.perf_counter()
            if backend == "trt-native":
                from o2n_edge.export.tensorrt_build import build_engines

                reports = build_engines(bundle)
                facts["engines"] = {k: r.to_dict() for k, r in reports.items()}
                facts["build_s"] = round(time.perf_counter() - t, 1)
            pipe = OrtPipeline(bundle, SessionOptions(backend=backend))
            facts["load_s"] = round(time.perf_counter() - t, 1)
            scores = _scores(pipe, imgs)
            kinds = session_kinds(pipe.sessions)
            within, worst = compare(scores, cpu, rtol)
            facts.update(sessions=kinds, scores=scores, max_rel_diff_vs_cpu=worst)
            reasons = []
            if off := off_backend(backend, kinds):
                reasons.append(f"graphs not on {backend}: {off}")
            if backend == "tensorrt":
                facts["engine_files"] = {n: [p.name for p in ort_trt_engine_files(bundle, n)] for n in pipe.sessions}
                if empty := [n for n, files in facts["engine_files"].items() if not files]:
                    reasons.append(f"the TensorRT EP built no engine for {empty} (it took zero of their nodes)")
            if not within:
                reasons.append(f"scores differ from the CPU by {worst:.3g} > {rtol}")
            record(results, name, FAILED if reasons else PASSED, "; ".join(reasons), **facts)
        except Exception as exc:  # noqa: BLE001 - recorded; the next backend still runs
            record(results, name, FAILED, f"{type(exc).__name__}: {exc}", **facts)


def stage_triton(results: Path, bundle: Path, out: Path) -> None:
    """A ``--device gpu`` Triton repository of ``bundle``: every config parses, every instance on the GPU."""
    from o2n_edge.triton.config import try_check_config
    from o2n_edge.triton.repository import RepositoryOptions, write_repository

    try:
        summary = write_repository(bundle, out, RepositoryOptions(device="gpu", force=True))
    except Exception as exc:  # noqa: BLE001
        record(results, "triton", FAILED, f"{type(exc).__name__}: {exc}")
        return
    kinds = {m: [g["kind"] for g in c.get("instance_group", [])] for m, c in summary.configs.items()}
    facts = {"repository": str(out), "models": summary.models, "instance_kinds": kinds}
    bad = {m: k for m, k in kinds.items() if any(x != "KIND_GPU" for x in k)}
    if bad:
        record(results, "triton", FAILED, f"instances not on the GPU: {bad}", **facts)
        return
    texts = {m: (out / m / "config.pbtxt").read_text() for m in summary.configs}
    if not all(try_check_config(t, m) for m, t in texts.items()):
        record(results, "triton", NOT_CHECKED, "tritonclient not installed: configs not parsed", **facts)
        return
    record(results, "triton", PASSED, **facts)


def summary(results: Path) -> int:
    """Print and write the table (``gpu_check.md``); 0 when every check passed, else 1, naming them."""
    doc = load(results)
    checks = doc["checks"]
    lines = ["# GPU check", "", "| check | status | reason |", "|---|---|---|"]
    lines += [f"| {n} | {c['status'].upper()} | {c.get('reason', '')} |" for n, c in checks.items()]
    failed = [n for n, c in checks.items() if c["status"] == FAILED]
    unchecked = [n for n, c in checks.items() if c["status"] == NOT_CHECKED]
    lines += ["", f"{len(checks) - len(failed) - len(unchecked)} passed; failed: {', '.join(failed) or 'none'}; "
                  f"NOT CHECKED: {', '.join(unchecked) or 'none'}"]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if checks and not failed and not unchecked else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gpu_check STAGE ...`` (the shell script's stages)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--offline", action="store_true", help="packages missing here are NOT CHECKED, not failed")
    sub = p.add_subparsers(dest="stage", required=True)
    sub.add_parser("doctor")
    b = sub.add_parser("backends")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--label", required=True)
    t = sub.add_parser("triton")
    t.add_argument("--bundle", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("--check", required=True)
    r.add_argument("--status", required=True, choices=(PASSED, FAILED, NOT_CHECKED))
    r.add_argument("--reason", default="")
    r.add_argument("--if-missing", action="store_true", help="keep what the stage itself recorded")
    sub.add_parser("summary")
    a = p.parse_args(argv)
    if a.stage == "doctor":
        stage_doctor(a.results, a.offline)
    elif a.stage == "backends":
        stage_backends(a.results, a.bundle, a.label, a.offline)
    elif a.stage == "triton":
        stage_triton(a.results, a.bundle, a.out)
    elif a.stage == "record":
        record(a.results, a.check, a.status, a.reason, only_if_missing=a.if_missing)
    else:
        return summary(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
