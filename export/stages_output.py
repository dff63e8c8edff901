"""Export stages that produce files: the ONNX graphs, the manifest, the bundle.

Why the manifest is built from ``o2n_edge.runtime.manifest``'s dataclasses: the runtime reads
the bundle through those same types, so a key the exporter writes is a field the runtime
declares (a misspelt key fails here, on the workstation, not on the device).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from o2n_edge.runtime.bundle_writer import json_default
from o2n_edge.export.export_state import ExportState, say
from o2n_edge.runtime.manifest import (
    BundleManifest,
    Decode,
    EncoderInfo,
    MemoryBankInfo,
    ModelEntry,
    Section,
    Shots,
    Threshold,
    Transform,
)

S = TypeVar("S", bound=Section)


def export_graphs(state: ExportState) -> None:
    """Export (or reuse, when its input hash is current) every graph the branches need.

    The image encoder always; the VAE encoder/decoder and the UNet for the personalized branch.
    Real shot images are the trace inputs, so the export's own validation runs on real data.
    """
    import torch

    from o2n_edge.export.onnx_export import export_onnx
    from o2n_edge.export.specs import image_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

    encoder, shot_imgs, opts = state.encoder, state.shot_imgs, state.opts
    graphs: dict[str, tuple[Any, Any, tuple[Any, ...]]] = {}
    spec = image_encoder_spec(encoder)
    graphs["image_encoder"] = spec, spec.wrap(encoder), (encoder.preprocess(shot_imgs[:2]),)
    run = state.run
    if run is not None and state.personalized:
        from o2n_edge.diffusion.models import images_to_tensor, resize_images

        m = run.models
        unet = run.unet_for(True)
        lat = run.image_size // int(m.vae_scale)
        pe = run.prompt_embeds.detach().float()
        pixels = images_to_tensor(resize_images(np.stack(shot_imgs[:2]), run.image_size)).float()
        venc = vae_encoder_spec(m.vae, run.image_size)
        vdec = vae_decoder_spec(m.vae, lat)
        uspec = unet_spec(unet, int(pe.shape[1]), int(pe.shape[2]), lat)
        enc_w = venc.wrap(m.vae)
        with torch.no_grad():
            latents = enc_w(pixels)
        graphs["vae_encoder"] = venc, enc_w, (pixels,)
        graphs["vae_decoder"] = vdec, vdec.wrap(m.vae), (latents,)
        ts = torch.full((latents.shape[0],), 299.0)
        graphs["unet"] = uspec, uspec.wrap(unet), (latents, ts, pe.expand(latents.shape[0], -1, -1))
    for name, (gspec, wrapper, real_inputs) in graphs.items():
        say(opts.progress, f"exporting {name} ({opts.precision})")
        path = state.plan.work / f"{name}.onnx"
        rep = export_onnx(wrapper.float(), gspec, path, opts.precision, force=opts.force, real_inputs=real_inputs)
        state.models[name] = (rep, path)


def student_record(distill_info: dict[str, Any]) -> dict[str, Any]:
    """How the few-step UNet was made (LCM-LoRA merge or distillation), for the manifest."""
    keys = ("method", "steps", "lcm_lora", "lcm_lora_scale", "personal_lora_scale", "num_inference_steps")
    return {k: distill_info[k] for k in keys if k in distill_info}


def _section(cls: type[S], data: Any, where: str) -> S:
    """A section from a producer's plain dict, JSON-normalized first (numpy scalars, tuples)."""
    return cls.from_mapping(json.loads(json.dumps(data, default=json_default, allow_nan=False)), where)


