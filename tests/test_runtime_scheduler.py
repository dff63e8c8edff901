"""Golden test of the numpy LCM scheduler against diffusers' LCMScheduler, step by step.

What "the same" means here: the timesteps the diffusers img2img pipelines actually run (taken
from the pipelines' own ``retrieve_timesteps`` / ``get_timesteps``), the same forward noising,
and the same ``(prev_sample, denoised)`` after every step given the same model outputs and the
same injected noise (diffusers' ``randn_tensor`` is monkeypatched to hand out our numpy noise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import diffusers.schedulers.scheduling_lcm as scheduling_lcm  # noqa: E402
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline  # noqa: E402
from diffusers.pipelines.latent_consistency_models import (  # noqa: E402
    pipeline_latent_consistency_img2img as lcm_img2img,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as sd_img2img  # noqa: E402

from o2n_edge.export.scheduler_tables import lcm_tables  # noqa: E402
from o2n_edge.runtime.scheduler import NumpyLCMScheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LATENT_SHAPE = (2, 4, 8, 8)
RTOL = 1e-5
CONFIGS = {
    # Stable Diffusion 1.5 + LCM(-LoRA): the production numbers.
    "sd15": dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        original_inference_steps=50, set_alpha_to_one=True,
    ),
    # A tiny linear schedule, with the other options switched on.
    "tiny_linear": dict(
        num_train_timesteps=100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        original_inference_steps=25, prediction_type="v_prediction", set_alpha_to_one=False,
        clip_sample=True, clip_sample_range=1.5, timestep_scaling=5.0,
    ),
    # Cosine betas rescaled to zero terminal SNR, x0-prediction.
    "cosine_zero_snr": dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True,
        original_inference_steps=40, prediction_type="sample",
    ),
}
STEPS = (1, 2, 4, 8)
STRENGTHS = (1.0, 0.5, 0.3)


def _diffusers_timesteps(sched: LCMScheduler, steps: int, strength: float, mode: str) -> np.ndarray:
    """The timesteps diffusers' img2img pipeline runs (its own helper functions, same call order)."""
    if mode == "lcm":
        # LatentConsistencyModelImg2ImgPipeline.__call__, step 5.
        timesteps, _ = lcm_img2img.retrieve_timesteps(
            sched, steps, "cpu", None, original_inference_steps=None, strength=strength
        )
    else:
        # StableDiffusionImg2ImgPipeline.__call__, step 5 (an LCM-LoRA setup).
        sd_img2img.retrieve_timesteps(sched, steps, "cpu", None, None)
        pipe = SimpleNamespace(scheduler=sched)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    return timesteps


def _close(ours: np.ndarray, ref: torch.Tensor, what: str) -> None:
    ref_np = ref.detach().cpu().numpy()
    assert ours.shape == ref_np.shape and ours.dtype == ref_np.dtype, what
    scale = float(np.abs(ref_np).max()) or 1.0
    np.testing.assert_allclose(ours, ref_np, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["lcm", "truncate"])
