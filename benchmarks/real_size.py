"""Latency at production sizes: SD-1.5 UNet and VAE, CLIP ViT-B/16 image tower; torch vs ORT CPU.

Why random weights: no SD-1.5 or CLIP checkpoint is available offline here, and latency does not
depend on weight values (the same ops on the same shapes; no data-dependent control flow in
these networks), so the architectures are built from their published configs with seeded init.
Scores from these graphs are meaningless and none are reported.

Why the project's export path: the graphs are exported with ``export/specs.py`` and
``export/onnx_export.export_onnx`` exactly as a bundle's would be (external data for the
3.4 GB UNet), so the ORT figure is the figure of what the runtime would load. Validation
(``check``) and onnxslim simplification are off here (``EXPORT_CHECK``/``EXPORT_SIMPLIFY``):
comparing a 3.4 GB graph with torch at two extra batch sizes, and simplifying it, would take
longer than the benchmark; ORT's own graph optimizations (level "all") still run at load.
Exports are cached under ``CACHE_DIR`` (never committed).

Usage: python -m benchmarks.real_size [--resolution 256] [--iters 3] [--threads 1] [--taesd]
Writes benchmarks/results/latency_real_size.{json,md} (--taesd: latency_autoencoder_tiny, the
AutoencoderTiny encode/decode instead; that one is not kept in results/, see its README).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from benchmarks.harness import RESULTS, machine_stamp, percentiles, set_threads, stamp_lines, write_json, write_text

torch = require("torch", "the real-size benchmark")

CACHE_DIR = Path(".bench_cache") / "real_size"
SEED = 0
EXPORT_CHECK = False
EXPORT_SIMPLIFY = False
PROMPT_LEN, PROMPT_DIM = 77, 768
CLIP_MODEL, CLIP_IMAGE_SIZE = "ViT-B-16", 224
TIMESTEP = 299  # any training timestep: the UNet's cost does not depend on it
# SD-1.5's published UNet/VAE configs (runwayml/stable-diffusion-v1-5, unet/ and vae/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, downsample_padding=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    act_fn="silu", norm_num_groups=32, scaling_factor=0.18215,
)
STAGES = ("vae_encode", "unet_step", "vae_decode", "image_encoder")
TINY_VAE_STAGES = ("taesd_encode", "taesd_decode")  # diffusers AutoencoderTiny (TAESD architecture)


def build_sd15_unet() -> Any:
    """SD-1.5 UNet2DConditionModel (860M parameters), seeded random init."""
    import diffusers
    import torch

    torch.manual_seed(SEED)
    return diffusers.UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)


def build_sd15_vae() -> Any:
    """SD-1.5 AutoencoderKL (84M parameters), seeded random init."""
    import diffusers
    import torch

    torch.manual_seed(SEED)
    return diffusers.AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)


def build_autoencoder_tiny() -> Any:
    """diffusers' AutoencoderTiny with its default (TAESD, SD-1.5 latent) config, seeded init.

    Latency only: a useful tiny VAE needs trained weights (TAESD's or distilled from the run's VAE).
    """
    import diffusers
    import torch

    torch.manual_seed(SEED)
    return diffusers.AutoencoderTiny().eval().requires_grad_(False)


class TinyEncodeWrapper(torch.nn.Module):
    """pixels in [-1, 1] -> AutoencoderTiny latents (its own scaling; latency only)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: Any) -> Any:
        return self.vae.encode(pixels, return_dict=False)[0]


