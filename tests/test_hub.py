"""Hub ids for the sd15 weights, resolved offline from a hub cache the test builds from seeded tiny models.

``HF_HOME`` points into tmp and ``HF_HUB_OFFLINE=1``; sockets are blocked, so a test that touched
the network would fail rather than pass slowly.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch  # noqa: E402

from o2n_edge import hub  # noqa: E402

SD15_ID = "o2n-test/sd15-tiny"
LCM_ID = "o2n-test/lcm-lora-tiny"
CLIP_ID = "o2n-test/vit-tiny-openclip"
TAESD_ID = "o2n-test/taesd-tiny"
# AutoencoderTiny at the tiny checkpoint's latent space (4 channels at 1/2): TAESD's classes, tiny sizes
TINY_TAESD = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                  num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
VIT_NAME = "ViT-T-8-o2nhub"
VIT_TAG = "o2ntest_e1"
VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under tmp, offline, with every socket connection refused."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError(f"network touched: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return home / "hub"


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny sd15 checkpoint and an LCM-LoRA in the published (kohya-style) key format."""
    import diffusers

    from sd15_fixtures import make_tiny_sd15_checkpoint, write_kohya_lora

    root = tmp_path_factory.mktemp("sources")
    ckpt = make_tiny_sd15_checkpoint(root / "sd15")
    unet = diffusers.UNet2DConditionModel.from_pretrained(ckpt / "unet")
    lora = write_kohya_lora(unet, root / "lcm" / "pytorch_lora_weights.safetensors", rank=4, scale=0.05)
    torch.manual_seed(0)
    diffusers.AutoencoderTiny(**TINY_TAESD).save_pretrained(root / "taesd")
    return {"sd15": ckpt, "lcm": lora.parent, "taesd": root / "taesd"}


def test_sd15_and_lcm_lora_hub_ids_resolve_offline(offline: Path, tiny_sources: dict[str, Path]) -> None:
    snap = hub.seed_hub_cache(SD15_ID, tiny_sources["sd15"])
    hub.seed_hub_cache(LCM_ID, tiny_sources["lcm"])
    assert snap.is_relative_to(offline / "models--o2n-test--sd15-tiny" / "snapshots")
    assert hub.resolve_sd15(SD15_ID) == snap
    assert hub.resolve_lora(LCM_ID).name == hub.LORA_WEIGHT_NAME
    # a local path always wins over the hub
    assert hub.resolve_sd15(str(tiny_sources["sd15"])) == tiny_sources["sd15"]