def test_golden_against_diffusers(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = LCMScheduler(**CONFIGS[name])
    ours = NumpyLCMScheduler.from_config(json.loads(json.dumps(lcm_tables(ref))))
    pending_noise: list[np.ndarray] = []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):  # noqa: ARG001
        arr = pending_noise.pop(0)
        assert tuple(shape) == arr.shape
        return torch.from_numpy(arr).to(dtype=dtype)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", fake_randn)
    rng = np.random.default_rng(0)
    checked = 0
    for steps in STEPS:
        for strength in STRENGTHS:
            what = f"{name} {mode} steps={steps} strength={strength}"
            try:
                expected = _diffusers_timesteps(ref, steps, strength, mode)
            except ValueError:
                with pytest.raises(ValueError):
                    ours.set_timesteps(steps, strength=strength, strength_mode=mode)
                continue
            if len(expected) == 0:  # truncation ran zero steps: diffusers' pipeline would fail later
                with pytest.raises(ValueError, match="0 steps"):
                    ours.set_timesteps(steps, strength=strength, strength_mode=mode)
                continue
            timesteps = ours.set_timesteps(steps, strength=strength, strength_mode=mode)
            np.testing.assert_array_equal(timesteps, expected.numpy(), err_msg=what)
            assert ours.steps_run == len(expected)
            assert ours.start_timestep == int(expected[0])

            # forward noising at the start timestep (the pipeline's latent_timestep = timesteps[:1])
            clean = rng.normal(size=LATENT_SHAPE).astype(np.float32)
            noise0 = rng.normal(size=LATENT_SHAPE).astype(np.float32)
            ref_latents = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise0), expected[:1])
            latents = ours.add_noise(clean, noise0, ours.start_timestep)
            _close(latents, ref_latents, f"{what} add_noise")

            # the denoising loop, fed identical model outputs and noise
            for i, t in enumerate(expected):
                model_out = rng.normal(size=LATENT_SHAPE).astype(np.float32)
                noise = rng.normal(size=LATENT_SHAPE).astype(np.float32)
                last = i == len(expected) - 1
                if not last:
                    pending_noise.append(noise)
                ref_prev, ref_denoised = ref.step(torch.from_numpy(model_out), t, ref_latents, return_dict=False)
                assert not pending_noise, f"{what}: diffusers drew noise differently"
                prev, denoised = ours.step(model_out, int(t), latents, noise=None if last else noise)
                _close(denoised, ref_denoised, f"{what} step {i} denoised")
                _close(prev, ref_prev, f"{what} step {i} prev_sample")
                ref_latents, latents = ref_prev, prev
                checked += 1
    assert checked > 20


