"""The LCM scheduler in numpy: the runtime's denoising loop without torch or diffusers.

Why a port: diffusers dropped its numpy schedulers and its LCMScheduler imports torch, but the
line-side runtime must not import torch. This file reproduces
``diffusers.LCMScheduler`` (0.42.1) for what the runtime uses -- timestep selection, forward
noising and the multistep consistency ``step`` -- configured only from plain data (the bundle
manifest's ``scheduler`` dict, written by ``o2n_edge.export.scheduler_tables.lcm_tables``). A
golden test (tests/test_runtime_scheduler.py) holds it to diffusers step by step.

Differences from diffusers, all deliberate:

- The noise injected between steps is passed in (``step(..., noise=...)``): the runtime seeds
  it with numpy, and the caller decides where randomness comes from.
- Only the standard LCM schedule (no custom ``timesteps`` lists); ``thresholding`` is refused.
- Two ways of applying img2img ``strength`` (``strength_mode``), because diffusers has two and
  they run different numbers of steps:

  ``"lcm"`` (default): ``LCMScheduler.set_timesteps(n, strength=s)``, which is what
  ``LatentConsistencyModelImg2ImgPipeline`` runs: the *distillation* schedule is cut to its
  first ``int(original_inference_steps * s)`` timesteps and ``n`` steps are spread over it, so
  ``steps_run == n`` (or a ValueError when the cut schedule has fewer than ``n`` timesteps).

  ``"truncate"``: ``set_timesteps(n)`` then the img2img pipelines' ``get_timesteps`` (what
  ``StableDiffusionImg2ImgPipeline`` + an LCM-LoRA scheduler runs): the n-step schedule loses its
  first ``n - int(n * s)`` steps, so strength 0.3 with 4 steps runs ``int(1.2) = 1`` step -- a
  common img2img trap. ``steps_run`` reports it; zero steps is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Consistency-model boundary condition constant (diffusers hard-codes sigma_data = 0.5).
SIGMA_DATA = 0.5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
STRENGTH_MODES = ("lcm", "truncate")
StrengthMode = Literal["lcm", "truncate"]
# Config keys this port reads; anything else must be a diffusers config key the LCM schedule does
# not depend on (the tables already bake betas in), or the config is refused.
REQUIRED_KEYS = (
    "alphas_cumprod",
    "num_train_timesteps",
    "original_inference_steps",
    "timestep_scaling",
    "prediction_type",
)
OPTIONAL_KEYS = (
    "type",
    "set_alpha_to_one",
    "final_alpha_cumprod",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
)
IGNORED_DIFFUSERS_KEYS = (
    "_class_name",
    "_diffusers_version",
    "_use_default_values",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "steps_offset",  # LCMScheduler.set_timesteps never reads it
    "timestep_spacing",  # idem
    "dynamic_thresholding_ratio",  # only with thresholding, which is refused
    "sample_max_value",
)
SCHEDULER_TYPE = "LCMScheduler"


class NumpyLCMScheduler:
    """A numpy ``LCMScheduler``: ``set_timesteps``, ``add_noise``, ``step`` with diffusers' numbers.

    Stateful like diffusers: ``set_timesteps`` fixes the schedule, then each ``step`` call
    advances one position (the first call locates its timestep in the schedule).
    """

    def __init__(
        self,
        alphas_cumprod: ArrayLike,
        num_train_timesteps: int,
        original_inference_steps: int = 50,
        timestep_scaling: float = 10.0,
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = True,
        final_alpha_cumprod: float | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
    ) -> None:
        if thresholding:
            raise NotImplementedError(
                "thresholding=True (dynamic thresholding) is not supported by the numpy LCM scheduler; "
                "it is meant for pixel-space models, not latent diffusion: export with thresholding=False"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        table = np.asarray(alphas_cumprod, dtype=np.float64)
        if table.ndim != 1 or table.shape[0] != int(num_train_timesteps):
            raise ValueError(
                f"alphas_cumprod must hold num_train_timesteps = {num_train_timesteps} values, "
                f"got shape {table.shape}"
            )
        if not np.isfinite(table).all() or (table < 0).any() or (table > 1).any():
            raise ValueError("alphas_cumprod must be finite values in [0, 1]")
        if not 0 < int(original_inference_steps) <= int(num_train_timesteps):
            raise ValueError(
                f"original_inference_steps = {original_inference_steps} must be in [1, num_train_timesteps = "
                f"{num_train_timesteps}]"
            )
        self.alphas_cumprod: NDArray[np.float64] = table
        self.num_train_timesteps = int(num_train_timesteps)
        self.original_inference_steps = int(original_inference_steps)
        self.timestep_scaling = float(timestep_scaling)
        self.prediction_type = prediction_type
        self.set_alpha_to_one = bool(set_alpha_to_one)
        if final_alpha_cumprod is None:
            final_alpha_cumprod = 1.0 if set_alpha_to_one else float(table[0])
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.thresholding = False

        self.num_inference_steps: int | None = None
        self.strength: float = 1.0
        self.strength_mode: StrengthMode = "lcm"
        self.timesteps: NDArray[np.int64] = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()
        self._step_index: int | None = None

    # ----------------------------------------------------------------------------------------
    # configuration
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> NumpyLCMScheduler:
        """Build from the manifest's plain-data tables; unknown keys are refused, not guessed at."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"scheduler config must be a mapping, got {type(cfg).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"scheduler config lacks {missing} (expected the output of lcm_tables)")
        unknown = sorted(set(cfg) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS) - set(IGNORED_DIFFUSERS_KEYS))
        if unknown:
            raise ValueError(
                f"scheduler config has unknown keys {unknown}: not an LCM table this runtime understands"
            )
        if cfg.get("type", SCHEDULER_TYPE) != SCHEDULER_TYPE:
            raise ValueError(f"scheduler config is for {cfg['type']!r}, this runtime only runs {SCHEDULER_TYPE!r}")
        kwargs = {k: cfg[k] for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in cfg and k != "type"}
        return cls(**kwargs)

    def to_config(self) -> dict[str, Any]:
        """The plain-data (JSON-serializable) config that :meth:`from_config` reads back."""
        return {
            "type": SCHEDULER_TYPE,
            "num_train_timesteps": self.num_train_timesteps,
            "original_inference_steps": self.original_inference_steps,
            "timestep_scaling": self.timestep_scaling,
            "prediction_type": self.prediction_type,
            "set_alpha_to_one": self.set_alpha_to_one,
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "thresholding": False,
            "alphas_cumprod": [float(v) for v in self.alphas_cumprod],
        }

    # ----------------------------------------------------------------------------------------
    # timesteps
    # ----------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        original_inference_steps: int | None = None,
        strength_mode: StrengthMode = "lcm",
    ) -> NDArray[np.int64]:
        """Choose the timesteps to run (diffusers' exact selection) and reset the step counter.

        Returns the schedule (also ``self.timesteps``); the image is noised to ``timesteps[0]``
        (``start_timestep``) and ``steps_run`` UNet calls follow. See the module docstring for
        the two ``strength_mode`` semantics.
        """
        if strength_mode not in STRENGTH_MODES:
            raise ValueError(f"strength_mode must be one of {STRENGTH_MODES}, got {strength_mode!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = int(num_inference_steps)
        if n != num_inference_steps or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}")
        original_steps = (
            self.original_inference_steps if original_inference_steps is None else int(original_inference_steps)
        )
        if not 0 < original_steps <= self.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps = {original_steps} must be in [1, num_train_timesteps = "
                f"{self.num_train_timesteps}]"
            )
        if n > original_steps:
            raise ValueError(
                f"num_inference_steps = {n} cannot exceed original_inference_steps = {original_steps}: the LCM "
                "schedule is a subset of the distillation schedule"
            )

        schedule_strength = strength if strength_mode == "lcm" else 1.0
        # LCM distillation schedule: every k-th training timestep (k = the skipping step).
        k = self.num_train_timesteps // original_steps
        origin = np.arange(1, int(original_steps * schedule_strength) + 1, dtype=np.int64) * k - 1
        if len(origin) // n < 1:
            raise ValueError(
                f"strength {strength} keeps int({original_steps} * {strength}) = {len(origin)} of the "
                f"{original_steps} distillation timesteps, fewer than num_inference_steps = {n}: lower the steps "
                f"to at most {len(origin)} or raise the strength to at least {n / original_steps:g}"
            )
        origin = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        timesteps = origin[indices]

        if strength_mode == "truncate":
            # StableDiffusionImg2ImgPipeline.get_timesteps (scheduler.order == 1 for LCM).
            init_timestep = min(int(n * strength), n)
            t_start = max(n - init_timestep, 0)
            timesteps = timesteps[t_start:]
            if len(timesteps) == 0:
                raise ValueError(
                    f"strength {strength} with {n} steps runs int({n} * {strength}) = 0 steps "
                    "(the img2img truncation): raise the steps or the strength, or use strength_mode='lcm'"
                )

        self.num_inference_steps = n
        self.strength = float(strength)
        self.strength_mode = strength_mode
        self.timesteps = timesteps
        self._step_index = None
        return timesteps

    @property
    def steps_run(self) -> int:
        """UNet evaluations the schedule actually runs (what reports must state, not the request)."""
        self._require_timesteps()
        return int(len(self.timesteps))

    @property
    def start_timestep(self) -> int:
        """The timestep the clean latent is noised to before the first step (``timesteps[0]``)."""
        self._require_timesteps()
        return int(self.timesteps[0])

    @property
    def step_index(self) -> int | None:
        """Position in ``timesteps`` of the next ``step`` call, or None before the first one."""
        return self._step_index

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before running the scheduler")

    # ----------------------------------------------------------------------------------------
    # noise and denoising
    # ----------------------------------------------------------------------------------------

    def _alpha(self, timestep: int) -> float:
        t = int(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside [0, {self.num_train_timesteps})")
        return float(self.alphas_cumprod[t])

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: int | ArrayLike) -> np.ndarray:
        """Forward diffusion ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPMScheduler.add_noise).

        ``timestep`` is one int, or one per batch element (broadcast over the trailing axes).
        The result keeps ``original``'s dtype.
        """
        original = np.asarray(original)
        noise = np.asarray(noise)
        if original.shape != noise.shape:
            raise ValueError(f"original and noise differ in shape: {original.shape} vs {noise.shape}")
        t = np.asarray(timestep, dtype=np.int64).ravel()
        if ((t < 0) | (t >= self.num_train_timesteps)).any():
            raise ValueError(f"timestep(s) {t.tolist()} outside [0, {self.num_train_timesteps})")
        alpha = self.alphas_cumprod[t]
        if t.size == 1:
            shape: tuple[int, ...] = ()
        elif original.ndim >= 1 and t.size == original.shape[0]:
            shape = (-1,) + (1,) * (original.ndim - 1)
        else:
            raise ValueError(
                f"got {t.size} timesteps for a batch of shape {original.shape}: pass one, or one per sample"
            )
        work = np.float64 if original.dtype == np.float64 else np.float32
        sqrt_alpha = np.sqrt(alpha).reshape(shape).astype(work)
        sqrt_one_minus = np.sqrt(1.0 - alpha).reshape(shape).astype(work)
        out = sqrt_alpha * original.astype(work, copy=False) + sqrt_one_minus * noise.astype(work, copy=False)
        return out.astype(original.dtype, copy=False)

    def boundary_scalings(self, timestep: int) -> tuple[float, float]:
        """``(c_skip, c_out)`` of the consistency model's boundary condition at ``timestep``."""
        scaled = float(timestep) * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        noise: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One LCM step: returns ``(prev_sample, denoised)`` as ``LCMScheduler.step`` does.

        ``noise`` (standard normal, shaped like ``sample``) re-noises the denoised estimate to
        the next timestep; it is required on every step but the last, where diffusers draws none
        and it is ignored. ``timestep`` must be the schedule's next one: a loop that skips or
        repeats a step is a bug, and is refused rather than silently mis-scheduled.
        """
        self._require_timesteps()
        model_output = np.asarray(model_output)
        sample = np.asarray(sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output and sample differ in shape: {model_output.shape} vs {sample.shape}")
        t = int(timestep)
        if self._step_index is None:
            hits = np.flatnonzero(self.timesteps == t)  # LCM timesteps are unique by construction
            if hits.size == 0:
                raise ValueError(f"timestep {t} is not in the schedule {self.timesteps.tolist()}")
            self._step_index = int(hits[0])
        if self._step_index >= len(self.timesteps):
            raise ValueError("the schedule is finished: call set_timesteps() again for the next sample")
        if int(self.timesteps[self._step_index]) != t:
            expected = int(self.timesteps[self._step_index])
            raise ValueError(f"step() got timestep {t}, but the schedule's next timestep is {expected}")

        # 1. previous timestep: the next in the schedule (the last step "goes" to itself)
        prev_index = self._step_index + 1
        prev_t = int(self.timesteps[prev_index]) if prev_index < len(self.timesteps) else t
        # 2. alphas, betas
        alpha_t = self._alpha(t)
        alpha_prev = self._alpha(prev_t) if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1.0 - alpha_t
        beta_prev = 1.0 - alpha_prev
        # 3. boundary condition scalings
        c_skip, c_out = self.boundary_scalings(t)
        # 4. predicted x0 (in float32 at least: fp16 UNet outputs must not lose the small terms)
        work = np.float64 if sample.dtype == np.float64 else np.float32
        x = sample.astype(work, copy=False)
        eps = model_output.astype(work, copy=False)
        if self.prediction_type == "epsilon":
            x0 = (x - math.sqrt(beta_t) * eps) / math.sqrt(alpha_t)
        elif self.prediction_type == "sample":
            x0 = eps
        else:  # v_prediction
            x0 = math.sqrt(alpha_t) * x - math.sqrt(beta_t) * eps
        # 5. clip
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # 6. consistency boundary condition
        denoised = c_out * x0 + c_skip * x
        # 7. re-noise to the next timestep, except after the last step (diffusers' test
        # ``step_index != num_inference_steps - 1`` on its full-length index, in both modes)
        if prev_index < len(self.timesteps):
            if noise is None:
                raise ValueError(
                    f"step {self._step_index + 1} of {len(self.timesteps)} needs noise "
                    "(only the last step does not)"
                )
            noise = np.asarray(noise)
            if noise.shape != sample.shape:
                raise ValueError(f"noise and sample differ in shape: {noise.shape} vs {sample.shape}")
            prev_sample = math.sqrt(alpha_prev) * denoised + math.sqrt(beta_prev) * noise.astype(work, copy=False)
        else:
            prev_sample = denoised
        self._step_index += 1
        return prev_sample.astype(sample.dtype, copy=False), denoised.astype(sample.dtype, copy=False)
