"""ONNX export of every submodel kind (tiny models of the production classes), fp32 and fp16:
validation at a batch other than the traced one, failure past the tolerance, idempotency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from o2n_edge.runtime.bundle_writer import BundleWriter  # noqa: E402
from o2n_edge.export.onnx_export import export_onnx, sidecar_path  # noqa: E402
from o2n_edge.export.specs import (  # noqa: E402
    ExportSpec,
    image_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from o2n_edge.export.validate import ExportValidationError, validate  # noqa: E402
from o2n_edge.runtime.bundle import ORT_DISABLED_OPTIMIZERS, load_bundle  # noqa: E402

IMAGE = 32
LATENT = 8
PROMPT_LEN, PROMPT_DIM = 4, 32
ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = ROOT.parent / "shared" / "data" / "hazelnut_toy"


class TinyEncoder(torch.nn.Module):
    """Stand-in FeatureEncoder: same contract (dict of patch/global/patch_text), with the parts
    that trap exporters (nn.MultiheadAttention like open_clip, LayerNorm, a flatten/unflatten)."""

    output_names = ("patch", "global", "patch_text")
    image_size = IMAGE

    def __init__(self, dim: int = 16, gdim: int = 8, patch: int = 8) -> None:
        super().__init__()
        self.grid = IMAGE // patch
        self.embed = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = torch.nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.1)
        self.ln = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.proj = torch.nn.Linear(dim, gdim)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(pixels).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        b = x.shape[0]
        patch = x.unflatten(1, (self.grid, self.grid))  # (B, h, w, D)
        text = self.proj(patch)
        return {"patch": patch, "global": self.proj(x.mean(1)).reshape(b, -1), "patch_text": text}


class BakedBatch(torch.nn.Module):
    """Traces its batch size into the graph (int()): only a different-batch check catches it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = int(x.shape[0])
        return self.lin(x).reshape(b, -1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CI box: one torch thread is several times faster than many."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=PROMPT_DIM,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=IMAGE, scaling_factor=0.18215,
    ).eval()


@pytest.fixture(scope="module")
def encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


@pytest.fixture(scope="module")
def real_pixels() -> torch.Tensor:
    """Two real images in [-1, 1] at IMAGE (shared data when present, else a synthetic scene)."""
    from PIL import Image

    paths = sorted(REAL_IMAGES.glob("hazelnut/train/good/*.jpg"))[:1]
    paths += sorted(REAL_IMAGES.glob("hazelnut/test/colour/*.jpg"))[:1]  # with a defect
    if len(paths) == 2:
        arrs = [np.asarray(Image.open(p).convert("RGB").resize((IMAGE, IMAGE), Image.BICUBIC)) for p in paths]
    else:
        yy, xx = np.mgrid[0:IMAGE, 0:IMAGE]
        base = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1).clip(0, 255).astype(np.uint8)
        arrs = [base, 255 - base]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.contiguous()


def _run(path: Path, feeds: dict[str, np.ndarray], precision: str = "fp32") -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS[precision]))
    return sess.run(None, feeds)