class TinyDecodeWrapper(torch.nn.Module):
    """AutoencoderTiny latents -> pixels (latency only)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: Any) -> Any:
        return self.vae.decode(latent, return_dict=False)[0]


def build_clip_b16() -> Any:
    """The project's OpenClipEncoder on open_clip's ViT-B-16 config, no checkpoint (seeded init)."""
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import EncoderSpec

    return build_encoder(EncoderSpec(kind="open_clip", image_size=CLIP_IMAGE_SIZE, model_name=CLIP_MODEL, seed=SEED))


def _spec_and_wrapper(stage: str, model: Any, resolution: int) -> tuple[Any, Any]:
    from o2n_edge.export.specs import image_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

    latent = resolution // 8
    if stage == "unet_step":
        spec = unet_spec(model, PROMPT_LEN, PROMPT_DIM, latent)
    elif stage == "vae_encode":
        spec = vae_encoder_spec(model, resolution)
    elif stage == "vae_decode":
        spec = vae_decoder_spec(model, latent)
    elif stage == "taesd_encode":
        spec = vae_encoder_spec(model, resolution, name="taesd_encoder", wrap=TinyEncodeWrapper)
    elif stage == "taesd_decode":
        spec = vae_decoder_spec(model, latent, name="taesd_decoder", wrap=TinyDecodeWrapper)
    else:
        spec = image_encoder_spec(model)
    return spec, spec.wrap(model)


def export_cached(stage: str, model: Any, resolution: int, cache_dir: Path = CACHE_DIR) -> tuple[Path, dict]:
    """Export one stage's graph (idempotent: the project's sidecar hash skips a current one)."""
    from o2n_edge.export.onnx_export import export_onnx

    spec, wrapper = _spec_and_wrapper(stage, model, resolution)
    sub = "clip" if stage == "image_encoder" else f"r{resolution}"
    path = (cache_dir / sub / f"{spec.name}.onnx").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rep = export_onnx(wrapper.float(), spec, path, "fp32", check=EXPORT_CHECK, simplify=EXPORT_SIMPLIFY)
    return path, {"path": str(path), "bytes": rep.bytes, "external_data": rep.external_data,
                  "skipped_cached": rep.skipped, "export_s": round(time.perf_counter() - t0, 1),
                  "validated": EXPORT_CHECK, "simplified": EXPORT_SIMPLIFY}


def _inputs(stage: str, model: Any, resolution: int) -> tuple[Any, ...]:
    spec, _ = _spec_and_wrapper(stage, model, resolution)
    xs = spec.make_inputs(1, seed=SEED)
    if stage == "unet_step":
        xs = (xs[0], xs[1].new_full(xs[1].shape, TIMESTEP), *xs[2:])
    return xs


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def bench_stage(stage: str, resolution: int, warmup: int, iters: int, threads: int,
                cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """torch eager vs ORT CPU on one real-size stage, interleaved, batch 1."""
    import torch

    set_threads(threads)
    builder = {"unet_step": build_sd15_unet, "vae_encode": build_sd15_vae, "vae_decode": build_sd15_vae,
               "image_encoder": build_clip_b16,
               "taesd_encode": build_autoencoder_tiny, "taesd_decode": build_autoencoder_tiny}[stage]
    model = builder()
    n_params = sum(p.numel() for p in model.parameters())
    path, export_info = export_cached(stage, model, resolution, cache_dir)
    spec, wrapper = _spec_and_wrapper(stage, model, resolution)
    xs = _inputs(stage, model, resolution)
    t0 = time.perf_counter()
    sess = _session(path, threads)
    load_s = time.perf_counter() - t0
    feeds = {n: x.numpy() for n, x in zip(spec.input_names, xs)}

    def run_torch() -> Any:
        with torch.inference_mode():
            return wrapper(*xs)

    def run_ort() -> Any:
        return sess.run(None, feeds)

    times: dict[str, list[float]] = {"torch": [], "ort-cpu": []}
    for _ in range(warmup):
        a, b = run_torch(), run_ort()
    first_t = a[0] if isinstance(a, tuple) else a
    diff = float(np.max(np.abs(first_t.float().numpy() - b[0])))
    scale = max(1.0, float(np.max(np.abs(b[0]))))
    for _ in range(iters):
        for name, fn in (("torch", run_torch), ("ort-cpu", run_ort)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000.0)
    del sess, model, wrapper
    gc.collect()
    return {"stage": stage, "resolution": resolution if stage != "image_encoder" else CLIP_IMAGE_SIZE,
            "params_m": round(n_params / 1e6, 1), "warmup": warmup, "iters": iters,
            "ort_session_load_s": round(load_s, 1), "export": export_info,
            "max_abs_diff_rel": round(diff / scale, 6),
            "torch": percentiles(times["torch"]), "ort-cpu": percentiles(times["ort-cpu"]),
            "speedup_p50": round(float(np.median(times["torch"]) / np.median(times["ort-cpu"])), 3)}


def bench_real_size(resolutions: list[int], warmup: int, iters: int, threads: int,
                    stages: tuple[str, ...] = STAGES, cache_dir: Path = CACHE_DIR,
                    iters_by_resolution: dict[int, int] | None = None) -> dict[str, Any]:
    """Every stage at every resolution (the image encoder once, at its own 224 px)."""
    rows = []
    encoder_done = False
    for res in resolutions:
        n = (iters_by_resolution or {}).get(res, iters)
        for stage in stages:
            if stage == "image_encoder":
                if encoder_done:
                    continue
                encoder_done = True
            rows.append(bench_stage(stage, res, warmup, n, threads, cache_dir))
    return {"kind": "real_size", "weights": "seeded random init (latency does not depend on weight values)",
            "batch": 1, "rows": rows}


def transform_estimate(rows: list[dict[str, Any]], steps: int, resolution: int) -> dict[str, float]:
    """One image's transform + 2 encoder passes composed from *measured* stage p50s."""
    by = {(r["stage"], r["resolution"]): r for r in rows}
    out = {}
    for backend in ("torch", "ort-cpu"):
        try:
            total = (by[("vae_encode", resolution)][backend]["p50"] + steps * by[("unet_step", resolution)][backend]["p50"]
                     + by[("vae_decode", resolution)][backend]["p50"] + 2 * by[("image_encoder", CLIP_IMAGE_SIZE)][backend]["p50"])
        except KeyError:
            continue
        out[backend] = round(total, 1)
    return out


