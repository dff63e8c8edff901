"""The lite One-to-Normal ablation (issue 10): does the transform earn its place on the CPU?

One personalized run per (data set, shots, seed, training config) serves every variant:

- ``shots-only``: the memory bank of the shots (the baseline every variant must beat);
- ``+pool``: plus the generated pool, with the fraction of test patches whose nearest
  neighbour is a generated one (``pool_nn_fraction``: 0 means the pool changes nothing);
- ``+personalized/<cmp>`` and ``all/<cmp>`` (``all`` = personalized + pool + generated pool),
  for three ways to compare a query with its normal version:
  ``query`` (the query's features vs its normal version's, as before), ``recon`` (the query's own
  TAEF2 reconstruction vs its normal version: both went through the autoencoder, so its error
  cancels) and ``latent`` (the latent residual ``z_query - z_normal``, standardized per channel
  by the shots' residuals, upsampled to the feature grid).

What is shot-independent is computed once per data set and cached on disk: the test images'
features, TAEF2 latents, reconstructions and the reconstructions' features. Every finished run is
appended to a ``.runs.jsonl`` at once (resumable); summaries are rebuilt from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.data import load_image, load_mask, sample_shots
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.metrics import compute_metrics, mean_std

COMPARISONS = ("query", "recon", "latent")
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_pro")
SCORE_BATCH = 32
LATENT_BATCH = 16
POOL_SIZE = 16  # generated images of the +pool / all variants (whatever the profile's default)


@dataclass(frozen=True)
class TrainConfig:
    """What changes the personalized run (and so its cache key), plus transform-time settings."""

    strength: float = 0.3
    steps: int = 600
    keep_low_sigma: float = 2.0

    @property
    def tag(self) -> str:
        return f"s{self.strength:g}-n{self.steps}-lo{self.keep_low_sigma:g}"

    @property
    def run_tag(self) -> str:  # keep_low is transform-time only: runs are shared across it
        return f"s{self.strength:g}-n{self.steps}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")


class TestCache:
    """Shot-independent arrays of one test set, computed once and kept under ``cache_dir``."""

    def __init__(self, ds: Any, encoder: Any, vae: Any, scaling_factor: float, diffusion_size: int,
                 cache_dir: Path) -> None:
        import torch

        from o2n_edge.diffusion.models import images_to_tensor, tensor_to_images
        from o2n_edge.encoders import encode_images

        size = encoder.image_size
        self.labels = ds.labels
        self.images = np.stack([load_image(x.path, size) for x in ds.test])
        self.masks = np.stack([load_mask(x.mask_path, (size, size)) for x in ds.test]) if ds.has_masks else None
        cache_dir.mkdir(parents=True, exist_ok=True)
        f = cache_dir / f"{ds.name}-{ds.category}-{diffusion_size}.npz"
        if f.is_file():
            z = np.load(f)
            self.feats = {"patch": z["patch"], "global": z["global"]}
            self.recon_feats = {"patch": z["rpatch"], "global": z["rglobal"]}
            self.latents, self.recon = z["latents"], z["recon"]
            return
        self.feats = encode_images(encoder, self.images)
        small = resize_uint8(self.images, diffusion_size)
        lats, recs = [], []
        with torch.no_grad():
            for i in range(0, len(small), LATENT_BATCH):
                x = images_to_tensor(small[i:i + LATENT_BATCH])
                lat = vae.encode(x).latent_dist.mean.float()
                lats.append((lat * scaling_factor).numpy())
                recs.append(tensor_to_images(vae.decode(lat).sample))
        self.latents, self.recon = np.concatenate(lats), np.concatenate(recs)
        self.recon_feats = encode_images(encoder, resize_uint8(self.recon, size))
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, patch=self.feats["patch"], **{"global": self.feats["global"]},
                 rpatch=self.recon_feats["patch"], rglobal=self.recon_feats["global"],
                 latents=self.latents, recon=self.recon)
        tmp.replace(f)


def normals_from_latents(run: Any, latents: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The transform on cached (scaled) latents: (denoised latents, normal images uint8)."""
    import torch

    from o2n_edge.diffusion.models import tensor_to_images
    from o2n_edge.diffusion.transform import keep_low, lcm_denoise, lcm_scheduler, lcm_timesteps, transform_noise

    spec = run.spec
    sched = lcm_scheduler(run)
    ts = lcm_timesteps(sched, spec.steps, spec.strength)
    noise = transform_noise(tuple(latents.shape[1:]), len(ts) - 1, seed)
    unet = run.unet_for(True)
    dens, imgs = [], []
    with torch.no_grad():
        for i in range(0, len(latents), LATENT_BATCH):
            lat = torch.from_numpy(latents[i:i + LATENT_BATCH])
            noisy = sched.add_noise(lat, noise["init"].expand_as(lat), torch.tensor([ts[0]]))
            den = lcm_denoise(unet, noisy, ts, run.prompt_embeds, sched, noise["steps"])
            den = keep_low(den, lat, spec.keep_low_sigma)
            dens.append(den.numpy())
            imgs.append(tensor_to_images(run.models.vae.decode(den / run.models.scaling_factor).sample))
    return np.concatenate(dens), np.concatenate(imgs)


