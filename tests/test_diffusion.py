"""The One-to-Normal diffusion stage end to end: personalize -> distil -> transform -> pool.

tiny profile on two real hazelnut photos (and a synthetic query), plus the sd15 code path on a
tiny random checkpoint of the same classes (LoRA personalization in diffusers format, LCM-LoRA
merge). Kept small enough for CI (< 90 s on two CPU cores).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402

from o2n_edge.diffusion import (  # noqa: E402
    build_models,
    generate_pool,
    load_run,
    one_to_normal,
    transform_plan,
)
from o2n_edge.diffusion.distill import distill  # noqa: E402
from o2n_edge.diffusion.models import SD15_ENV  # noqa: E402
from o2n_edge.diffusion.personalize import augment, personalize  # noqa: E402
from o2n_edge.diffusion.run_dir import RunDir  # noqa: E402
from o2n_edge.diffusion.transform import lcm_denoise, lcm_scheduler  # noqa: E402
from o2n_edge.profiles import PROFILES  # noqa: E402
from sd15_fixtures import make_tiny_lora, make_tiny_sd15_checkpoint  # noqa: E402

TINY = PROFILES["tiny"].diffusion
SIZE = TINY.image_size


def _shots(shared_data: Path, n: int, size: int) -> list[np.ndarray]:
    files = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))[:n]
    assert len(files) == n
    return [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files]


def _synthetic(h: int = 40, w: int = 48) -> np.ndarray:
    """A yellow gradient with a blue blob: odd size (exercises resizing), a fake 'defect'."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([200 + 40 * xx / w, 180 + 40 * yy / h, 40 + 0 * xx], -1)
    img[(yy - h // 2) ** 2 + (xx - w // 3) ** 2 < 30] = (30, 60, 200)
    return img.astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> object:
    """One intra-op thread: on a shared 2-core box, two OpenMP threads that get descheduled spin
    at barriers and run many times slower; one thread keeps the suite's time predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    """Personalize (6 steps, checkpoint every 3), resume to 8, distil 4 steps."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    shots = _shots(shared_data, 2, SIZE)
    personalize(shots, "hazelnut", TINY, out, steps=6, checkpoint_every=3, progress=False)
    first = json.loads((out / "run.json").read_text())
    ckpts_first = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    personalize(shots, "hazelnut", TINY, out, steps=8, checkpoint_every=3, progress=False)
    second = json.loads((out / "run.json").read_text())
    distill(out, steps=4, progress=False)
    return {"dir": out, "shots": shots, "first": first, "second": second, "ckpts_first": ckpts_first,
            "run": load_run(out)}


def test_missing_base_model_names_the_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SD15_ENV, raising=False)
    spec = PROFILES["sd15"].diffusion
    with pytest.raises(FileNotFoundError, match="--base-model"):
        build_models(spec)
    with pytest.raises(FileNotFoundError, match="--base-model"):
        build_models(replace(spec, base_model=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=SD15_ENV):
        build_models(replace(spec, base_model=str(tmp_path)))  # exists but is no checkpoint


def test_augment_is_deterministic_and_in_range(shared_data: Path) -> None:
    shots = np.stack(_shots(shared_data, 2, SIZE))
    a, b = augment(shots, 6, seed=3), augment(shots, 6, seed=3)
    assert a.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(a, augment(shots, 6, seed=4))


def test_personalize_checkpoints_and_resume(tiny_run: dict) -> None:
    out = tiny_run["dir"]
    first, second = tiny_run["first"], tiny_run["second"]
    assert tiny_run["ckpts_first"] == ["step_000003.pt", "step_000006.pt"]
    assert first["steps"] == 6 and first["resumed_from"] == 0
    assert second["steps"] == 8 and second["resumed_from"] == 6
    assert second["vae_steps"] == first["vae_steps"]  # the phase split is fixed at the first start
    assert (out / "checkpoints" / "step_000008.pt").is_file()
    assert second["shots"] == 2 and second["prompt"] == "a photo of sks hazelnut"
    assert second["kind"] == "tiny" and "torch" in second["versions"] and second["wall_s"] > 0
    assert math.isfinite(second["losses"]["unet"]["last"])
    rd = RunDir(out)
    for p in (rd.unet / "config.json", rd.vae / "config.json", rd.prompt_embeds, rd.shots, rd.scheduler):
        assert p.exists(), p
    emb = np.load(rd.prompt_embeds)
    assert emb.shape == (1, 4, 32) and emb.dtype == np.float32
    assert not list(out.glob(".*tmp*")), "no temp files left behind"


def test_distill_writes_finite_distances(tiny_run: dict) -> None:
    info = json.loads((tiny_run["dir"] / "distill.json").read_text())
    assert info["method"] == "lcd" and info["steps"] == 4
    d = info["distances"]
    assert d["noise_timestep"] == 499  # strength 0.5: LCM origin schedule starts at 25*20-1
    for n in ("1", "2", "4"):
        for key in ("latent_mse", "pixel_mse", "psnr"):
            assert math.isfinite(d["student"][n][key]), (n, key)
    assert (tiny_run["dir"] / "student" / "unet" / "config.json").is_file()
    assert tiny_run["run"].student is not None


def test_one_to_normal_deterministic_shapes_and_steps(tiny_run: dict) -> None:
    run = tiny_run["run"]
    images = [tiny_run["shots"][0], _synthetic()]
    a = one_to_normal(run, images, strength=0.3, steps=4, seed=7)
    b = one_to_normal(run, images[::-1], strength=0.3, steps=4, seed=7, batch_size=1)
    assert a.normals.shape == (2, SIZE, SIZE, 3) and a.normals.dtype == np.uint8
    # Independent of order and batching (up to conv-kernel float differences between batch sizes).
    assert np.abs(a.normals.astype(int) - b.normals[::-1]).max() <= 2
    assert np.array_equal(a.normals, one_to_normal(run, images, strength=0.3, steps=4, seed=7).normals)
    assert a.unet == "student" and a.scheduler == "lcm"
    # LCM img2img convention: strength 0.3 shortens the origin schedule to int(50*0.3)=15
    # timesteps and 4 of them run (not int(4*0.3)=1 as with SD img2img).
    ref = lcm_scheduler(run)
    ref.set_timesteps(num_inference_steps=4, strength=0.3)
    assert a.timesteps == [int(t) for t in ref.timesteps] == [299, 239, 159, 79]
    assert a.steps_run == 4
    c = one_to_normal(run, images, strength=0.3, steps=4, seed=8)
    assert not np.array_equal(a.normals, c.normals)
    plan = transform_plan(run, strength=0.3, steps=4)
    assert plan["timesteps"] == a.timesteps and plan["steps_run"] == 4
    assert len(plan["alphas_cumprod"]) == 1000 and plan["steps"][-1]["add_noise"] is False
    teacher = one_to_normal(run, images[:1], strength=0.3, steps=4, use_student=False, teacher_steps=10)
    assert teacher.scheduler == "ddim" and teacher.steps_run == 10 and teacher.timesteps[0] == 299
    with pytest.raises(ValueError, match="lower steps or raise strength"):
        one_to_normal(run, images, strength=0.05, steps=4)


def test_lcm_denoise_matches_diffusers_step(tiny_run: dict) -> None:
    """Our explicit-noise LCM loop is LCMScheduler.step (the runtime port's golden reference)."""
    run = tiny_run["run"]
    sched = lcm_scheduler(run)
    sched.set_timesteps(num_inference_steps=3, strength=0.6)
    ts = [int(t) for t in sched.timesteps]
    shape = (1, 4, SIZE // 4, SIZE // 4)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    lat, cond = x0.clone(), run.prompt_embeds
    for t in sched.timesteps:
        with torch.no_grad():
            eps = run.student(lat, t, cond).sample
        lat, denoised = sched.step(eps, t, lat, generator=g, return_dict=False)
    g2 = torch.Generator().manual_seed(5)
    noises = [torch.randn(shape, generator=g2) for _ in range(len(ts) - 1)]
    ours = lcm_denoise(run.student, x0.clone(), ts, cond, lcm_scheduler(run), noises)
    torch.testing.assert_close(ours, denoised, rtol=1e-4, atol=1e-4)


def test_generate_pool(tiny_run: dict) -> None:
    run = tiny_run["run"]
    pool = generate_pool(run, 3, seed=1, batch_size=2, progress=False)
    assert pool.shape == (3, SIZE, SIZE, 3) and pool.dtype == np.uint8
    longer = generate_pool(run, 4, seed=1, batch_size=4, progress=False)
    # Image i depends only on (seed, i), up to conv float differences between batch sizes.
    assert np.abs(pool.astype(int) - longer[:3]).max() <= 2
    noise = generate_pool(run, 2, init="noise", progress=False)
    assert noise.shape == (2, SIZE, SIZE, 3)
    assert generate_pool(run, 0, progress=False).shape == (0, SIZE, SIZE, 3)


def test_sd15_path_on_tiny_checkpoint(tmp_path: Path, shared_data: Path) -> None:
    """LoRA personalization in diffusers format, LCM-LoRA merge, transform, on a tiny checkpoint."""
    ckpt = make_tiny_sd15_checkpoint(tmp_path / "sd15")
    spec = replace(PROFILES["sd15"].diffusion, image_size=32, base_model=str(ckpt))
    shots = _shots(shared_data, 2, 32)
    out = personalize(shots, "hazelnut", spec, tmp_path / "run", steps=3, lora_rank=4,
                      prior_preservation=True, num_class_images=2, progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "sd15" and info["prior_preservation"] and info["steps"] == 3
    emb = np.load(out / "prompt_embeds.npy")
    assert emb.shape == (1, 77, 32)  # CLIP hidden states of the identifier prompt
    lora_file = out / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    # The format other SD tools read: a fresh pipeline loads it with load_lora_weights.
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(out / "lora", adapter_name="personal")
    assert "personal" in pipe.get_active_adapters()
    # LCM-LoRA (a fake one: just another LoRA) merged with the personalization LoRA.
    fake_lcm = make_tiny_lora(ckpt, tmp_path / "lcm_lora")
    distill(out, lcm_lora=fake_lcm, lcm_lora_scale=1.0, personal_lora_scale=0.8, progress=False)
    dinfo = json.loads((out / "distill.json").read_text())
    assert dinfo["method"] == "lcm_lora_merge" and dinfo["steps"] == 0
    assert math.isfinite(dinfo["distances"]["student"]["1"]["psnr"])
    run = load_run(out)
    base = diffusers.UNet2DConditionModel.from_pretrained(ckpt / "unet")
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(run.student.state_dict()[key], base.state_dict()[key])
    assert not torch.equal(run.models.unet.state_dict()[key], base.state_dict()[key])  # LoRA fused
    res = one_to_normal(run, [shots[0], _synthetic()], seed=0)
    assert res.normals.shape == (2, 32, 32, 3) and res.steps_run == spec.steps
    # Without an LCM-LoRA: consistency distillation with a LoRA student, saved in diffusers format.
    distill(out, steps=2, progress=False)
    dinfo = json.loads((out / "distill.json").read_text())
    assert dinfo["method"] == "lcd" and dinfo["student"] == "lora" and dinfo["losses"]["n"] == 2
    assert (out / "student" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert load_run(out).student is not None
    # Re-personalizing (here: resuming to 4 steps) changes the teacher: the old student goes.
    personalize(shots, "hazelnut", spec, out, steps=4, lora_rank=4, prior_preservation=True,
                num_class_images=2, progress=False)
    assert json.loads((out / "run.json").read_text())["resumed_from"] == 3
    assert not (out / "student").exists() and not (out / "distill.json").exists()
