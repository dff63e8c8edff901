"""The lite diffusion (TAEF2 latents + local denoiser): bounded receptive field, training only at
t <= strength, the transform's low-frequency keep (torch reference == numpy runtime), the pool,
and the denoiser's ONNX export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from o2n_edge.data import load_image  # noqa: E402
from o2n_edge.diffusion import generate_pool, load_run, one_to_normal  # noqa: E402
from o2n_edge.diffusion.lite import LocalDenoiser, keep_low_frequencies, max_timestep  # noqa: E402
from o2n_edge.profiles import PROFILES  # noqa: E402
from o2n_edge.runtime import latent_ops  # noqa: E402

LITE = PROFILES["lite"].diffusion


@pytest.fixture(scope="module")
def lite_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from o2n_edge.diffusion.distill import distill
    from o2n_edge.diffusion.personalize import personalize

    torch.set_num_threads(1)
    files = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))[:2]
    shots = [load_image(p, LITE.image_size) for p in files]
    out = tmp_path_factory.mktemp("lite") / "run"
    personalize(shots, "hazelnut", LITE, out, steps=12, seed=0, progress=False)
    distill(out, progress=False)
    return out


def test_profile_is_the_taef2_latent_space() -> None:
    assert LITE.kind == "lite" and LITE.image_size == 128 and LITE.distill_steps == 0
    assert max_timestep(LITE) == 300  # trained only where the transform works


def test_receptive_field_is_bounded() -> None:
    torch.manual_seed(0)
    net = LocalDenoiser(in_channels=32).eval()
    for p in net.parameters():  # the zero-initialized convs would hide the field
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 32, 24, 24)
    cond = torch.randn(1, 4, 32)
    y = x.clone()
    y[..., 12, 12] += 5.0
    with torch.no_grad():
        d = (net(y, torch.tensor([100]), cond).sample - net(x, torch.tensor([100]), cond).sample).abs().amax(dim=(0, 1))
    r = net.receptive_field // 2
    changed = torch.nonzero(d > 0)  # outside the field the output is bit-identical
    assert len(changed) > 1
    assert int((changed - 12).abs().max()) == r  # nothing moves beyond the receptive field


def test_run_trains_below_strength_and_transforms(lite_run: Path, shared_data: Path) -> None:
    import json

    info = json.loads((lite_run / "run.json").read_text())
    assert info["kind"] == "lite" and info["steps"] == 12
    assert not (lite_run / "vae").exists()  # TAEF2 ships in the package, not in the run
    run = load_run(lite_run, device="cpu")
    assert run.student is not None and run.distill_info["steps"] == 0
    queries = np.stack([load_image(p, 256) for p in sorted(
        (shared_data / "hazelnut_toy" / "hazelnut" / "test" / "colour").glob("*.jpg"))[:2]])
    res = one_to_normal(run, queries, seed=3)
    assert res.normals.shape == (2, 128, 128, 3) and res.steps_run == 1 and res.timesteps == [299]
    assert np.array_equal(res.normals, one_to_normal(run, queries, seed=3).normals)
    pool = generate_pool(run, 3, seed=0, progress=False)
    assert pool.shape == (3, 128, 128, 3)
    assert np.array_equal(pool[:2], generate_pool(run, 2, seed=0, progress=False))  # image i = (seed, i)
    with pytest.raises(ValueError, match="strength"):
        generate_pool(run, 1, init="noise", progress=False)


def test_keep_low_frequencies_runtime_matches_reference() -> None:
    rng = np.random.default_rng(0)
    den = rng.normal(size=(2, 32, 16, 16)).astype(np.float32)
    src = rng.normal(size=(2, 32, 16, 16)).astype(np.float32) + 3.0
    ref = keep_low_frequencies(torch.from_numpy(den), torch.from_numpy(src), 2.0).numpy()
    got = latent_ops.keep_low_frequencies(den, src, 2.0)
    assert np.abs(ref - got).max() < 1e-5
    # the low frequencies (here: the mean) come from the source, the detail from the denoiser
    assert abs(float(got.mean()) - float(src.mean())) < 0.05
    g = latent_ops.lowpass_matrix(16, 2.0)
    assert np.allclose(g.sum(axis=1), 1.0, atol=1e-6)
    assert latent_ops.keep_low_frequencies(den, src, 0.0) is den


def test_denoiser_exports_to_onnx(lite_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from o2n_edge.export.onnx_export import export_onnx
    from o2n_edge.export.specs import unet_spec

    run = load_run(lite_run, device="cpu")
    unet = run.unet_for(True)
    pe = run.prompt_embeds
    spec = unet_spec(unet, int(pe.shape[1]), int(pe.shape[2]), 16)
    assert spec.extra["in_channels"] == 32
    lat = torch.randn(2, 32, 16, 16)
    rep = export_onnx(spec.wrap(unet).float(), spec, tmp_path / "unet.onnx", "fp32",
                      real_inputs=(lat, torch.full((2,), 299.0), pe.expand(2, -1, -1)))
    assert set(rep.inputs) == {"sample", "timestep", "encoder_hidden_states"}
    assert all(v < spec.tolerance["fp32"] for v in rep.validation.values())


def test_spec_round_trips_keep_low() -> None:
    from o2n_edge.diffusion.run_dir import spec_from_dict, spec_to_dict

    spec = replace(LITE, keep_low_sigma=1.5)
    assert spec_from_dict(spec_to_dict(spec)).keep_low_sigma == 1.5
    old = spec_to_dict(LITE)
    old.pop("keep_low_sigma")
    assert spec_from_dict(old).keep_low_sigma == 0.0  # runs written before the field