def encode_small(vae: Any, images: np.ndarray, scaling_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(scaled latents, reconstructions uint8) of uint8 images at the diffusion size."""
    import torch

    from o2n_edge.diffusion.models import images_to_tensor, tensor_to_images

    with torch.no_grad():
        lat = vae.encode(images_to_tensor(images)).latent_dist.mean.float()
        return (lat * scaling_factor).numpy(), tensor_to_images(vae.decode(lat).sample)


def latent_residual_maps(zq: np.ndarray, zn: np.ndarray, channel_scale: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(B,C,h,w) x2 -> (B,*grid): RMS over channels of the residual standardized per channel."""
    import torch
    import torch.nn.functional as F

    r = (zq - zn) / channel_scale[None, :, None, None]
    m = np.sqrt((r**2).mean(axis=1))
    return F.interpolate(torch.from_numpy(m)[:, None].float(), size=grid, mode="bilinear",
                         align_corners=False)[:, 0].numpy()


def raw_pool(feats: dict[str, np.ndarray], patch_bank: np.ndarray, global_bank: np.ndarray) -> tuple[Any, Any]:
    """The pool branch's raw map and global score of every test image against one bank."""
    import torch

    from o2n_edge.scoring import cosine_distance_to_bank, pool_map

    bank = torch.from_numpy(patch_bank.reshape(-1, patch_bank.shape[-1])).float()
    gbank = torch.from_numpy(global_bank).float()
    maps, globs = [], []
    with torch.inference_mode():
        for s in range(0, len(feats["patch"]), SCORE_BATCH):
            maps.append(pool_map(torch.from_numpy(feats["patch"][s:s + SCORE_BATCH]).float(), bank))
            globs.append(cosine_distance_to_bank(torch.from_numpy(feats["global"][s:s + SCORE_BATCH]).float(), gbank))
    return torch.cat(maps), torch.cat(globs)


def raw_personalized(side: dict[str, np.ndarray], normal: dict[str, np.ndarray], radius: int) -> tuple[Any, Any]:
    """The personalized branch's raw map and global score (``side``: the query or its recon)."""
    import torch

    from o2n_edge.scoring import personalized_map

    maps = []
    with torch.inference_mode():
        for s in range(0, len(side["patch"]), SCORE_BATCH):
            sl = slice(s, s + SCORE_BATCH)
            maps.append(personalized_map(torch.from_numpy(side["patch"][sl]), torch.from_numpy(normal["patch"][sl]), radius))
        g = 1.0 - torch.nn.functional.cosine_similarity(torch.from_numpy(side["global"]).double(),
                                                        torch.from_numpy(normal["global"]).double(), dim=-1)
    return torch.cat(maps), g.float()


def fused_scores(maps: dict[str, Any], globs: dict[str, Any], ref: Any, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """The reference's fusion of raw branch outputs: image scores and full-size maps."""
    import torch

    from o2n_edge.scoring import fuse, topk_mean, upsample_and_smooth

    scores, out = [], []
    with torch.inference_mode():
        for s in range(0, len(next(iter(maps.values()))), SCORE_BATCH):
            sl = slice(s, s + SCORE_BATCH)
            fm, fg = fuse({k: v[sl] for k, v in maps.items()}, {k: v[sl] for k, v in globs.items()}, ref, config)
            full = upsample_and_smooth(fm, config.image_size, config.smoothing_sigma)
            scores.append((topk_mean(full, config.topk_fraction) + config.global_weight * fg).numpy())
            out.append(full.numpy())
    return np.concatenate(scores).astype(np.float64), np.concatenate(out)


def run_one(ds: Any, profile: Any, encoder: Any, cache: TestCache, k: int, seed: int, cfg: TrainConfig,
            runs_dir: Path, comparisons: tuple[str, ...] = COMPARISONS,
            coreset: float | None = None) -> dict[str, Any]:
    """Every variant of one (data set, shots, seed, config); returns the JSON record.

    ``coreset``: keep this fraction of each memory bank (greedy k-center, as the lite export
    does by default); None or 1 = the whole bank.
    """
    from o2n_edge.diffusion import generate_pool, load_run
    from o2n_edge.encoders import encode_images
    from o2n_edge.scoring import ScoringConfig, _standardization, augment_views, build_reference

    t0 = time.perf_counter()
    size = encoder.image_size
    spec = replace(profile.diffusion, strength=cfg.strength, keep_low_sigma=cfg.keep_low_sigma)
    prof = replace(profile, diffusion=spec)
    shot_paths = sample_shots(ds.train_good, k, seed)
    run_dir = runs_dir / cfg.run_tag / f"{ds.name}-{ds.category}-k{k}-s{seed}"
    times: dict[str, Any] = {}
    if not (run_dir / "run.json").is_file():
        # lite distils nothing (distill_steps 0: the one-step student IS the denoiser), so the
        # ablation uses the personalized denoiser directly and skips distill's measurement pass
        from o2n_edge.diffusion.personalize import personalize

        t = time.perf_counter()
        personalize([load_image(p, spec.image_size) for p in shot_paths], ds.category, spec, run_dir,
                    steps=cfg.steps, seed=seed, progress=False)
        times["personalize_s"] = round(time.perf_counter() - t, 2)
    run = load_run(run_dir, load_student=False, device="cpu")
    run.spec = replace(run.spec, keep_low_sigma=cfg.keep_low_sigma)
    sf = run.models.scaling_factor
    info = json.loads((run_dir / "run.json").read_text())
    times.setdefault("personalize_s", info.get("wall_s"))
    dsize = run.spec.image_size

    t = time.perf_counter()
    den, normals = normals_from_latents(run, cache.latents, seed)
    times["transform_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    normal_feats = encode_images(encoder, resize_uint8(normals, size))
    times["encode_normals_s"] = round(time.perf_counter() - t, 2)
    good = cache.labels == 0
    psnr_good = [psnr(normals[i], cache.recon[i]) for i in np.flatnonzero(good)]
    psnr_query = [psnr(normals[i], resize_uint8(cache.images[i:i + 1], dsize)[0]) for i in np.flatnonzero(good)]

    shot_imgs = [load_image(p, size) for p in shot_paths]
    shot_small = resize_uint8(np.stack(shot_imgs), dsize)
    shot_lat, shot_rec = encode_small(run.models.vae, shot_small, sf)
    shot_den, shot_norm = normals_from_latents(run, shot_lat, seed)
    shot_feats = [encode_images(encoder, augment_views(im)) for im in shot_imgs]
    shot_normal_feats = encode_images(encoder, resize_uint8(shot_norm, size))
    shot_recon_feats = encode_images(encoder, resize_uint8(shot_rec, size))

    t = time.perf_counter()
    pool = generate_pool(run, POOL_SIZE, seed=seed, progress=False)
    pool_feats = encode_images(encoder, resize_uint8(pool, size))
    times["pool_s"] = round(time.perf_counter() - t, 2)

    rec: dict[str, Any] = {
        "dataset": ds.name, "category": ds.category, "shots": k, "seed": seed, "config": cfg.tag,
        "train": {"strength": cfg.strength, "steps": cfg.steps, "keep_low_sigma": cfg.keep_low_sigma,
                  "max_timestep": info.get("max_timestep"), "diffusion_size": dsize,
                  "receptive_field": int(run.models.unet.receptive_field)},
        "shot_images": [p.name for p in shot_paths], "pool_size": int(len(pool)),
        "psnr_normal_vs_recon_good": float(np.mean(psnr_good)),
        "psnr_normal_vs_query_good": float(np.mean(psnr_query)),
        "shot_latent_residual": float(np.sqrt(((shot_lat - shot_den) ** 2).mean())),
        "test_good_latent_residual": float(np.sqrt(((cache.latents[good] - den[good]) ** 2).mean())),
        "variants": {},
    }
    import torch

    grid = tuple(cache.feats["patch"].shape[1:3])
    t = time.perf_counter()
    base = ScoringConfig.from_profile(prof, ("pool",))
    pers = ScoringConfig.from_profile(prof, ("personalized", "pool"))
    shot_bank = np.concatenate([f["patch"].reshape(-1, f["patch"].shape[-1]) for f in shot_feats])
    shot_gbank = np.concatenate([f["global"] for f in shot_feats])
    # nearest neighbour in shots + pool = the nearer of the two: each bank is searched once
    gen_bank = pool_feats["patch"].reshape(-1, shot_bank.shape[1])
    if coreset and coreset < 1.0:  # the lite export's default bank (coreset of each part here)
        from o2n_edge.export.coreset import greedy_coreset

        shot_bank = shot_bank[greedy_coreset(shot_bank, coreset, seed=seed)]
        gen_bank = gen_bank[greedy_coreset(gen_bank, coreset, seed=seed)]
    rec["bank_rows"] = {"shots": int(len(shot_bank)), "pool": int(len(gen_bank)), "coreset": coreset}
    m_shots, g_shots = raw_pool(cache.feats, shot_bank, shot_gbank)
    m_gen, g_gen = raw_pool(cache.feats, gen_bank, pool_feats["global"])
    pool_raw = {False: (m_shots, g_shots), True: (torch.minimum(m_shots, m_gen), torch.minimum(g_shots, g_gen))}
    rec["pool_nn_fraction"] = float((m_gen < m_shots).float().mean())
    refs = {use: build_reference(shot_feats, base, None, pool_feats if use else None) for use in (False, True)}

    def metrics(scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
        return compute_metrics(cache.labels, scores, cache.masks, maps if cache.masks is not None else None)

    for name, use_pool in (("shots-only", False), ("+pool", True)):
        m, g = pool_raw[use_pool]
        rec["variants"][name] = metrics(*fused_scores({"pool": m}, {"pool": g}, refs[use_pool], base))
    chan = np.sqrt(((shot_lat - shot_den) ** 2).mean(axis=(0, 2, 3))) + 1e-3
    originals = {k2: np.stack([f[k2][0] for f in shot_feats]) for k2 in shot_feats[0]}
    for cmp in comparisons:
        if cmp == "latent":
            pm = torch.from_numpy(latent_residual_maps(cache.latents, den, chan, grid)).float()
            pg = pm.mean(dim=(1, 2))
            norm = _latent_norm(shot_lat, shot_den, chan, grid, _standardization)
        else:
            side, shot_side = (cache.recon_feats, shot_recon_feats) if cmp == "recon" else (cache.feats, originals)
            pm, pg = raw_personalized(side, normal_feats, pers.neighborhood)
            spm, spg = raw_personalized(shot_side, shot_normal_feats, pers.neighborhood)
            norm = {"personalized": _standardization([spm]), "global_personalized": _standardization([spg])}
        for name, use_pool in ((f"+personalized/{cmp}", False), (f"all/{cmp}", True)):
            ref = refs[use_pool]
            ref_p = replace(ref, norm={**ref.norm, **norm})
            m, g = pool_raw[use_pool]
            rec["variants"][name] = metrics(*fused_scores({"pool": m, "personalized": pm},
                                                          {"pool": g, "personalized": pg}, ref_p, pers))
    times["score_s"] = round(time.perf_counter() - t, 2)
    rec.update(times)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


def _latent_norm(shot_lat, shot_den, chan, grid, standardization) -> dict[str, tuple[float, float]]:
    import torch

    m = torch.from_numpy(latent_residual_maps(shot_lat, shot_den, chan, grid))
    return {"personalized": standardization([m]), "global_personalized": standardization([m.mean(dim=(1, 2))])}


def variant_names(comparisons: tuple[str, ...] = COMPARISONS) -> list[str]:
    return ["shots-only", "+pool"] + [f"{v}/{c}" for c in comparisons for v in ("+personalized", "all")]


def summarize(records: list[dict[str, Any]], order: list[str]) -> tuple[list[dict[str, Any]], str]:
    """Mean ± std over seeds per (config, data set, shots, variant): rows + a markdown table."""
    rows: list[dict[str, Any]] = []
    lines = ["| config | data set | shots | seeds | variant | image AUROC | image AP | pixel AUROC | PRO (0.3) |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["config"], r["category"], r["shots"]) for r in records},
                  key=lambda x: (x[0], order.index(x[1]) if x[1] in order else 99, x[2]))
    extra = ["| config | data set | shots | pool-neighbour % | PSNR normal vs recon (good) dB | PSNR normal vs query (good) dB | "
             "latent residual shots / unseen good | personalize s | transform s (test set) | run wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, cat, k in keys:
        group = sorted([r for r in records if (r["config"], r["category"], r["shots"]) == (cfg, cat, k)],
                       key=lambda r: r["seed"])
        seeds = ",".join(str(r["seed"]) for r in group)
        names = [v for v in variant_names() if all(v in r["variants"] for r in group)]
        for v in names:
            row: dict[str, Any] = {"config": cfg, "category": cat, "shots": k, "seeds": seeds, "variant": v}
            cells = []
            for m in METRICS:
                vals = [r["variants"][v][m] for r in group if r["variants"][v].get(m) is not None]
                if vals:
                    mu, sd = mean_std(vals)
                    row[m] = {"mean": mu, "std": sd}
                    cells.append(f"{100 * mu:.1f} ± {100 * sd:.1f}")
                else:
                    row[m] = None
                    cells.append("—")
            rows.append(row)
            lines.append(f"| {cfg} | {cat} | {k} | {seeds} | {v} | " + " | ".join(cells) + " |")

        def avg(key: str) -> float:
            vals = [float(r[key]) for r in group if r.get(key) is not None]
            return float(np.mean(vals)) if vals else float("nan")

        extra.append(f"| {cfg} | {cat} | {k} | {100 * avg('pool_nn_fraction'):.2f} | {avg('psnr_normal_vs_recon_good'):.1f} | "
                     f"{avg('psnr_normal_vs_query_good'):.1f} | {avg('shot_latent_residual'):.3f} / {avg('test_good_latent_residual'):.3f} | "
                     f"{avg('personalize_s'):.0f} | {avg('transform_s'):.1f} | {avg('wall_s'):.0f} |")
    return rows, "\n".join(lines) + "\n\n" + "\n".join(extra) + "\n"


def verdict(rows: list[dict[str, Any]], shots: tuple[int, ...] = (2, 4), pixel_slack: float = 0.005) -> tuple[dict[str, Any], str]:
    """Issue 10's decision rule, computed from the summary rows (means over seeds).

    A variant *beats* shots-only on a data set when, at every shot count in ``shots``, its mean
    image AUROC is higher and its mean pixel AUROC (where masks exist) is not lower by more than
    ``pixel_slack``. The transform stays on by default only if some variant beats shots-only on
    at least two of the data sets (item 5) - and the "Done when" asks for tire and textile.
    """
    out: dict[str, Any] = {}
    lines = ["| config | variant | " + " | ".join(f"{c}: Δ image AUROC at k={','.join(map(str, shots))} (Δ pixel)" for c in ORDER_FOR_VERDICT)
             + " | beats shots-only on |", "|---|---|" + "---|" * len(ORDER_FOR_VERDICT) + "---|"]
    index = {(r["config"], r["category"], r["shots"], r["variant"]): r for r in rows}
    configs = sorted({r["config"] for r in rows})
    for cfg in configs:
        for v in [n for n in variant_names() if n != "shots-only"]:
            cells, wins = [], []
            for cat in ORDER_FOR_VERDICT:
                parts, ok, seen = [], True, False
                for k in shots:
                    a, b = index.get((cfg, cat, k, v)), index.get((cfg, cat, k, "shots-only"))
                    if a is None or b is None or a.get("image_auroc") is None:
                        ok = False
                        parts.append("—")
                        continue
                    seen = True
                    d = a["image_auroc"]["mean"] - b["image_auroc"]["mean"]
                    dp = None
                    if a.get("pixel_auroc") and b.get("pixel_auroc"):
                        dp = a["pixel_auroc"]["mean"] - b["pixel_auroc"]["mean"]
                    ok = ok and d > 0 and (dp is None or dp >= -pixel_slack)
                    parts.append(f"{100 * d:+.1f}" + (f" ({100 * dp:+.1f})" if dp is not None else ""))
                if seen and ok:
                    wins.append(cat)
                cells.append(" / ".join(parts))
            out[f"{cfg} {v}"] = wins
            if any(c != "—" for c in " / ".join(cells).split(" / ")):
                lines.append(f"| {cfg} | {v} | " + " | ".join(cells) + f" | {', '.join(wins) or 'none'} |")
    saturated = [c for c in ORDER_FOR_VERDICT if all(
        index.get((cfg, c, k, "shots-only"), {}).get("image_auroc", {"mean": 0})["mean"] >= 1.0
        for cfg in configs for k in shots) and any((cfg, c, k, "shots-only") in index for cfg in configs for k in shots)]
    best = max(out.values(), key=len) if out else []
    on = len(best) >= 2
    done_when = any({"tire", "textile"} <= set(w) for w in out.values())
    text = "\n".join(lines) + (
        f"\n\nDecision rule (item 5): the transform stays on by default only if one variant beats shots-only on at "
        f"least two data sets: **{'met' if on else 'not met'}** (best: {', '.join(best) or 'none'}). "
        f"\"Done when\" (tire and textile at k=2 and 4, pixel AUROC within 0.5 points): "
        f"**{'met' if done_when else 'not met'}**."
        + (f" Shots-only is already at 100.0 image AUROC at k={','.join(map(str, shots))} on {', '.join(saturated)}: "
           "nothing can beat it there." if saturated else "") + "\n")
    return {"per_variant": out, "transform_on_by_default": on, "done_when_met": done_when}, text


ORDER_FOR_VERDICT = ("hazelnut", "tire", "textile")
