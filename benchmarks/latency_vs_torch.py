"""Per-stage latency of a bundle: a torch-eager twin of the runtime vs ORT (the export's speed-up).

`o2n-edge bench` measures the runtime's backends; this study adds the torch-eager baseline as an
extra backend (``torch``, listed first, so every ORT row carries its score difference from it)
and checks the speed-up target: ORT CPU >= 1.5x torch eager per image at batch 1.

Why a twin and not the offline evaluation path (``o2n_edge.evaluation`` + ``one_to_normal``) as
it is: the baseline must run the *same stages on the same inputs* as the runtime and time each
one under the same names (``vae_encode``, ``unet_step_i``, ...), or a per-stage comparison compares
different work. So it loads the bundle's constants (memory bank, norms, noise, timesteps) and the
run's torch models (the personalized run the bundle was exported from, the profile's encoder);
only the models run in torch eager, the scoring is the one numpy implementation
(``o2n_edge.runtime.scoring``) both sides share. Its scores are checked against the runtime's
(``max_abs_score_diff_vs_ref`` in every row): a baseline that computed something else would show up
there.

Usage: python -m benchmarks.latency_vs_torch --bundle /tmp/b [--run-dir runs/export-...]
Writes benchmarks/results/latency_<profile>.{json,md,png} (e.g. latency_tiny).
"""


from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.harness import RESULTS
from o2n_edge.bench.latency import BACKENDS, Runner
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.runtime.bundle import Bundle, load_bundle

DEFAULT_RUNS_DIR = Path("runs")
ORT_SPEEDUP_TARGET = 1.5  # ORT CPU >= 1.5x torch eager per image, batch 1