def build_manifest(state: ExportState) -> BundleManifest:
    """Everything the runtime needs besides the arrays: encoder facts, scoring constants, threshold, graphs.

    ``schema_version``, ``files``, ``versions`` and the digest are added by ``BundleWriter``.
    """
    from o2n_edge.runtime.scoring import scoring_manifest

    opts, config, reference = state.opts, state.plan.config, state.require_reference()
    bank = reference.memory_bank
    manifest = BundleManifest(
        profile=state.plan.profile.name,
        category=state.dataset.category,
        dataset=state.dataset.name,
        image_size=state.size,
        decode=Decode(jpeg_draft=state.draft),
        precision=opts.precision,
        shots=Shots(images=[p.name for p in state.shot_paths], seed=opts.seed, k=opts.shots),
        encoder=_section(EncoderInfo, {**state.encoder.describe(), "brightness_range": (
            None if state.brightness_range is None else list(state.brightness_range))}, "encoder"),
        scoring=scoring_manifest(config, reference),
        fusion={"weights": dict(config.weights), "norm": {k: list(v) for k, v in reference.norm.items()},
                "selection": {"method": "profile default (the paper's weights)"}},
        memory_bank=MemoryBankInfo(rows=int(bank.shape[0]), dim=int(bank.shape[1]), coreset=state.coreset,
                                   pool_size=0 if state.pool_imgs is None else int(len(state.pool_imgs))),
        threshold=Threshold(value=state.threshold, method="quantile of held-out good images' scores",
                            quantile=opts.threshold_quantile, n_images=len(state.calib_paths),
                            images=[p.name for p in state.calib_paths],
                            scores=None if state.calib_scores is None else [float(x) for x in state.calib_scores]),
        models={name: _section(ModelEntry, rep.manifest_entry(), f"models.{name}")
                for name, (rep, _) in state.models.items()},
    )
    if state.run is not None and state.personalized:
        _add_transform(state, manifest)
    return manifest


def _latent_shape(state: ExportState) -> list[int]:
    """(channels, side, side) of the transform's latents: the shape of the shipped noise."""
    assert state.run is not None
    m, side = state.run.models, state.run.image_size
    return [int(m.latent_channels), side // int(m.vae_scale), side // int(m.vae_scale)]


def _add_transform(state: ExportState, manifest: BundleManifest) -> None:
    """The one-to-normal transform's record: prompt, strength and steps, LCM tables, the student and VAE."""
    from o2n_edge.diffusion import transform_plan
    from o2n_edge.diffusion.taesd import vae_record
    from o2n_edge.diffusion.transform import lcm_scheduler
    from o2n_edge.export.scheduler_tables import lcm_tables

    run = state.run
    assert run is not None
    plan = transform_plan(run)
    manifest.diffusion_image_size = run.image_size
    manifest.prompt = run.prompt
    manifest.strength = plan["strength"]
    manifest.steps = plan["num_inference_steps"]
    manifest.steps_run = plan["steps_run"]
    manifest.scheduler = lcm_tables(lcm_scheduler(run))
    manifest.transform = Transform(strength=plan["strength"], steps=plan["num_inference_steps"],
                                   steps_run=plan["steps_run"], timesteps=[int(x) for x in plan["timesteps"]],
                                   strength_mode="lcm", seed=state.opts.seed)
    manifest.diffusion = {"kind": run.spec.kind, "latent_shape": _latent_shape(state),
                          "distill": run.distill_info.get("distances", {}),
                          "student": student_record(run.distill_info), "vae": vae_record(run.models.vae)}


def _transform_noise(state: ExportState, steps_run: int) -> np.ndarray:
    """The transform's fixed noise (init + one per step), so the runtime's transform is deterministic."""
    from o2n_edge.diffusion import transform_noise

    noise = transform_noise(tuple(_latent_shape(state)), steps_run - 1, state.opts.seed)
    return np.stack([noise["init"].numpy(), *[n.numpy() for n in noise["steps"]]]).astype(np.float32)


def write_bundle(state: ExportState) -> None:
    """Stage the graphs, the arrays and the manifest, and rename the bundle in (atomic, hashed).

    Only the arrays the branches use are written; ``state.manifest`` is the manifest as written.
    """
    from o2n_edge.runtime.bundle_writer import BundleWriter

    reference, config = state.require_reference(), state.plan.config
    manifest = build_manifest(state)
    noise = _transform_noise(state, int(manifest.steps_run or 0)) if state.personalized else None
    with BundleWriter(state.plan.out, force=state.opts.force) as w:
        for name, (_, path) in state.models.items():
            w.add_file(f"{name}.onnx", path)
        w.add_array("memory_bank", reference.memory_bank.astype(np.float32))
        w.add_array("global_bank", reference.global_bank.astype(np.float32))
        if reference.text_features is not None:
            w.add_array("text_features", reference.text_features.astype(np.float32))
        if config.stats_weight > 0:
            w.add_array("stats_bank", reference.stats_bank.astype(np.float32))
            w.add_array("stats_scale", reference.stats_scale.astype(np.float32))
        if state.run is not None and noise is not None:
            w.add_array("prompt_embeds", state.run.prompt_embeds.detach().float().cpu().numpy())
            w.add_array("transform_noise", noise)
        state.manifest = w.write_manifest(manifest.to_dict())
