"""The torch-eager twin of :class:`o2n_edge.runtime.pipeline.OrtPipeline`, for latency baselines.

Why a twin and not ``o2n_edge.scoring`` + ``one_to_normal`` as they are: the baseline must run
the *same stages on the same inputs* as the runtime and time each one under the same names
(``vae_encode``, ``unet_step_i``, ...), or a per-stage comparison compares different work. So it
loads the bundle's constants (memory bank, norms, noise, timesteps) and the run's torch models
(the personalized run the bundle was exported from, the profile's encoder), and its scores are
checked against the runtime's (``max_abs_score_diff`` in every result): a baseline that computed
something else would show up there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.runtime.bundle import Bundle, load_bundle

DEFAULT_RUNS_DIR = Path("runs")


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
        from o2n_edge.scoring import Reference, ScoringConfig

        self.torch = torch
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        self.manifest = m
        profile = get_profile(m["profile"])
        spec = profile.encoder
        if "spec" in m["encoder"]:  # the bundle's own encoder settings (self-tuned ones differ from the profile's)
            from o2n_edge.profiles import EncoderSpec

            fields = dict(m["encoder"]["spec"])
            fields["layers"] = tuple(fields.get("layers", ()))
            spec = EncoderSpec(**fields)
        self.encoder = build_encoder(spec)
        assert int(self.encoder.input_size) == int(m["image_size"]), "bundle and profile encoders differ"
        s = m["scoring"]
        self.config = ScoringConfig(branches=tuple(s["branches"]), weights=dict(s["weights"]),
                                    image_size=int(s["image_size"]), topk_fraction=float(s["topk_fraction"]),
                                    global_weight=float(s["global_weight"]),
                                    smoothing_sigma=float(s["smoothing_sigma"]), neighborhood=int(s["neighborhood"]),
                                    stats_weight=float(s.get("stats_weight", 0.0)),
                                    border_fraction=float(s.get("border_fraction", 0.0)))
        branches = self.config.branches
        self.reference = Reference(
            memory_bank=self.bundle.array("memory_bank") if "pool" in branches else np.zeros((1, 1), np.float32),
            global_bank=self.bundle.array("global_bank") if "pool" in branches else np.zeros((1, 1), np.float32),
            text_features=self.bundle.array("text_features") if "text" in branches else None,
            norm={k: (float(v[0]), float(v[1])) for k, v in s.get("norm", {}).items()},
            stats_bank=self.bundle.array("stats_bank") if self.config.stats_weight > 0 else None,
            stats_scale=self.bundle.array("stats_scale") if self.config.stats_weight > 0 else None,
            ring_norm={k: [(float(c), float(sc)) for c, sc in v] for k, v in s.get("ring_norm", {}).items()},
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
        from o2n_edge.scoring import score

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
