"""`o2n-edge doctor`: is this machine's execution install what serving needs? Each problem names its fix.

Why a command: a CUDA provider that is silently missing (both onnxruntime and onnxruntime-gpu
installed: onnxruntime issue 26996) makes a GPU line run on the CPU with no error; the line
engineer needs one command that says so and what to type. The provider list alone cannot show
it (it lists what was compiled in, even when CUDA, cuDNN or libnvinfer cannot load), so on a GPU
machine the doctor creates a session per GPU provider on a small shipped graph and checks what
each session really got.
"""

from __future__ import annotations

import typer

from o2n_edge.cli.common import app


@app.command("doctor")
def doctor_cmd() -> None:
    """Check the onnxruntime/TensorRT install for this device; exit 1 with the exact fix when something is wrong."""
    from o2n_edge.runtime.engine_cache import gpu_info, jetpack_version, tensorrt_version
    from o2n_edge.runtime.providers import (
        CPU_PACKAGE,
        GPU_PACKAGE,
        OTHER_PACKAGES,
        install_problems,
        installed_versions,
        probe_problems,
        probe_sessions,
    )

    pkgs = installed_versions((CPU_PACKAGE, GPU_PACKAGE, *OTHER_PACKAGES))
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        providers = []
        typer.echo(f"onnxruntime: cannot import ({exc})")
    gpu = gpu_info()
    trt = tensorrt_version()
    typer.echo("onnxruntime packages: " + (", ".join(f"{k} {v}" for k, v in pkgs.items()) or "none"))
    typer.echo("providers: " + (", ".join(providers) or "none"))
    typer.echo("NVIDIA GPU: " + (f"{gpu[0]} (compute {gpu[1]})" if gpu else "none visible"))
    jp = jetpack_version()
    if jp:
        typer.echo(f"Jetson L4T: {jp}")
    if trt:
        major = int(trt.split(".")[0])
        mode = "strongly typed only (precision from the bundle's graphs)" if major >= 11 else \
            "weak typing available (fp16 engines from fp32 bundles too)"
        typer.echo(f"TensorRT: {trt}, {mode}")
    else:
        typer.echo("TensorRT: not installed (o2n-edge[trt] for native engines)")
    problems = install_problems(providers, gpu is not None)
    if gpu is not None and providers:
        probes = probe_sessions(providers)
        for probe in probes:
            typer.echo("session probe: " + probe.line())
        problems += probe_problems(probes)
    if not problems:
        typer.echo("ok: " + ("a CUDA session works" if gpu is not None and "CUDAExecutionProvider" in providers
                             else "CPU execution (no NVIDIA GPU visible)"))
        return
    for p in problems:
        typer.echo(f"problem: {p.what}\n  fix: {p.fix}", err=True)
    raise typer.Exit(1)
