"""The sd15 production path at REAL size, on the CPU, with seeded random weights (no download).

Why: sd15 had only ever run at tiny size; an 860M-parameter UNet is where exports hit the 2 GB
protobuf limit, fp16 conversion doubles memory, and LoRA files come in other key formats. This
dry run builds the real architectures (SD-1.5 UNet/VAE/CLIP text encoder with the real CLIP BPE
tokenizer, open_clip ViT-B-16-plus-240, TAESD, an LCM-LoRA in the published kohya-style key
format), writes them into a Hugging Face cache under their hub ids, and then takes the path a
user takes, offline: personalize a few LoRA steps -> merge the LCM-LoRA -> export fp32 and fp16
-> verify/inspect the bundle -> score images with the torch-free runtime.

Each stage runs in its own process (so its peak RSS is its own and memory is returned between
stages) and writes ``<work>/stages/<stage>.json``; a finished stage is skipped on the next call,
so an interrupted run resumes. Random weights make scores meaningless: this measures time,
memory and bytes, and that every step *works* at real size.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM_ID = "latent-consistency/lcm-lora-sdv1-5"
TAESD_ID = "madebyollin/taesd"
CLIP_NAME = "ViT-B-16-plus-240"
CLIP_TAG = "laion400m_e32"
CATEGORY = "hazelnut"
SHOTS = 2
TRAIN_IMAGES = 5  # 2 shots + 3 held-out good images for the threshold and the parity check
PERSONALIZE_STEPS = 2
AUG_PER_SHOT = 4  # augmented views per shot in personalization's latent bank (the profile's: 32)
LORA_RANK = 8
LCM_RANK = 64  # the published LCM-LoRA's rank
POOL_SIZE = 2
RUNTIME_IMAGES = 3
TAESD_REPEATS = 3
STAGES = ("seed_hub", "personalize", "merge_lcm_lora", "export_fp32", "runtime_fp32", "export_fp16", "runtime_fp16",
          "taesd_latency", "lcm_lora_keys", "export_taesd", "runtime_taesd")
# the whole-bundle TAESD export repeats pool, reference and calibration (~20 min on a shared CPU):
# optional; taesd_latency exports TAESD's two graphs and times them next to the full VAE's
DEFAULT_STAGES = STAGES[:-2]
# name -> (precision, VAE, generated pool size); the TAESD bundle is for the VAE's latency: no pool
BUNDLES = {"fp32": ("fp32", None, POOL_SIZE), "fp16": ("fp16", None, POOL_SIZE), "taesd": ("fp32", TAESD_ID, 0)}
# SD-1.5's published architectures (diffusers configs of stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _tree_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _write_clip_tokenizer(path: Path) -> None:
    """The real CLIP BPE tokenizer (49408 tokens), built from the vocabulary file open_clip ships."""
    import open_clip

    from tests.sd15_fixtures import _bytes_to_unicode  # the byte-level alphabet; run from the repository root

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = _bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                            "model_max_length": 77, **special}))


def stage_seed_hub(work: Path, opts: dict) -> dict:
    """Real architectures, seeded random weights, written into the hub cache under their hub ids."""
    import diffusers
    import open_clip
    import torch
    import transformers

    from o2n_edge.diffusion.models import SD_SCHEDULER_CONFIG
    from o2n_edge.hub import seed_hub_cache
    from tests.sd15_fixtures import write_kohya_lora  # a test fixture: run from the repository root

    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    info: dict[str, Any] = {"params": {}}
    torch.manual_seed(0)
    sd = src / "sd15"
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    info["params"]["unet"] = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(sd / "unet")
    lcm = write_kohya_lora(unet, src / "lcm" / "pytorch_lora_weights.safetensors", rank=LCM_RANK, scale=0.002)
    del unet
    vae = diffusers.AutoencoderKL(**SD15_VAE)
    info["params"]["vae"] = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(sd / "vae")
    del vae
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT))
    info["params"]["text_encoder"] = sum(p.numel() for p in text.parameters())
    text.save_pretrained(sd / "text_encoder")
    del text
    _write_clip_tokenizer(sd / "tokenizer")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "set_alpha_to_one", "steps_offset",
            "prediction_type", "timestep_spacing")
    diffusers.PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k in keys}) \
        .save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}))
    taesd = diffusers.AutoencoderTiny()
    info["params"]["taesd"] = sum(p.numel() for p in taesd.parameters())
    taesd.save_pretrained(src / "taesd")
    del taesd
    clip = open_clip.create_model(CLIP_NAME, device="cpu")
    info["params"]["open_clip"] = sum(p.numel() for p in clip.parameters())
    (src / "clip").mkdir(parents=True)
    torch.save(clip.state_dict(), src / "clip" / "open_clip_pytorch_model.bin")
    del clip
    hub_repo = open_clip.get_pretrained_cfg(CLIP_NAME, CLIP_TAG)["hf_hub"].rstrip("/")
    info["bytes"] = {"sd15": _tree_bytes(sd), "lcm_lora": _tree_bytes(lcm), "taesd": _tree_bytes(src / "taesd"),
                     "open_clip": _tree_bytes(src / "clip")}
    for repo, path in ((SD15_ID, sd), (LCM_ID, lcm.parent), (TAESD_ID, src / "taesd"), (hub_repo, src / "clip")):
        seed_hub_cache(repo, path)
    shutil.rmtree(src)  # the cache holds hard links: nothing is duplicated on disk
    info["hub_ids"] = {"base_model": SD15_ID, "lcm_lora": LCM_ID, "taesd": TAESD_ID,
                       "open_clip": f"{CLIP_NAME} + {CLIP_TAG} ({hub_repo})"}
    data = work / "data" / CATEGORY
    shared = Path(opts["data"]) / CATEGORY
    shutil.rmtree(data, ignore_errors=True)
    (data / "train" / "good").mkdir(parents=True)
    for f in sorted((shared / "train" / "good").iterdir())[:TRAIN_IMAGES]:
        shutil.copy(f, data / "train" / "good" / f.name)
    shutil.copytree(shared / "test", data / "test")
    if (shared / "ground_truth").is_dir():
        shutil.copytree(shared / "ground_truth", data / "ground_truth")
    info["output_bytes"] = _tree_bytes(work / "hf")
    return info


def stage_personalize(work: Path, opts: dict) -> dict:
    from dataclasses import replace

    from o2n_edge.data import load_dataset, load_image, sample_shots
    from o2n_edge.diffusion import personalize as personalize_mod
    from o2n_edge.diffusion.personalize import personalize
    from o2n_edge.profiles import get_profile

    personalize_mod.AUG_PER_SHOT["sd15"] = AUG_PER_SHOT  # a dry run: a few views, not the profile's 32

    spec = replace(get_profile("sd15").diffusion, image_size=opts["size"], base_model=SD15_ID)
    ds = load_dataset(work / "data", "mvtec", CATEGORY)
    shots = [load_image(p, spec.image_size) for p in sample_shots(ds.train_good, SHOTS, 0)]
    run = work / "run"
    personalize(shots, CATEGORY, spec, run, steps=PERSONALIZE_STEPS, seed=0, progress=True, lora_rank=LORA_RANK)
    return {"steps": PERSONALIZE_STEPS, "lora_rank": LORA_RANK, "diffusion_size": spec.image_size,
            "aug_per_shot": AUG_PER_SHOT,
            "output_bytes": _tree_bytes(run)}


def stage_merge_lcm_lora(work: Path, opts: dict) -> dict:
    from o2n_edge.diffusion.distill import distill

    run = work / "run"
    distill(run, lcm_lora=LCM_ID, num_inference_steps=4, progress=True, measure=False, device="cpu")
    info = json.loads((run / "distill.json").read_text())
    return {"method": info["method"], "lcm_lora": info["lcm_lora"], "lcm_lora_rank": LCM_RANK,
            "output_bytes": _tree_bytes(run / "student")}


def _export(work: Path, name: str) -> dict:
    from o2n_edge.export.build import ExportOptions, export_bundle

    precision, vae, pool = BUNDLES[name]
    out = work / "bundles" / name
    shutil.rmtree(out, ignore_errors=True)
    # one work dir per precision: the TAESD bundle reuses the fp32 UNet and encoder graphs
    summary = export_bundle(ExportOptions(
        category=CATEGORY, out=out, profile="sd15", data=work / "data", shots=SHOTS, run_dir=work / "run",
        precision=precision, pool_size=pool, work_dir=work / f"export_{precision}",
        base_model=SD15_ID, encoder_checkpoint=CLIP_TAG, lcm_lora=LCM_ID, vae=vae))
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return {"bundle": str(out), "precision": precision, "vae": summary.manifest.get("diffusion", {}).get("vae"),
            "wall_s_by_step": summary.wall_s, "parity": summary.parity, "files": files,
            "external_data": {k: (out / f"{k}.onnx.data").is_file() for k in summary.manifest["models"]},
            "student": summary.manifest.get("diffusion", {}).get("student"), "output_bytes": summary.bytes}


def stage_export_fp32(work: Path, opts: dict) -> dict:
    return _export(work, "fp32")


def stage_export_fp16(work: Path, opts: dict) -> dict:
    return _export(work, "fp16")


def stage_export_taesd(work: Path, opts: dict) -> dict:
    return _export(work, "taesd")


def _runtime(work: Path, name: str, threads: int) -> dict:
    import numpy as np

    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    bundle = work / "bundles" / name
    cli = subprocess.run([str(Path(sys.executable).parent / "o2n-edge"), "inspect", str(bundle)], capture_output=True,
                         text=True, check=False)
    t = time.perf_counter()
    pipe = OrtPipeline(bundle, SessionOptions(intra_op_threads=threads))
    load_s = time.perf_counter() - t
    ds = load_dataset(work / "data", "mvtec", CATEGORY)
    images = [load_image(x.path) for x in ds.test[:RUNTIME_IMAGES]]
    results, walls = [], []
    for img in images:
        t = time.perf_counter()
        results.append(pipe.inspect(img))
        walls.append(time.perf_counter() - t)
    scores = [float(r.score) for r in results]
    out: dict[str, Any] = {"inspect_cli_rc": cli.returncode, "inspect_cli_head": cli.stdout.splitlines()[:6],
                           "load_s": round(load_s, 2), "images": [x.path.name for x in ds.test[:RUNTIME_IMAGES]],
                           "images_paths": [str(x.path.relative_to(work / "data")) for x in ds.test[:RUNTIME_IMAGES]],
                           "scores": scores, "finite": bool(np.isfinite(scores).all()),
                           "per_image_s": [round(w, 2) for w in walls],
                           "timings_ms_median": {k: round(float(np.median([r.timings_ms[k] for r in results])), 1)
                                                 for k in results[0].timings_ms},
                           "scoring_size": pipe.image_size, "diffusion_size": pipe.diffusion_size,
                           "threads": threads, "providers": pipe.providers, "output_bytes": 0}
    if name != "fp32" and (work / "stages" / "runtime_fp32.json").is_file():
        ref = json.loads((work / "stages" / "runtime_fp32.json").read_text())["info"]["scores"]
        out["max_abs_vs_fp32"] = float(np.max(np.abs(np.array(scores) - np.array(ref))))
    return out


def stage_runtime_fp32(work: Path, opts: dict) -> dict:
    return _runtime(work, "fp32", opts["threads"])


def stage_runtime_fp16(work: Path, opts: dict) -> dict:
    return _runtime(work, "fp16", opts["threads"])


def stage_runtime_taesd(work: Path, opts: dict) -> dict:
    return _runtime(work, "taesd", opts["threads"])


def _ort_median_ms(path: Path, feed: dict, threads: int, repeats: int) -> float:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, feed)  # warm-up
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        walls.append((time.perf_counter() - t) * 1000)
    return float(np.median(walls))


def stage_taesd_latency(work: Path, opts: dict) -> dict:
    """TAESD (from its hub id, exported by the project's specs) next to the fp32 bundle's full-VAE graphs."""
    import numpy as np

    from o2n_edge.diffusion.taesd import load_taesd
    from o2n_edge.export.onnx_export import export_onnx
    from o2n_edge.export.specs import vae_decoder_spec, vae_encoder_spec

    size, threads = opts["size"], opts["threads"]
    vae = load_taesd(TAESD_ID)
    lat = size // 2 ** (len(vae.config.block_out_channels) - 1)
    out = work / "taesd_graphs"
    full = work / "bundles" / "fp32"
    rng = np.random.default_rng(0)
    pixels = {"pixels": (rng.random((1, 3, size, size), dtype=np.float32) * 2 - 1)}
    latent = {"latent": rng.standard_normal((1, 4, lat, lat), dtype=np.float32)}
    graphs = {}
    for half, spec in (("encoder", vae_encoder_spec(vae, size, name="taesd_encoder")),
                       ("decoder", vae_decoder_spec(vae, lat, name="taesd_decoder"))):
        rep = export_onnx(spec.wrap(vae).float(), spec, out / f"taesd_{half}.onnx", "fp32")
        graphs[f"taesd_{half}"] = (out / f"taesd_{half}.onnx", rep.bytes)
    for half in ("encoder", "decoder"):
        f = full / f"vae_{half}.onnx"
        graphs[f"full_{half}"] = (f, _tree_bytes(f) + (_tree_bytes(f.with_name(f.name + ".data"))
                                                       if f.with_name(f.name + ".data").is_file() else 0))
    latency = {}
    for name, (path, nbytes) in graphs.items():
        feed = pixels if name.endswith("encoder") else latent
        latency[name] = {"median_ms": round(_ort_median_ms(path, feed, threads, TAESD_REPEATS), 1), "bytes": int(nbytes)}
    return {"latency": latency, "size": size, "repeats": TAESD_REPEATS, "threads": threads,
            "params": {"taesd": int(sum(p.numel() for p in vae.parameters()))}, "output_bytes": _tree_bytes(out)}


def stage_lcm_lora_keys(work: Path, opts: dict) -> dict:
    """How many of the LCM-LoRA file's modules diffusers' kohya-key conversion maps onto the UNet."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    from o2n_edge.hub import resolve_lora

    f = resolve_lora(LCM_ID)
    sd = load_file(str(f))
    modules = {k.rsplit(".lora_down", 1)[0] for k in sd if ".lora_down" in k}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    unet = [k for k in converted if k.startswith("unet.") and ("lora_A" in k or "lora.down" in k)]
    return {"file_modules": len(modules), "converted_unet_modules": len(unet), "file_bytes": f.stat().st_size,
            "rank": LCM_RANK, "output_bytes": 0}


def run_stage(name: str, work: Path, opts: dict) -> None:
    """Run one stage in this process and write its JSON (wall, peak RSS, bytes, details)."""
    import torch

    torch.set_num_threads(opts["threads"])
    t = time.perf_counter()
    info = globals()[f"stage_{name}"](work, opts)
    doc = {"stage": name, "wall_s": round(time.perf_counter() - t, 2), "peak_rss_bytes": _peak_rss(),
           "output_bytes": int(info.pop("output_bytes", 0)), "info": info}
    out = work / "stages" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out)


def stage_env(work: Path, threads: int) -> dict[str, str]:
    """The environment every stage runs in: the dry run's own hub cache, offline."""
    env = dict(os.environ)
    env.update({"HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    env.pop("HF_HUB_CACHE", None)
    return env
