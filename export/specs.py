"""One export spec per submodel: the facts every export stage needs about it.

Why a spec: exporting, validating, fp16-converting and building a TensorRT engine all need the
same facts about a submodel (tensor names, which axes are dynamic, how to make inputs, the
TensorRT min/opt/max shapes, the opset, the tolerance). Keeping them in one frozen object (the
union of optimum's ``OnnxConfig`` and the TensorRT diffusion demo's model classes) means the
ONNX graph, its validation and its engine can never disagree on a name or a shape.

The wrappers that make each submodel export-friendly (positional tensors in, a fixed tuple
out, no randomness) are in ``wrappers.py``.

Resolution is static per bundle (the line's camera size is fixed, so static or narrow TensorRT
profiles per resolution are built), so only the batch axis is dynamic; validation runs
at batches other than the traced one so a batch size baked into the graph is caught.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from o2n_edge._lazy import require

from .fp16 import FP16_BLOCK_COMMON, FP16_BLOCK_VAE
from .wrappers import (  # noqa: F401 (the wrappers are re-exported for callers of specs)
    EncoderWrapper,
    TextEncoderWrapper,
    UNetWrapper,
    VaeDecoderWrapper,
    VaeEncoderWrapper,
    _config_get,
)

torch = require("torch", "the ONNX export")

DEFAULT_OPSET = 17  # >= 17: LayerNormalization op, and open_clip's attention/unflatten export
TRACE_BATCH = 1
VALIDATION_BATCHES = (2, 3)  # != TRACE_BATCH: catches a batch size frozen into the graph
DEFAULT_BATCH_RANGE = (1, 1, 4)  # TensorRT (min, opt, max) batch of the default profile
NUM_TRAIN_TIMESTEPS = 1000
BATCH_AXIS = "batch"
# Tolerances are on max |onnx - torch| relative to max(1, max |torch|) (see validate.py):
# fp32 graphs must match to numerical noise; fp16 graphs are compared against fp32 torch.
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "fp16": 5e-2}
InputFactory = Callable[[int, int], tuple[Any, ...]]


@dataclass(frozen=True)
class ExportSpec:
    """Everything export/validate/fp16/TensorRT need to know about one submodel.

    ``sample_inputs(batch, size)`` returns inputs in ``input_names`` order; ``size`` is the
    spatial side the submodel sees (latent side for UNet/decoder, pixel side for encoders).
    ``wrap(model)`` returns the export wrapper (an ``nn.Module`` with positional tensor inputs
    and a tuple of outputs in ``output_names`` order).
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    sample_inputs: InputFactory = field(repr=False, compare=False)
    size: int
    wrap: Callable[[Any], Any] = field(repr=False, compare=False)
    trace_batch: int = TRACE_BATCH
    validation_shapes: tuple[tuple[int, int], ...] = ()  # (batch, size); () -> defaults
    opset: int = DEFAULT_OPSET
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    fp16_block_ops: tuple[str, ...] = FP16_BLOCK_COMMON
    batch_range: tuple[int, int, int] = DEFAULT_BATCH_RANGE
    extra: Mapping[str, Any] = field(default_factory=dict)  # facts the runtime may need

    def __post_init__(self) -> None:
        assert self.opset >= 17, f"{self.name}: opset {self.opset} < 17 (known export traps)"
        names = self.input_names + self.output_names
        assert len(set(names)) == len(names), f"{self.name}: tensor names must be unique: {names}"
        unknown = set(self.dynamic_axes) - set(names)
        assert not unknown, f"{self.name}: dynamic axes for unknown tensors {unknown}"
        assert {"fp32", "fp16"} <= set(self.tolerance), f"{self.name}: tolerance needs fp32 and fp16"
        if not self.validation_shapes:
            object.__setattr__(
                self, "validation_shapes", tuple((b, self.size) for b in VALIDATION_BATCHES)
            )
        traced = (self.trace_batch, self.size)
        assert any(s != traced for s in self.validation_shapes), (
            f"{self.name}: validation needs a shape other than the traced {traced}"
        )
        mn, opt, mx = self.batch_range
        assert 1 <= mn <= opt <= mx, f"{self.name}: batch_range must be min<=opt<=max, got {self.batch_range}"

    def make_inputs(self, batch: int, size: int | None = None, seed: int = 0) -> tuple[Any, ...]:
        """Seeded ``sample_inputs`` that leaves the caller's global RNG state untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.sample_inputs(batch, self.size if size is None else size)

    def trace_inputs(self) -> tuple[Any, ...]:
        """Inputs the graph is traced with (batch ``trace_batch`` at ``size``)."""
        return self.make_inputs(self.trace_batch)

    def input_shapes(self, batch: int, size: int | None = None) -> dict[str, list[int]]:
        """Concrete input shapes at ``batch``/``size`` (from ``sample_inputs``)."""
        xs = self.make_inputs(batch, size)
        return {n: list(x.shape) for n, x in zip(self.input_names, xs)}

    def trt_profile(
        self,
        min_batch: int | None = None,
        opt_batch: int | None = None,
        max_batch: int | None = None,
        size: int | None = None,
    ) -> dict[str, dict[str, list[int]]]:
        """TensorRT optimization profile: input -> {"min","opt","max"} shapes.

        Only the batch range varies; the resolution is the bundle's fixed ``size`` (static
        spatial dims build faster and run faster than dynamic ones on TensorRT).
        """
        dmin, dopt, dmax = self.batch_range
        b = (min_batch or dmin, opt_batch or dopt, max_batch or dmax)
        assert 1 <= b[0] <= b[1] <= b[2], f"need min <= opt <= max batch, got {b}"
        shapes = [self.input_shapes(x, size) for x in b]
        return {n: {"min": shapes[0][n], "opt": shapes[1][n], "max": shapes[2][n]}
                for n in self.input_names}

    def symbolic_shapes(self) -> dict[str, dict[str, Any]]:
        """Input shapes with dynamic axes as symbols, and dtypes, for the manifest."""
        xs = self.trace_inputs()
        out = {}
        for n, x in zip(self.input_names, xs):
            dims: list[Any] = list(x.shape)
            for axis, sym in self.dynamic_axes.get(n, {}).items():
                dims[axis] = sym
            out[n] = {"shape": dims, "dtype": str(x.dtype).replace("torch.", "")}
        return out

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that changes the exported graph."""
        xs = self.trace_inputs()
        return {
            "name": self.name,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in self.dynamic_axes.items()},
            "inputs": [[list(x.shape), str(x.dtype)] for x in xs],
            "size": self.size,
            "trace_batch": self.trace_batch,
            "opset": self.opset,
            "fp16_block_ops": list(self.fp16_block_ops),
            "extra": {k: self.extra[k] for k in sorted(self.extra)},
            "wrap": _source_digest(self.wrap),
        }

    def with_tolerance(self, **tol: float) -> ExportSpec:
        """Copy with some tolerances replaced (e.g. tests, or a looser fp16 VAE)."""
        return replace(self, tolerance={**self.tolerance, **tol})