def test_add_noise_per_sample_timesteps() -> None:
    ref = LCMScheduler(**CONFIGS["sd15"])
    ours = NumpyLCMScheduler.from_config(lcm_tables(ref))
    rng = np.random.default_rng(1)
    clean = rng.normal(size=LATENT_SHAPE).astype(np.float32)
    noise = rng.normal(size=LATENT_SHAPE).astype(np.float32)
    ts = np.array([999, 19], dtype=np.int64)
    expected = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), torch.from_numpy(ts))
    _close(ours.add_noise(clean, noise, ts), expected, "per-sample add_noise")
    with pytest.raises(ValueError, match="one per sample"):
        ours.add_noise(clean, noise, [1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        ours.add_noise(clean, noise, 1000)


def test_strength_trap_is_reported() -> None:
    """Strength 0.3 with 4 steps runs int(4 * 0.3) = 1 step under img2img truncation."""
    sched = NumpyLCMScheduler.from_config(lcm_tables(LCMScheduler(**CONFIGS["sd15"])))
    sched.set_timesteps(4, strength=0.3, strength_mode="truncate")
    assert sched.steps_run == 1 and sched.timesteps.tolist() == [259]
    # LCMScheduler's own strength handling spreads all 4 steps over the first 30% of the schedule.
    sched.set_timesteps(4, strength=0.3)
    assert sched.steps_run == 4 and sched.timesteps.tolist() == [299, 239, 159, 79]
    with pytest.raises(ValueError, match="0 steps"):
        sched.set_timesteps(2, strength=0.3, strength_mode="truncate")
    with pytest.raises(ValueError, match="fewer than num_inference_steps"):
        sched.set_timesteps(8, strength=0.1)


def test_tables_round_trip_and_json() -> None:
    ref = LCMScheduler(**CONFIGS["tiny_linear"])
    tables = lcm_tables(ref)
    loaded = json.loads(json.dumps(tables))
    assert loaded == tables
    ours = NumpyLCMScheduler.from_config(loaded)
    assert ours.to_config() == tables
    np.testing.assert_array_equal(ours.alphas_cumprod.astype(np.float32), ref.alphas_cumprod.numpy())
    assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)
    # A full diffusers config (plus the tables) is accepted: the keys LCM ignores are ignored.
    merged = {**dict(ref.config), **tables}
    assert NumpyLCMScheduler.from_config(merged).to_config() == tables


def test_bad_configs_are_refused() -> None:
    tables = lcm_tables(LCMScheduler(**CONFIGS["tiny_linear"]))
    with pytest.raises(NotImplementedError, match="thresholding"):
        NumpyLCMScheduler.from_config({**tables, "thresholding": True})
    with pytest.raises(NotImplementedError, match="thresholding"):
        lcm_tables(LCMScheduler(thresholding=True))
    with pytest.raises(TypeError, match="LCMScheduler"):
        lcm_tables(diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="unknown keys"):
        NumpyLCMScheduler.from_config({**tables, "eta": 0.0})
    with pytest.raises(ValueError, match="lacks"):
        NumpyLCMScheduler.from_config({k: v for k, v in tables.items() if k != "alphas_cumprod"})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NumpyLCMScheduler.from_config({**tables, "alphas_cumprod": tables["alphas_cumprod"][:-1]})
    with pytest.raises(ValueError, match="prediction_type"):
        NumpyLCMScheduler.from_config({**tables, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="only runs"):
        NumpyLCMScheduler.from_config({**tables, "type": "DDIMScheduler"})


def test_step_contract() -> None:
    sched = NumpyLCMScheduler.from_config(lcm_tables(LCMScheduler(**CONFIGS["sd15"])))
    x = np.zeros(LATENT_SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x, x)
    sched.set_timesteps(2)  # [999, 499]
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.step(x, 500, x, x)
    with pytest.raises(ValueError, match="needs noise"):
        sched.step(x, 999, x, None)
    sched.set_timesteps(2)
    sched.step(x, 999, x, x)
    with pytest.raises(ValueError, match="next timestep is 499"):
        sched.step(x, 999, x, x)
    prev, denoised = sched.step(x, 499, x, None)  # the last step needs no noise
    assert prev is not None and np.array_equal(prev, denoised)
    with pytest.raises(ValueError, match="finished"):
        sched.step(x, 499, x, None)


def test_half_precision_keeps_dtype() -> None:
    sched = NumpyLCMScheduler.from_config(lcm_tables(LCMScheduler(**CONFIGS["sd15"])))
    rng = np.random.default_rng(2)
    x, eps, noise = (rng.normal(size=LATENT_SHAPE).astype(np.float32) for _ in range(3))
    sched.set_timesteps(2)
    prev32, den32 = sched.step(eps, 999, x, noise)
    sched.set_timesteps(2)
    prev16, den16 = sched.step(eps.astype(np.float16), 999, x.astype(np.float16), noise.astype(np.float16))
    assert prev16.dtype == np.float16 and den16.dtype == np.float16
    np.testing.assert_allclose(den16.astype(np.float32), den32, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(prev16.astype(np.float32), prev32, atol=2e-2, rtol=2e-2)


def test_runtime_scheduler_never_imports_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import json\n"
        "import numpy as np\n"
        "from o2n_edge.runtime.scheduler import NumpyLCMScheduler\n"
        "tables = json.loads(sys.stdin.read())\n"
        "s = NumpyLCMScheduler.from_config(tables)\n"
        "s.set_timesteps(4, strength=0.5)\n"
        "x = np.zeros((1, 4, 8, 8), np.float32)\n"
        "for i, t in enumerate(s.timesteps):\n"
        "    x, _ = s.step(x, int(t), x, x)\n"
        "bad = [m for m in ('torch', 'diffusers') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "print('ok', s.steps_run)\n"
    )
    tables = json.dumps(lcm_tables(LCMScheduler(**CONFIGS["sd15"])))
    res = subprocess.run(
        [sys.executable, "-c", code], input=tables, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok 4"
