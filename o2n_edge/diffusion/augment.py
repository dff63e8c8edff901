"""Shot augmentation shared by personalization and distillation.

Why its own module: every stage that learns from the shots draws from the same augmentation, and
it must stay within what a fixed line camera plausibly sees (shift, small rotation and rescale,
mild colour jitter, flips) and never create something that looks like a defect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.models import images_to_tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Shot augmentation. Defaults stay within what a fixed line camera plausibly sees."""

    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # off by default: many parts have an up/down (e.g. screws, transistors)
    degrees: float = 10.0  # max |rotation|
    crop_scale: tuple[float, float] = (0.85, 1.0)  # area kept by the random crop (then rescaled)
    jitter: float = 0.05  # brightness/contrast/saturation jitter (hue: a fifth of it)


def _torch() -> Any:
    return require("torch", "augmentation")


def augment(shots: np.ndarray, n: int, seed: int, cfg: AugmentConfig = AugmentConfig()) -> Any:
    """``n`` augmented images drawn from ``shots`` (uint8 (k,S,S,3)) -> float (n,3,S,S) in [-1,1].

    One batched affine resample (rotation, crop/rescale, aspect, flips) with REFLECTION padding,
    so no black corners are learned as "normal", then colour jitter (brightness, contrast,
    saturation, a small hue rotation). Deterministic in ``seed``; the global RNG is untouched.
    Batched on purpose: per-image torchvision pipelines cost ~10x more on a CPU.
    """
    torch = _torch()
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(int(seed))

    def uniform(lo: float, hi: float) -> Any:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    src = images_to_tensor(shots)
    x = src[torch.randint(0, len(src), (n,), generator=gen)]
    angle = uniform(-cfg.degrees, cfg.degrees) * math.pi / 180.0
    area = uniform(*cfg.crop_scale)
    log_r = uniform(math.log(0.92), math.log(1.08))
    zx, zy = (area * torch.exp(log_r)).sqrt().clamp(max=1.0), (area / torch.exp(log_r)).sqrt().clamp(max=1.0)
    tx, ty = uniform(-1, 1) * (1 - zx), uniform(-1, 1) * (1 - zy)
    fx = torch.where(torch.rand(n, generator=gen) < cfg.hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < cfg.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([zx * cos * fx, -zy * sin * fy, tx], dim=1),
        torch.stack([zx * sin * fx, zy * cos * fy, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.jitter > 0:
        j = cfg.jitter
        x = (x + 1) / 2
        x = x * uniform(1 - j, 1 + j).view(-1, 1, 1, 1)  # brightness
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        m = gray.mean(dim=(2, 3), keepdim=True)
        x = (x - m) * uniform(1 - j, 1 + j).view(-1, 1, 1, 1) + m  # contrast
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = (x - gray) * uniform(1 - j, 1 + j).view(-1, 1, 1, 1) + gray  # saturation
        x = _hue_rotate(x, uniform(-j / 5, j / 5) * 2 * math.pi)
        x = x.clamp(0, 1) * 2 - 1
    return x


def _random_crop(x: Any, size: int, gen: Any) -> Any:
    """An independent random ``size`` x ``size`` window per image (cheap, diverse VAE batches)."""
    torch = _torch()
    h, w = x.shape[-2:]
    if size >= min(h, w):
        return x
    ij = torch.cat([torch.randint(0, h - size + 1, (len(x), 1), generator=gen),
                    torch.randint(0, w - size + 1, (len(x), 1), generator=gen)], dim=1)
    return torch.stack([x[b, :, i:i + size, j:j + size] for b, (i, j) in enumerate(ij.tolist())])


def _hue_rotate(x: Any, angle: Any) -> Any:
    """Rotate hue by ``angle`` radians (per image) in YIQ space."""
    torch = _torch()
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq)