def default_run_dir(manifest: dict, runs_dir: Path | None = None) -> Path:
    """Where `o2n-edge export` caches the personalized run a bundle came from."""
    shots = manifest["shots"]
    return (runs_dir or DEFAULT_RUNS_DIR) / (f"export-{manifest['dataset']}-{manifest['category']}-{manifest['profile']}"
                       f"-k{shots['k']}-s{shots['seed']}")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class TorchPipeline:
    """Eager torch inference of a bundle's stages; ``inspect_batch`` returns (scores, timings)."""

    def __init__(self, bundle: Bundle | str | Path, run_dir: Path | None = None) -> None:
        import torch

        from o2n_edge.encoders import build_encoder
        from o2n_edge.profiles import get_profile
        from o2n_edge.runtime.scoring import Reference, ScoringConfig

        self.torch = torch
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        self.manifest = m
        profile = get_profile(m["profile"])
        spec = profile.encoder
        if "spec" in m["encoder"]:  # the bundle's own encoder settings (set at export, may differ from the profile's)
            from o2n_edge.profiles import EncoderSpec

            fields = dict(m["encoder"]["spec"])
            fields["layers"] = tuple(fields.get("layers", ()))
            spec = EncoderSpec(**fields)
        self.encoder = build_encoder(spec)
        assert int(self.encoder.input_size) == int(m["image_size"]), "bundle and profile encoders differ"
        s = m["scoring"]
        self.config = ScoringConfig.from_manifest(s)
        branches = self.config.branches
        stats = self.config.stats_weight > 0
        self.reference = Reference.from_manifest(
            s,
            memory_bank=self.bundle.array("memory_bank") if "pool" in branches else None,
            global_bank=self.bundle.array("global_bank") if "pool" in branches else None,
            text_features=self.bundle.array("text_features") if "text" in branches else None,
            stats_bank=self.bundle.array("stats_bank") if stats else None,
            stats_scale=self.bundle.array("stats_scale") if stats else None,
        )
        self.image_size = int(m["image_size"])
        self.uses_transform = "personalized" in branches
        if self.uses_transform:
            from o2n_edge.diffusion import load_run
            from o2n_edge.diffusion.transform import lcm_scheduler

            rd = Path(run_dir) if run_dir else default_run_dir(m)
            if not rd.is_dir():
                raise FileNotFoundError(f"the bundle's personalized run {rd} is missing: pass run_dir")
            self.run = load_run(rd, device="cpu")
            self.unet = self.run.unet_for(True)
            self.vae = self.run.models.vae
            self.sf = float(self.run.models.scaling_factor)
            self.sched = lcm_scheduler(self.run)
            self.timesteps = [int(t) for t in m["transform"]["timesteps"]]
            noises = torch.from_numpy(self.bundle.array("transform_noise").astype(np.float32))
            self.noises = list(noises)
            self.prompt_embeds = self.run.prompt_embeds.float()
            self.diffusion_size = int(m["diffusion_image_size"])

    # ------------------------------------------------------------------ stages

    def transform(self, images: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        """uint8 (B,S,S,3) at the diffusion size -> normal versions (uint8), timed per stage."""
        from o2n_edge.diffusion.models import images_to_tensor, tensor_to_images

        torch = self.torch
        t0 = time.perf_counter()
        pixels = images_to_tensor(resize_uint8(images, self.diffusion_size))
        timings["transform_preprocess"] = _ms(t0)
        t0 = time.perf_counter()
        lat = self.vae.encode(pixels).latent_dist.mean * self.sf
        timings["vae_encode"] = _ms(t0)
        b = lat.shape[0]
        ac = self.sched.alphas_cumprod.to(torch.float32)
        final = float(self.sched.final_alpha_cumprod)
        latents = self.sched.add_noise(lat, self.noises[0].expand_as(lat), torch.tensor([self.timesteps[0]]))
        cond = self.prompt_embeds.expand(b, -1, -1)
        denoised = latents
        for i, t in enumerate(self.timesteps):
            t0 = time.perf_counter()
            eps = self.unet(latents, torch.full((b,), float(t)), cond).sample.float()
            a_t = ac[t]
            c_skip, c_out = self.sched.get_scalings_for_boundary_condition_discrete(t)
            pred_x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            denoised = c_out * pred_x0 + c_skip * latents
            if i + 1 < len(self.timesteps):
                prev = self.timesteps[i + 1]
                a_prev = ac[prev] if prev >= 0 else torch.tensor(final)
                latents = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * self.noises[i + 1].expand_as(lat)
            timings[f"unet_step_{i}"] = _ms(t0)
        t0 = time.perf_counter()
        out = self.vae.decode(denoised / self.sf).sample.float()
        normals = tensor_to_images(out)
        timings["vae_decode"] = _ms(t0)
        return normals

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 images -> encoder outputs as numpy (the shared numpy preprocessing first)."""
        from o2n_edge.encoders import encode_images

        return encode_images(self.encoder, images, batch_size=max(1, len(images)))

    def inspect_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
        """Scores of decoded RGB images and the stage timings (ms) of the batch."""
        from o2n_edge.runtime.scoring import score

        with self.torch.inference_mode():
            t_all = time.perf_counter()
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            query = resize_uint8(list(images), self.image_size)
            timings["preprocess"] = _ms(t0)
            normal_at_size = None
            if self.uses_transform:
                normals = self.transform(resize_uint8(query, self.diffusion_size), timings)
                normal_at_size = resize_uint8(normals, self.image_size)
            t0 = time.perf_counter()
            feats = self.encode(query)
            normal_feats = self.encode(normal_at_size) if normal_at_size is not None else None
            timings["image_encoder"] = _ms(t0)
            t0 = time.perf_counter()
            res = score(feats, self.reference, self.config, normal_feats)
            timings["scoring"] = _ms(t0)
            t0 = time.perf_counter()
            scores = np.asarray([float(s) for s in res.scores])
            maps = [res.maps[i] for i in range(len(query))]  # what the runtime hands back per image
            assert len(maps) == len(scores)
            timings["postprocess"] = _ms(t0)
            timings["total"] = _ms(t_all)
        return scores, timings


def torch_runner(bundle: Path, threads: int, run_dir: str | None = None) -> Runner:
    """The ``torch`` backend of :func:`o2n_edge.bench.latency.bench_bundle` (threads are set by the caller)."""
    pipe = TorchPipeline(bundle, Path(run_dir) if run_dir else None)
    return Runner("torch", pipe.inspect_batch)


def speedups(result: dict[str, Any], baseline: str = "torch") -> dict[str, float]:
    """Per-image p50 speed-up of every measured row over ``baseline`` at the same batch."""
    base = {r["batch"]: r["per_image_ms_p50"] for r in result["rows"] if r.get("backend") == baseline and "batch" in r}
    return {f"{r['backend']}@b{r['batch']}": round(base[r["batch"]] / r["per_image_ms_p50"], 3)
            for r in result["rows"]
            if r.get("status") == "measured" and r["backend"] != baseline and r["batch"] in base}


def speedup_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ORT CPU vs torch eager per image at batch 1, on measured rows only (with the distance)."""
    out = []
    for res in results:
        rows = {(r["backend"], r.get("batch")): r for r in res.get("rows", []) if r.get("status") == "measured"}
        t, o = rows.get(("torch", 1)), rows.get(("ort-cpu", 1))
        if t and o:
            s = t["per_image_ms_p50"] / o["per_image_ms_p50"]
            out.append({"target": f"{res['profile']}: ORT CPU >= {ORT_SPEEDUP_TARGET}x torch eager per image, batch 1",
                        "measured": f"{s:.2f}x ({t['per_image_ms_p50']:.1f} -> {o['per_image_ms_p50']:.1f} ms)",
                        "met": s >= ORT_SPEEDUP_TARGET})
    return out


def main() -> None:
    """Command line of the study."""
    from o2n_edge.bench import bench_main
    from o2n_edge.bench.latency_report import write_json, write_latency

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--backends", default=",".join(("torch",) + BACKENDS), help="torch first: the reference")
    p.add_argument("--batch", default="1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", type=Path, default=None, help="the bundle's personalized run (torch rows)")
    p.add_argument("--name", default=None, help="result file name (default latency_<profile>)")
    p.add_argument("--note", default="", help="a paragraph written under the machine stamp")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    # by module name, not __main__: the memory-probe child imports it afresh
    extra = {"torch": ("benchmarks.latency_vs_torch:torch_runner", {"run_dir": str(a.run_dir) if a.run_dir else None})}
    doc = bench_main(a.bundle, a.backends.split(","), ["fp32"], [int(x) for x in a.batch.split(",")], a.out,
                     a.warmup, a.iters, a.threads, a.name, a.note, extra_runners=extra)
    for res in doc["results"]:
        if res.get("kind") == "bundle_latency":
            res["speedups"] = speedups(res)
    doc["targets"] = speedup_targets(doc["results"]) + doc["targets"]
    doc["paths"] = write_latency(doc, a.out)
    write_json(a.out / f"{doc['name']}.json", doc)
    print(open(doc["paths"]["md"]).read())


if __name__ == "__main__":
    main()