def _source_digest(obj: Any) -> str:
    """Short hash of a wrapper's source, so editing a wrapper invalidates cached exports."""
    if isinstance(obj, functools.partial):
        return _source_digest(obj.func) + hashlib.sha256(repr((obj.args, obj.keywords)).encode()).hexdigest()[:8]
    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError):
        src = getattr(obj, "__qualname__", repr(obj))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _batch_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    return {n: {0: BATCH_AXIS} for n in names}


# --- factories --------------------------------------------------------------------------------


def unet_spec(
    unet: Any,
    prompt_len: int,
    prompt_dim: int,
    latent_size: int,
    timestep_dtype: Any = None,
    **overrides: Any,
) -> ExportSpec:
    """Spec of a ``UNet2DConditionModel`` (or same-signature UNet) at ``latent_size``."""
    channels = int(_config_get(unet, "in_channels", 4))
    cond_dim = _config_get(unet, "time_cond_proj_dim")
    ts_dtype = timestep_dtype or torch.float32
    assert ts_dtype in (torch.float32, torch.int64), "timestep must be float32 or int64"

    def sample_inputs(batch: int, size: int) -> tuple[Any, ...]:
        xs = [
            torch.randn(batch, channels, size, size),
            torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,)).to(ts_dtype),
            torch.randn(batch, prompt_len, prompt_dim),
        ]
        if cond_dim is not None:
            xs.append(torch.randn(batch, int(cond_dim)))
        return tuple(xs)

    inputs = ("sample", "timestep", "encoder_hidden_states")
    if cond_dim is not None:
        inputs += ("timestep_cond",)
    outputs = ("noise_pred",)
    kw: dict[str, Any] = dict(
        name="unet", input_names=inputs, output_names=outputs,
        dynamic_axes=_batch_axes(inputs + outputs), sample_inputs=sample_inputs,
        size=latent_size, wrap=UNetWrapper,
        extra={"in_channels": channels, "prompt_len": prompt_len, "prompt_dim": prompt_dim,
               "timestep_dtype": str(ts_dtype).replace("torch.", ""),
               "time_cond_proj_dim": cond_dim},
    )
    kw.update(overrides)
    return ExportSpec(**kw)


