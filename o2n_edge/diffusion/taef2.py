"""TAEF2: the pretrained tiny autoencoder of the FLUX.2 latent space, the lite profile's latent space.

Why: the lite profile cannot learn an autoencoder from 1-4 shots (the old 64-px one returned a
blur), and no Stable Diffusion VAE is reachable on our machines. TAEF2 (madebyollin/taesd, MIT,
(c) 2023 Ollin Boer Bohan) is small (1.34 M parameters per half), pretrained on the open world,
and ships inside this package with its licence (``weights/taef2/``).

Written from the facts in ``../shared/weights/README.md``: plain state dicts whose keys are
``nn.Sequential`` indices; images in [0, 1]; latents raw (no scaling), 32 channels at 1/8 of the
image side. A ``Block(c)`` is conv3x3-ReLU-conv3x3-ReLU-conv3x3 plus the identity, then ReLU; the
three blocks at the latent resolution first add a residual branch
conv1x1(64->256) -> GroupNorm(4, 256) -> ReLU -> conv1x1(256->64).

:class:`TAEF2Autoencoder` gives the two halves the small part of ``diffusers.AutoencoderKL``'s
interface the rest of the code base drives (``encode(x).latent_dist.mean``, ``decode(z).sample``,
``config.scaling_factor``...), with pixels in [-1, 1] like every other VAE here, so personalize,
the transform, the pool and the ONNX export run one code path. The files are checked against
their sha256 before loading: a swapped or truncated weight file is a clear error, never a
silently different latent space.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from o2n_edge._lazy import require

torch = require("torch", "the TAEF2 autoencoder")
nn = torch.nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "taef2"
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
LICENSE_FILE = "LICENSE"
SHA256 = {
    ENCODER_FILE: "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    DECODER_FILE: "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
CHANNELS = 64
LATENT_CHANNELS = 32
DOWNSAMPLE = 8
# Latents are raw and have std ~0.67 on our images (weights README): the diffusion schedule wants
# unit variance, so the denoiser sees latents * 1.5 (SD's recipe: a fixed scaling factor).
SCALING_FACTOR = 1.5
DECODER_CLAMP = 3.0  # the decoder's first op: tanh(z / 3) * 3


def _conv(n_in: int, n_out: int, **kw: Any) -> Any:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv + identity, ReLU; optionally a GroupNorm residual branch first."""

    def __init__(self, c: int, with_branch: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.fuse = nn.ReLU()
        self.pool = None
        if with_branch:
            self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c),
                                      nn.ReLU(), nn.Conv2d(4 * c, c, 1, bias=False))

    def forward(self, x: Any) -> Any:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class Clamp(nn.Module):
    """Soft clamp of the latents to about [-3, 3] (the decoder's first layer, no weights)."""

    def forward(self, x: Any) -> Any:
        return torch.tanh(x / DECODER_CLAMP) * DECODER_CLAMP


def build_encoder() -> Any:
    """[0,1] images (B,3,H,W) -> raw latents (B,32,H/8,W/8); keys match ``taef2_encoder.pth``."""
    c = CHANNELS
    layers: list[Any] = [_conv(3, c), Block(c)]
    for stage in range(3):
        layers.append(_conv(c, c, stride=2, bias=False))
        layers += [Block(c, with_branch=stage == 2) for _ in range(3)]
    layers.append(_conv(c, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def build_decoder() -> Any:
    """Raw latents -> [0,1]-ish images (not clamped); keys match ``taef2_decoder.pth``."""
    c = CHANNELS
    layers: list[Any] = [Clamp(), _conv(LATENT_CHANNELS, c), nn.ReLU()]
    layers += [Block(c, with_branch=True) for _ in range(3)]
    for n_blocks in (3, 3, 1):
        layers += [nn.Upsample(scale_factor=2), _conv(c, c, bias=False)]
        layers += [Block(c) for _ in range(n_blocks)]
    layers.append(_conv(c, 3))
    return nn.Sequential(*layers)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_half(module: Any, path: Path, verify: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"TAEF2 weights {path} missing: reinstall o2n-edge (they ship in the package)")
    if verify:
        got = sha256_of(path)
        if got != SHA256[path.name]:
            raise ValueError(f"TAEF2 weights {path} have sha256 {got[:12]}..., expected "
                             f"{SHA256[path.name][:12]}...: the file is corrupt or not TAEF2")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return module.requires_grad_(False).eval()


@dataclass
class _Posterior:
    """What ``AutoencoderKL.encode(x).latent_dist`` offers, for a deterministic encoder."""

    mean: Any

    @property
    def std(self) -> Any:
        return torch.zeros_like(self.mean)

    def sample(self, generator: Any = None) -> Any:
        return self.mean

    def mode(self) -> Any:
        return self.mean

    def kl(self) -> Any:
        return torch.zeros(self.mean.shape[0], device=self.mean.device)


class TAEF2Autoencoder(nn.Module):
    """The two TAEF2 halves behind the ``AutoencoderKL`` calls this code base makes.

    Pixels in [-1, 1] in and out (mapped to TAEF2's [0, 1] inside), latents raw: the
    ``scaling_factor`` is applied by the callers exactly as for SD's VAE.
    """

    def __init__(self, encoder: Any, decoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = SimpleNamespace(
            scaling_factor=SCALING_FACTOR, shift_factor=None, latent_channels=LATENT_CHANNELS,
            block_out_channels=(CHANNELS,) * 4,  # four stages: 2**(4-1) = 8 = DOWNSAMPLE
            kind="taef2",
        )

    @property
    def dtype(self) -> Any:
        return next(self.parameters()).dtype

    @property
    def device(self) -> Any:
        return next(self.parameters()).device

    def encode(self, pixels: Any, return_dict: bool = True) -> Any:
        mean = self.encoder((pixels + 1.0) / 2.0)
        post = _Posterior(mean)
        return SimpleNamespace(latent_dist=post) if return_dict else (post,)

    def decode(self, z: Any, return_dict: bool = True) -> Any:
        x = self.decoder(z) * 2.0 - 1.0
        return SimpleNamespace(sample=x) if return_dict else (x,)

    def register_to_config(self, **_: Any) -> None:
        """The latent space is fixed: nothing to register (AutoencoderKL compatibility)."""


def load_taef2(weights_dir: Path | str | None = None, verify: bool = True) -> TAEF2Autoencoder:
    """The pretrained TAEF2, frozen, in eval mode; the weight files are sha256-checked."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    enc = _load_half(build_encoder(), d / ENCODER_FILE, verify)
    dec = _load_half(build_decoder(), d / DECODER_FILE, verify)
    return TAEF2Autoencoder(enc, dec)


def license_text() -> str:
    """The MIT licence that travels with the weights (shown by tests, shipped in the wheel)."""
    return (WEIGHTS_DIR / LICENSE_FILE).read_text()