def test_missing_hub_files_name_the_fetch_command(offline: Path, tiny_sources: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE=1.*fetch it with: hf download org/absent"):
        hub.resolve_sd15("org/absent")
    with pytest.raises(FileNotFoundError, match="hf download latent-consistency/lcm-lora-sdv1-5 --include 'pytorch_lora_weights.safetensors'"):
        hub.resolve_lora("latent-consistency/lcm-lora-sdv1-5")
    # half a snapshot (no UNet weights): named, with the include patterns that complete it
    snap = hub.seed_hub_cache(SD15_ID, tiny_sources["sd15"])
    (snap / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks unet/diffusion_pytorch_model.safetensors.*--include 'unet/"):
        hub.resolve_sd15(SD15_ID)
    from o2n_edge.diffusion.models import resolve_base_model
    from o2n_edge.profiles import PROFILES

    message = ""
    try:
        resolve_base_model(PROFILES["sd15"].diffusion.__class__(kind="sd15", image_size=32, base_model="org/absent"))
    except FileNotFoundError as exc:
        message = str(exc)
    assert message.count("\n") == 0 and "hf download org/absent" in message


def test_open_clip_tag_and_hf_hub_id_resolve_offline(offline: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip
    from open_clip import pretrained as oc_pretrained

    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import EncoderSpec

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{VIT_NAME}.json").write_text(json.dumps(VIT_CONFIG))
    open_clip.add_model_config(cfg_dir)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, VIT_NAME,
                        {VIT_TAG: oc_pretrained._pcfg(hf_hub=f"{CLIP_ID}/")})
    spec = EncoderSpec(kind="open_clip", image_size=64, model_name=VIT_NAME, seed=3)
    source = build_encoder(spec)
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(source.model.state_dict(), weights / "open_clip_pytorch_model.bin")
    (weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": VIT_CONFIG}))
    with pytest.raises(FileNotFoundError, match=f"hf download {CLIP_ID}"):
        build_encoder(EncoderSpec(kind="open_clip", image_size=64, model_name=VIT_NAME, checkpoint=VIT_TAG))
    hub.seed_hub_cache(CLIP_ID, weights)
    x = source.preprocess([np.full((64, 64, 3), 90, np.uint8)])
    with torch.inference_mode():
        ref = source(x)["global"]
        for ckpt in (VIT_TAG, f"hf-hub:{CLIP_ID}"):
            enc = build_encoder(EncoderSpec(kind="open_clip", image_size=64, model_name=VIT_NAME, checkpoint=ckpt, seed=9))
            torch.testing.assert_close(enc(x)["global"], ref, rtol=0, atol=0)


def test_export_with_hub_ids_merges_the_lcm_lora(offline: Path, tiny_sources: dict[str, Path], shared_data: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`o2n-edge export --profile sd15 --base-model <hub id> --lcm-lora <hub id>`: one command, LCM-LoRA merged."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from o2n_edge import profiles
    from o2n_edge.cli import app
    from o2n_edge.runtime.bundle import verify_bundle

    hub.seed_hub_cache(SD15_ID, tiny_sources["sd15"])
    hub.seed_hub_cache(LCM_ID, tiny_sources["lcm"])
    hub.seed_hub_cache(TAESD_ID, tiny_sources["taesd"])
    sd15 = profiles.PROFILES["sd15"]
    small = replace(sd15, encoder=replace(sd15.encoder, model_name="tiny", image_size=64),
                    diffusion=replace(sd15.diffusion, image_size=32, pool_size=1))
    monkeypatch.setitem(profiles.PROFILES, "sd15", small)
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, [
        "export", "--category", "hazelnut", "--data", str(shared_data / "hazelnut_toy"), "--profile", "sd15",
        "--shots", "1", "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--personalize-steps", "1",
        "--base-model", SD15_ID, "--lcm-lora", LCM_ID, "--lcm-lora-scale", "0.9", "--vae", TAESD_ID, "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    student = m["diffusion"]["student"]
    assert student["method"] == "lcm_lora_merge" and student["steps"] == 0
    assert student["lcm_lora"] == LCM_ID and student["lcm_lora_scale"] == 0.9
    vae = m["diffusion"]["vae"]
    assert vae["kind"] == "taesd" and vae["source"] == TAESD_ID and vae["class"] == "AutoencoderTiny"
    assert verify_bundle(out) == []
    assert "taesd" in CliRunner().invoke(app, ["inspect", str(out)]).output
    # the runtime ran the TAESD graphs (parity vs the torch reference is checked by export itself)
    assert "runtime vs offline scores" in res.output
    # the profile's default LCM-LoRA id, absent from this cache: one line naming the fetch command
    res = CliRunner().invoke(app, [
        "export", "--category", "hazelnut", "--data", str(shared_data / "hazelnut_toy"), "--profile", "sd15",
        "--shots", "1", "--out", str(tmp_path / "b2"), "--runs-dir", str(tmp_path / "runs2"),
        "--personalize-steps", "1", "--base-model", SD15_ID, "--no-progress"])
    assert res.exit_code == 2
    said = " ".join(res.output.split())
    assert "hf download latent-consistency/lcm-lora-sdv1-5" in said and "Traceback" not in said
    assert not (tmp_path / "runs2").exists()  # refused before personalizing, not after


def test_taesd_behaves_like_the_autoencoder_it_wraps(offline: Path, tiny_sources: dict[str, Path]) -> None:
    import diffusers

    from o2n_edge.diffusion.models import DiffusionModels, decode_latents, encode_latents
    from o2n_edge.diffusion.taesd import load_taesd, use_taesd

    hub.seed_hub_cache(TAESD_ID, tiny_sources["taesd"])
    vae = load_taesd(TAESD_ID)
    tiny = diffusers.AutoencoderTiny.from_pretrained(tiny_sources["taesd"]).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = tiny.encode(x).latents
        torch.testing.assert_close(encode_latents(vae, x, 1.0), lat, rtol=0, atol=0)
        torch.testing.assert_close(decode_latents(vae, lat, 1.0), tiny.decode(lat).sample, rtol=0, atol=0)
    models = DiffusionModels(unet=None, vae=None, prompt_dim=32, prompt_len=77, latent_channels=4, vae_scale=2,
                             scaling_factor=0.18215, scheduler_config={})
    record = use_taesd(models, TAESD_ID)
    assert record["kind"] == "taesd" and models.scaling_factor == 1.0 and models.vae.config.latent_channels == 4
    models.vae_scale = 8
    with pytest.raises(ValueError, match="not the same latent space"):
        use_taesd(models, str(tiny_sources["taesd"]))
