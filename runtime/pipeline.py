"""The line-side pipeline: a verified bundle -> one-to-normal transform + triplet scoring, no torch.

Stages (each timed): preprocess (numpy/PIL), VAE encode, LCM steps with the personalized UNet
(numpy scheduler), VAE decode, vision encoder on the query and its normal version, scoring
(numpy), postprocess. Graphs run on ONNX Runtime with the execution provider chosen by
``backend``; when that provider is not available the pipeline says so in the log and falls back
to the CPU, so a line never stops because a driver is missing.

The transform's noise is drawn once, at export time, and stored in the bundle: the same image
gives the same score on every device, in every batch position, and in the torch reference.
Every image is first resized to the scoring size; the transform and the encoder both start from
that one array, exactly as the reference does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.data.images import decode_image
from o2n_edge.data.preprocess import preprocess_numpy, resize_uint8
from o2n_edge.data.tiling import TileLayout, split_tiles, stitch_outputs
from o2n_edge.runtime.bank_search import NearestSearch, NumpyBankSearch, OrtBankSearch
from o2n_edge.runtime.bundle import Bundle, load_bundle
from o2n_edge.runtime.manifest import need
from o2n_edge.runtime.scheduler import NumpyLCMScheduler
from o2n_edge.runtime.scoring import Reference, Scorer, ScoringConfig, bank_search_for
from o2n_edge.runtime.types import InspectResult

log = logging.getLogger("o2n_edge.runtime")

BACKENDS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    # native TensorRT engines from the bundle's engines/ where valid; the rest on CUDA/CPU EPs
    "trt-native": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEFAULT_BATCH = 8


@dataclass
class SessionOptions:
    """ONNX Runtime knobs that matter on small devices."""

    backend: str = "cpu"
    intra_op_threads: int = 0  # 0 = onnxruntime's default (all cores)
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    enable_mem_arena: bool = True
    provider_options: dict[str, dict] = field(default_factory=dict)
    # auto: on the CPU backend the bundle's search (int8: an onnxruntime graph; float32: numpy's
    # BLAS, twice the float32 graph's speed, docs/decisions/latency.md), on a GPU provider the
    # float32 graph with the bank on the device | onnxruntime | numpy (float32, no session)
    bank_search: str = "auto"


def _make_session(path: Path, opts: SessionOptions, disabled_optimizers: Sequence[str] = (),
                  model_options: dict[str, dict] | None = None):
    """An ORT session on ``opts.backend``'s providers; ``model_options`` (per provider) override ``opts``'s."""
    from o2n_edge._lazy import require

    ort = require("onnxruntime", "running a bundle")

    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.enable_cpu_mem_arena = opts.enable_mem_arena
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.graph_optimization]
    providers = resolve_providers(opts.backend)
    merged = {**opts.provider_options, **(model_options or {})}
    provider_args = [(p, merged.get(p, {})) for p in providers]
    kwargs = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(str(path), sess_options=so, providers=provider_args, **kwargs)


def resolve_providers(backend: str) -> list[str]:
    """The providers for ``backend`` that this onnxruntime build has; CPU fallback is logged."""
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    available = set(ort.get_available_providers())
    wanted = BACKENDS[backend]
    chosen = [p for p in wanted if p in available]
    if wanted[0] not in available:
        from o2n_edge.runtime.providers import install_problems

        fixes = "; ".join(p.line() for p in install_problems(sorted(available))) if backend != "cpu" else ""
        log.warning("backend %r needs %s, which this onnxruntime build does not have (%s); falling back to %s%s",
                    backend, wanted[0], ", ".join(sorted(available)), chosen[0], f". Fix: {fixes}" if fixes else "")
    return chosen


class OrtPipeline:
    """Implements :class:`o2n_edge.runtime.types.Inspector` on ONNX Runtime."""

    session_factory: Callable[[str], Any] | None = None  # see __init__

    def __init__(
        self,
        bundle: Bundle | str | Path,
        options: SessionOptions | None = None,
        session_factory: Callable[[str], Any] | None = None,
    ) -> None:
        """``session_factory(name)``, when given, supplies each graph's session (anything with
        onnxruntime's ``run(output_names, feeds)`` and ``get_providers()``): Triton's BLS model
        passes one that calls the graph models, so the rest of this pipeline runs unchanged."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.options = options or SessionOptions()
        self.session_factory = session_factory
        md = self.bundle.manifest_data
        self.manifest = self.bundle.manifest  # the plain dict, for callers that report it
        self.bundle_hash = str(md.manifest_sha256)
        self.params = ScoringConfig.from_manifest(need(md.scoring, "scoring"))
        self.image_size = int(need(md.image_size, "image_size"))
        self.threshold = float(need(md.threshold, "threshold").value)
        enc = need(md.encoder, "encoder")
        self.mean, self.std = tuple(need(enc.mean, "encoder.mean")), tuple(need(enc.std, "encoder.std"))
        level_range = enc.brightness_range
        self.brightness_range = None if level_range is None else (float(level_range[0]), float(level_range[1]))
        self.encoder_outputs = tuple(need(enc.output_names, "encoder.output_names"))
        tiling = enc.tiling or {"tile": self.image_size, "tiles": 1, "step": 0}
        self.layout = TileLayout(int(tiling["tile"]), int(tiling["tiles"]), int(tiling["step"]))
        assert self.layout.side == self.image_size, "the manifest's tiling does not cover its image size"
        self.jpeg_draft = bool(md.decode.jpeg_draft) if md.decode is not None else False
        self.sessions: dict[str, object] = {"image_encoder": self._session("image_encoder")}
        self.providers = self.sessions["image_encoder"].get_providers()  # type: ignore[attr-defined]
        self.uses_transform = "personalized" in self.params.branches
        if self.uses_transform:
            for name in ("vae_encoder", "unet", "vae_decoder"):
                self.sessions[name] = self._session(name)
            t = need(md.transform, "transform")
            self.diffusion_size = int(need(md.diffusion_image_size, "diffusion_image_size"))
            self.scheduler_config = need(md.scheduler, "scheduler")
            self.steps = int(need(t.steps, "transform.steps"))
            self.strength = float(need(t.strength, "transform.strength"))
            if float(t.keep_low_sigma or 0.0):  # bundles of the removed CPU diffusion transform
                raise ValueError(f"{self.bundle.path} runs the "
                                 "removed lite diffusion transform: export it again (lite is now the "
                                 "memory-bank detector; --profile tiny or sd15 run the transform)")
            sched = NumpyLCMScheduler.from_config(self.scheduler_config)
            self.timesteps = sched.set_timesteps(self.steps, strength=self.strength)
            want = [int(x) for x in need(t.timesteps, "transform.timesteps")]
            assert [int(x) for x in self.timesteps] == want, "scheduler tables disagree with the manifest's timesteps"
            self.prompt_embeds = self.bundle.array("prompt_embeds").astype(np.float32)
            # init noise + one per intermediate step, drawn at export time (torch's generator)
            self.noises = list(self.bundle.array("transform_noise").astype(np.float32))
            assert len(self.noises) == len(self.timesteps), "transform_noise.npy does not match the steps"
            timestep = need(md.model("unet").inputs, "models.unet.inputs")["timestep"]
            self.timestep_dtype = np.int64 if timestep.dtype == "int64" else np.float32
        pool = "pool" in self.params.branches
        stats = self.params.stats_weight > 0
        reference = Reference.from_manifest(
            need(md.scoring, "scoring"),
            memory_bank=self.bundle.array("memory_bank") if pool else None,
            global_bank=self.bundle.array("global_bank") if pool else None,
            text_features=self.bundle.array("text_features") if "text" in self.params.branches else None,
            stats_bank=self.bundle.array("stats_bank") if stats else None,
            stats_scale=self.bundle.array("stats_scale") if stats else None,
        )
        bank = reference.memory_bank
        self.scorer = Scorer(self.params, reference, search=self._bank_search(bank) if bank is not None else None)

    def _bank_search(self, bank: np.ndarray) -> NearestSearch:
        """The memory-bank search on this pipeline's provider (TensorRT backends: its CUDA EP),
        in the bank's principal axes where the bundle's scoring says so."""
        kind = self.options.bank_search
        if kind not in ("auto", "numpy", "onnxruntime"):
            raise ValueError(f"unknown bank_search {kind!r}: choose auto, onnxruntime or numpy")
        # the bundle's int8 search is the CPU's, on onnxruntime; a GPU searches the float32 bank
        # exactly on the device, and an explicit numpy search (no onnxruntime session) is float32
        on_cpu = self.options.backend == "cpu"
        params = self.params if on_cpu and kind != "numpy" else replace(self.params, search_precision="float32")
        if kind == "auto":
            kind = "numpy" if on_cpu else "onnxruntime"
        if kind == "numpy":
            return bank_search_for(params, bank, NumpyBankSearch, self.options.intra_op_threads)
        backend = "cuda" if self.options.backend in ("tensorrt", "trt-native") else self.options.backend
        options = replace(self.options, backend=backend)
        return bank_search_for(params, bank,
                               lambda rows: OrtBankSearch(rows, lambda path: _make_session(path, options)),
                               self.options.intra_op_threads)

    def _session(self, name: str):
        if self.session_factory is not None:
            return self.session_factory(name)
        if self.options.backend == "trt-native":
            from o2n_edge.runtime.trt_session import native_session

            native = native_session(self.bundle, name)
            if native is not None:
                return native
        model_options = None
        if self.options.backend == "tensorrt":
            from o2n_edge.runtime.providers import tensorrt_session_options

            # engine + timing caches beside the bundle's engines, its shape profile, its precision
            trt = tensorrt_session_options(self.bundle.path, self.bundle.manifest_data, name)
            model_options = {"TensorrtExecutionProvider": {**trt, **self.options.provider_options.get(
                "TensorrtExecutionProvider", {})}}
        return _make_session(self.bundle.model_path(name), self.options, self.bundle.ort_disabled_optimizers(name),
                             model_options)

    # ------------------------------------------------------------------ stages

    def decode(self, data: bytes, name: str = "<bytes>") -> np.ndarray:
        """Untrusted bytes -> RGB, decoded the way the bundle's reference images were.

        With ``decode.jpeg_draft`` in the manifest, a JPEG larger than the scoring size is decoded
        at a reduced DCT scale that still covers it (PIL draft mode), as the export did.
        """
        return decode_image(data, name, self.image_size if self.jpeg_draft else None)

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B,S,S,3) -> encoder outputs; a tiled bundle's tiles go through the graph as one batch."""
        pixels = split_tiles(preprocess_numpy(images, self.image_size, self.mean, self.std, self.brightness_range),
                             self.layout)
        outs = self.sessions["image_encoder"].run(None, {"pixels": pixels})  # type: ignore[attr-defined]
        return stitch_outputs(dict(zip(self.encoder_outputs, outs)), self.layout)

    def transform(self, images: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """uint8 (B,H,W,3) -> their normal versions, uint8 at the diffusion size."""
        timings = timings if timings is not None else {}
        sched = NumpyLCMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(self.steps, strength=self.strength)
        t0 = time.perf_counter()
        x = resize_uint8(images, self.diffusion_size).astype(np.float32) / 127.5 - 1.0
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        timings["transform_preprocess"] = _ms(t0)
        t0 = time.perf_counter()
        latents = self.sessions["vae_encoder"].run(None, {"pixels": x})[0]  # type: ignore[attr-defined]
        timings["vae_encode"] = _ms(t0)
        b = latents.shape[0]
        noise = np.broadcast_to(self.noises[0], latents.shape)
        sample = sched.add_noise(latents, noise, int(self.timesteps[0])).astype(np.float32)
        embeds = np.repeat(self.prompt_embeds, b, axis=0)
        denoised = sample
        for i, t in enumerate(self.timesteps):
            t0 = time.perf_counter()
            ts = np.full((b,), t, dtype=self.timestep_dtype)
            eps = self.sessions["unet"].run(None, {"sample": sample, "timestep": ts, "encoder_hidden_states": embeds})[0]  # type: ignore[attr-defined]
            nxt = np.broadcast_to(self.noises[i + 1], latents.shape) if i + 1 < len(self.timesteps) else None
            sample, denoised = sched.step(eps, int(t), sample, nxt)
            sample = sample.astype(np.float32)
            timings[f"unet_step_{i}"] = _ms(t0)
        t0 = time.perf_counter()
        pixels = self.sessions["vae_decoder"].run(None, {"latent": denoised.astype(np.float32)})[0]  # type: ignore[attr-defined]
        normals = np.clip((pixels.transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        timings["vae_decode"] = _ms(t0)
        return normals

    def normal_versions(self, query: np.ndarray, timings: dict[str, float] | None = None) -> np.ndarray:
        """Query images at the scoring size -> their normal versions, back at the scoring size."""
        return resize_uint8(self.transform(resize_uint8(query, self.diffusion_size), timings), self.image_size)

    # ------------------------------------------------------------------ Inspector

    def inspect_batch(self, images: Sequence[np.ndarray]) -> list[InspectResult]:
        """Score decoded RGB images (any size); one result per image, with per-stage timings."""
        t_all = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        query = resize_uint8(list(images), self.image_size)
        timings["preprocess"] = _ms(t0)
        normal_feats = None
        normals_at_size = None
        if self.uses_transform:
            normals_at_size = self.normal_versions(query, timings)
        t0 = time.perf_counter()
        feats = self.encode(query)
        if normals_at_size is not None:
            normal_feats = self.encode(normals_at_size)
        timings["image_encoder"] = _ms(t0)
        t0 = time.perf_counter()
        res = self.scorer.score(feats, normal_feats)
        timings["scoring"] = _ms(t0)
        t0 = time.perf_counter()
        out = []
        for i in range(len(query)):
            s = float(res.scores[i])
            out.append(InspectResult(
                score=s, decision=s > self.threshold, threshold=self.threshold, timings_ms=dict(timings),
                anomaly_map=res.maps[i], query=query[i],
                normal=None if normals_at_size is None else normals_at_size[i],
            ))
        post = _ms(t0)
        total = _ms(t_all)
        for r in out:
            r.timings_ms["postprocess"] = post
            r.timings_ms["total"] = total
        return out

    def inspect(self, image: np.ndarray) -> InspectResult:
        return self.inspect_batch([image])[0]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