def _check_report(rep, spec: ExportSpec, precision: str) -> None:
    assert not rep.skipped and Path(rep.path).is_file()
    assert set(rep.validation) == set(spec.output_names)
    assert all(np.isfinite(v) and v <= spec.tolerance[precision] * 10 for v in rep.validation.values())
    for name in spec.input_names:
        assert rep.inputs[name]["shape"][0] == "batch", rep.inputs
        assert rep.inputs[name]["dtype"] in ("float32", "int64")  # fp32 I/O even for fp16 graphs
    for name in spec.output_names:
        assert rep.outputs[name]["dtype"] == "float32"
    (prof,) = rep.trt_profiles
    assert prof[spec.input_names[0]]["max"][0] == spec.batch_range[2]
    assert sidecar_path(rep.path).is_file()
    assert not [p for p in Path(rep.path).parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_unet(unet, tmp_path: Path, precision: str) -> None:
    spec = unet_spec(unet, PROMPT_LEN, PROMPT_DIM, LATENT)
    assert (spec.trace_batch, spec.size) not in spec.validation_shapes
    wrapper = spec.wrap(unet)
    rep = export_onnx(wrapper, spec, tmp_path / "unet.onnx", precision)
    _check_report(rep, spec, precision)
    if precision == "fp16":
        assert rep.fp16["fp32_nodes"] > 0 and rep.fp16["blocked_nodes"] > 0  # timestep path
        # fp16 graph vs torch at a new batch with extreme timesteps: finite and close
        xs = spec.make_inputs(3, seed=7)
        xs = (xs[0], torch.tensor([0.0, 500.0, 999.0]), xs[2])
        got = _run(Path(rep.path), {n: x.numpy() for n, x in zip(spec.input_names, xs)}, precision)[0]
        with torch.no_grad():
            ref = wrapper(*xs).numpy()
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() < spec.tolerance["fp16"]


def test_unet_lcm_cond_int64_timestep(tmp_path: Path) -> None:
    """LCM-distilled UNets take a guidance embedding (timestep_cond); int64 timesteps work too."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=PROMPT_DIM,
        attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=8,
    ).eval()
    spec = unet_spec(unet, PROMPT_LEN, PROMPT_DIM, LATENT, timestep_dtype=torch.int64)
    assert spec.input_names[-1] == "timestep_cond"
    rep = export_onnx(spec.wrap(unet), spec, tmp_path / "unet.onnx", "fp32", simplify=False)
    _check_report(rep, spec, "fp32")
    assert rep.inputs["timestep"]["dtype"] == "int64"
    assert rep.inputs["timestep_cond"]["shape"] == ["batch", 8]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vae(vae, real_pixels, tmp_path: Path, precision: str) -> None:
    enc_spec = vae_encoder_spec(vae, IMAGE)
    dec_spec = vae_decoder_spec(vae, LATENT)
    enc, dec = enc_spec.wrap(vae), dec_spec.wrap(vae)
    with torch.no_grad():
        latents = enc(real_pixels)
        # the encoder returns the scaled posterior mean: deterministic
        assert torch.equal(latents, enc(real_pixels))
        mean = vae.encode(real_pixels).latent_dist.mean
    assert torch.allclose(latents, mean * 0.18215)
    rep_e = export_onnx(enc, enc_spec, tmp_path / "vae_encoder.onnx", precision, real_inputs=(real_pixels,))
    rep_d = export_onnx(dec, dec_spec, tmp_path / "vae_decoder.onnx", precision, real_inputs=[(latents,)])
    _check_report(rep_e, enc_spec, precision)
    _check_report(rep_d, dec_spec, precision)
    assert rep_d.outputs["pixels"]["shape"] == ["batch", 3, IMAGE, IMAGE]
    # round trip through both graphs on the real images stays finite and close to torch
    lat = _run(Path(rep_e.path), {"pixels": real_pixels.numpy()}, precision)[0]
    pix = _run(Path(rep_d.path), {"latent": lat}, precision)[0]
    with torch.no_grad():
        ref = dec(latents).numpy()
    assert np.isfinite(pix).all()
    assert np.abs(pix - ref).max() < enc_spec.tolerance[precision] * 2


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_image_encoder(encoder, tmp_path: Path, precision: str) -> None:
    spec = image_encoder_spec(encoder)
    assert spec.output_names == ("patch", "global", "patch_text")
    rep = export_onnx(spec.wrap(encoder), spec, tmp_path / "image_encoder.onnx", precision)
    _check_report(rep, spec, precision)
    assert rep.outputs["patch"]["shape"] == ["batch", 4, 4, 16]
    assert rep.outputs["global"]["shape"] == ["batch", 8]


def test_text_encoder(tmp_path: Path) -> None:
    """Optional spec (bundles store prompt embeddings): a tiny CLIPTextModel exports."""
    transformers = pytest.importorskip("transformers")
    from o2n_edge.export.specs import text_encoder_spec

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=998, eos_token_id=999,
    )
    model = transformers.CLIPTextModel(cfg).eval()
    spec = text_encoder_spec(model, seq_len=16)
    rep = export_onnx(spec.wrap(model), spec, tmp_path / "text_encoder.onnx", "fp32")
    _check_report(rep, spec, "fp32")
    assert rep.outputs["last_hidden_state"]["shape"] == ["batch", 16, 32]


def test_wrong_tolerance_raises_and_writes_nothing(encoder, tmp_path: Path) -> None:
    spec = image_encoder_spec(encoder).with_tolerance(fp16=0.0)
    out = tmp_path / "image_encoder.onnx"
    with pytest.raises(ExportValidationError) as err:
        export_onnx(spec.wrap(encoder), spec, out, "fp16")
    assert "max abs error" in str(err.value) and err.value.errors["patch"] > 0
    assert list(tmp_path.iterdir()) == []  # no graph, no sidecar, no temp dir


class Overflow(torch.nn.Module):
    """Finite in fp32, past fp16's 65504 in between: the fp16 graph yields Inf."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x) * 100.0
        return (y * y) / 1e6  # y*y ~ 1e6 > 65504


def test_fp16_overflowing_layers_stay_fp32(tmp_path: Path) -> None:
    """onnxruntime-CPU runs many fp16 ops in fp32 and would hide this overflow; the range
    audit on the fp32 graph finds the layers and keeps them fp32."""
    spec = ExportSpec(
        name="overflow", input_names=("x",), output_names=("y",),
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        sample_inputs=lambda b, s: (torch.randn(b, s) * 10,), size=4, wrap=lambda m: m,
    ).with_tolerance(fp16=1e-2)
    torch.manual_seed(0)
    model = Overflow()
    rep = export_onnx(model, spec, tmp_path / "overflow.onnx", "fp16", simplify=False)
    assert rep.fp16["audit_peak"] > 65504
    assert len(rep.fp16["overflow_nodes"]) >= 2  # the Mul that overflows and its consumer
    big = spec.make_inputs(2, seed=3)[0] * 2  # larger than anything the audit saw
    got = _run(Path(rep.path), {"x": big.numpy()}, "fp16")[0]
    assert np.isfinite(got).all()


class LogOf(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_nonfinite_onnx_output_is_an_error(tmp_path: Path) -> None:
    spec = ExportSpec(
        name="nan", input_names=("x",), output_names=("y",),
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        sample_inputs=lambda b, s: (torch.randn(b, s),), size=4, wrap=lambda m: m,
    ).with_tolerance(fp32=1e9)
    export_onnx(LogOf(), spec, tmp_path / "log.onnx", check=False)  # NaN for x < 0
    with pytest.raises(ExportValidationError, match="NaN/Inf"):
        validate(tmp_path / "log.onnx", torch.nn.Identity(), spec, "fp32")


def test_batch_frozen_by_tracing_is_caught(tmp_path: Path) -> None:
    spec = ExportSpec(
        name="baked", input_names=("x",), output_names=("y",),
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        sample_inputs=lambda b, s: (torch.randn(b, s),), size=4, wrap=lambda m: m,
    )
    with pytest.raises(ExportValidationError, match="shape"):
        export_onnx(BakedBatch(), spec, tmp_path / "baked.onnx")
    assert not (tmp_path / "baked.onnx").exists()


def test_idempotent(encoder, vae, tmp_path: Path) -> None:
    spec = image_encoder_spec(encoder)
    wrapper = spec.wrap(encoder)
    out = tmp_path / "image_encoder.onnx"
    first = export_onnx(wrapper, spec, out)
    assert not first.skipped
    mtime = out.stat().st_mtime_ns
    again = export_onnx(wrapper, spec, out)
    assert again.skipped and again.sha256 == first.sha256 and out.stat().st_mtime_ns == mtime
    assert again.validation == first.validation
    forced = export_onnx(wrapper, spec, out, force=True)
    assert not forced.skipped
    assert export_onnx(wrapper, spec, out, "fp16").skipped is False  # precision is an input
    assert export_onnx(wrapper, spec, out, "fp16").skipped is True
    # changed weights -> re-export with a different graph
    enc2 = TinyEncoder().eval()
    enc2.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        enc2.proj.bias.add_(0.5)
    changed = export_onnx(spec.wrap(enc2), spec, out)
    assert not changed.skipped and changed.sha256 != first.sha256
    # a tampered output is detected and rebuilt
    out.write_bytes(out.read_bytes()[:-1] + b"\0")
    assert not export_onnx(spec.wrap(enc2), spec, out).skipped
    side = json.loads(sidecar_path(out).read_text())
    assert side["input_hash"] == changed.input_hash and side["precision"] == "fp32"
    # a config change that does not touch the weights (the VAE's scaling_factor) re-exports
    dspec = vae_decoder_spec(vae, LATENT)
    dout = tmp_path / "vae_decoder.onnx"
    assert not export_onnx(dspec.wrap(vae), dspec, dout, simplify=False).skipped
    vae2 = AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.5}).eval()
    vae2.load_state_dict(vae.state_dict())
    assert not export_onnx(dspec.wrap(vae2), dspec, dout, simplify=False).skipped