def real_size_markdown(doc: dict[str, Any]) -> str:
    """The real-size result as markdown (per stage, torch vs ORT CPU, batch 1)."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", doc.get("note", ""), ""]
    for res in doc["results"]:
        lines += [f"Weights: {res['weights']}. Batch {res['batch']}. Export: project specs + export_onnx, "
                  f"validation {'on' if EXPORT_CHECK else 'off'}, onnxslim {'on' if EXPORT_SIMPLIFY else 'off'}.", "",
                  "| stage | resolution | params M | iters | torch p50 ms | torch p90 | ORT CPU p50 ms | ORT p90 "
                  "| speed-up | max rel \\|Δ\\| | ORT load s | graph MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            t, o = r["torch"], r["ort-cpu"]
            lines.append(f"| {r['stage']} | {r['resolution']} | {r['params_m']} | {r['iters']} | {t['p50']:.1f} | "
                         f"{t['p90']:.1f} | {o['p50']:.1f} | {o['p90']:.1f} | {r['speedup_p50']:.2f}x | "
                         f"{r['max_abs_diff_rel']:.2e} | {r['ort_session_load_s']} | {r['export']['bytes'] / 1e6:.0f} |")
        for res_px, est in res.get("per_image", {}).items():
            lines += ["", f"One image at {res_px} px, composed from the measured p50s above (VAE encode + "
                      f"{res.get('steps', 4)} UNet steps + VAE decode + 2 encoder passes): "
                      + ", ".join(f"{k} {v / 1000:.2f} s" for k, v in est.items())]
        lines.append("")
    return "\n".join(lines) + "\n"


def write_real_size(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """JSON + markdown of a real-size document."""
    name = doc["name"]
    paths = {"md": str(write_text(out_dir / f"{name}.md", real_size_markdown(doc)))}
    paths["json"] = str(write_json(out_dir / f"{name}.json", doc))
    return paths


SD15_STEPS = 4  # the sd15 profile's LCM steps (o2n_edge.profiles)


def main() -> None:
    """Command line of the study."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", default="256")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--taesd", action="store_true", help="AutoencoderTiny (TAESD architecture) encode/decode instead")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    resolutions = [int(x) for x in a.resolution.split(",")]
    set_threads(a.threads)
    if a.taesd:
        doc = {"name": "latency_autoencoder_tiny", "machine": machine_stamp(a.threads),
               "note": "diffusers AutoencoderTiny (TAESD architecture, SD-1.5 latents), seeded random weights: latency "
                       "only. Compare with the AutoencoderKL rows of latency_real_size.",
               "results": [bench_real_size(resolutions, a.warmup, a.iters, a.threads, stages=TINY_VAE_STAGES)]}
    else:
        res = bench_real_size(resolutions, a.warmup, a.iters, a.threads)
        res["steps"] = SD15_STEPS
        res["per_image"] = {r: transform_estimate(res["rows"], SD15_STEPS, r) for r in resolutions}
        doc = {"name": "latency_real_size", "machine": machine_stamp(a.threads), "results": [res]}
    print(open(write_real_size(doc, a.out)["md"]).read())


if __name__ == "__main__":
    main()