def _vae_facts(vae: Any) -> tuple[int, int]:
    """(latent channels, downsampling factor) of an AutoencoderKL."""
    latent_ch = int(_config_get(vae, "latent_channels", 4))
    factor = 2 ** (len(_config_get(vae, "block_out_channels", (0,) * 4)) - 1)
    return latent_ch, factor


def vae_encoder_spec(vae: Any, image_size: int, **overrides: Any) -> ExportSpec:
    """Spec of the VAE encoder: pixels in [-1,1] at ``image_size`` -> scaled latent mean."""
    latent_ch, factor = _vae_facts(vae)
    assert image_size % factor == 0, f"image_size {image_size} not divisible by VAE factor {factor}"

    def sample_inputs(batch: int, size: int) -> tuple[Any, ...]:
        return (torch.rand(batch, 3, size, size) * 2 - 1,)

    kw: dict[str, Any] = dict(
        name="vae_encoder", input_names=("pixels",), output_names=("latent",),
        dynamic_axes=_batch_axes(("pixels", "latent")), sample_inputs=sample_inputs,
        size=image_size, wrap=VaeEncoderWrapper, fp16_block_ops=FP16_BLOCK_VAE,
        extra={"latent_channels": latent_ch, "downsample": factor,
               "scaling_factor": float(_config_get(vae, "scaling_factor", 1.0))},
    )
    kw.update(overrides)
    return ExportSpec(**kw)


def vae_decoder_spec(vae: Any, latent_size: int, **overrides: Any) -> ExportSpec:
    """Spec of the VAE decoder: scaled latents at ``latent_size`` -> pixels in ~[-1,1]."""
    latent_ch, factor = _vae_facts(vae)

    def sample_inputs(batch: int, size: int) -> tuple[Any, ...]:
        return (torch.randn(batch, latent_ch, size, size),)

    kw: dict[str, Any] = dict(
        name="vae_decoder", input_names=("latent",), output_names=("pixels",),
        dynamic_axes=_batch_axes(("latent", "pixels")), sample_inputs=sample_inputs,
        size=latent_size, wrap=VaeDecoderWrapper, fp16_block_ops=FP16_BLOCK_VAE,
        extra={"latent_channels": latent_ch, "upsample": factor,
               "scaling_factor": float(_config_get(vae, "scaling_factor", 1.0))},
    )
    kw.update(overrides)
    return ExportSpec(**kw)


def image_encoder_spec(encoder: Any, **overrides: Any) -> ExportSpec:
    """Spec of a FeatureEncoder: normalized pixels (B,3,S,S) -> its ``output_names`` tensors.

    Inputs are already normalized (mean/std) by the shared numpy preprocessing, hence randn.
    """
    size = int(encoder.image_size)
    outputs = tuple(encoder.output_names)

    def sample_inputs(batch: int, s: int) -> tuple[Any, ...]:
        return (torch.randn(batch, 3, s, s),)

    kw: dict[str, Any] = dict(
        name="image_encoder", input_names=("pixels",), output_names=outputs,
        dynamic_axes=_batch_axes(("pixels",) + outputs), sample_inputs=sample_inputs,
        size=size, wrap=functools.partial(EncoderWrapper, output_names=outputs),
        extra={"image_size": size, "output_names": list(outputs)},
    )
    kw.update(overrides)
    return ExportSpec(**kw)


def text_encoder_spec(text_model: Any, seq_len: int = 77, **overrides: Any) -> ExportSpec:
    """Spec of a CLIPTextModel-like text tower (optional: bundles store prompt embeddings).

    ``size`` is the token sequence length here (no spatial side).
    """
    vocab = int(_config_get(text_model, "vocab_size", 49408))

    def sample_inputs(batch: int, length: int) -> tuple[Any, ...]:
        return (torch.randint(0, vocab, (batch, length), dtype=torch.int64),)

    outputs = ("last_hidden_state", "pooler_output")
    kw: dict[str, Any] = dict(
        name="text_encoder", input_names=("input_ids",), output_names=outputs,
        dynamic_axes=_batch_axes(("input_ids",) + outputs), sample_inputs=sample_inputs,
        size=seq_len, wrap=TextEncoderWrapper, extra={"seq_len": seq_len, "vocab_size": vocab},
    )
    kw.update(overrides)
    return ExportSpec(**kw)


def spec_digest(spec: ExportSpec) -> str:
    """sha256 of :meth:`ExportSpec.fingerprint` (part of the export's input hash)."""
    blob = json.dumps(spec.fingerprint(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