def test_external_data_and_simplify_failure(encoder, tmp_path: Path, monkeypatch) -> None:
    """Large graphs go to <name>.onnx.data (forced here by a 0 threshold); a failing onnxslim
    is recorded and the unsimplified graph is kept; the bundle carries the data file."""
    import onnxslim

    def broken(*a, **k):
        raise RuntimeError("slim exploded")

    monkeypatch.setattr(onnxslim, "slim", broken)
    spec = image_encoder_spec(encoder)
    out = tmp_path / "work" / "image_encoder.onnx"
    rep = export_onnx(spec.wrap(encoder), spec, out, external_data_threshold=0)
    assert rep.external_data and rep.files == ["image_encoder.onnx", "image_encoder.onnx.data"]
    assert not rep.simplified and "slim exploded" in rep.simplify_error
    assert (out.parent / "image_encoder.onnx.data").is_file()
    errs = validate(out, spec.wrap(encoder), spec, "fp32")
    assert max(errs.values()) < 1e-4
    with BundleWriter(tmp_path / "bundle") as w:
        w.add_file("image_encoder.onnx", out)
        w.write_manifest({"models": {"image_encoder": rep.manifest_entry()}})
    b = load_bundle(tmp_path / "bundle")
    assert "image_encoder.onnx.data" in b.manifest["files"]
    sess = ort.InferenceSession(str(b.model_path("image_encoder")), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixels": np.zeros((2, 3, IMAGE, IMAGE), np.float32)})[1].shape == (2, 8)


def test_graphs_past_the_protobuf_limit_skip_onnxslim(encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxslim serializes the whole proto: past 2 GB it fails after minutes (the real-size dry run's
    UNet), so such graphs skip it up front and say why. Here the limit is lowered to the tiny graph."""
    from o2n_edge.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(onnx_export, "_simplify", lambda m: pytest.fail("onnxslim must not run"))
    spec = image_encoder_spec(encoder)
    rep = export_onnx(spec.wrap(encoder), spec, tmp_path / "image_encoder.onnx", "fp32", check=False)
    assert not rep.simplified and rep.simplify_error.startswith("skipped:")
