"""Fusion weights chosen on the shots only: leave-one-shot-out against synthetic scratches.

Why: the paper's weights (personalized 1.0, pool 1.0, text 0.5) were tuned for SD-1.5 + CLIP;
the lite profile's branches have other scales and other strengths, and the test images must
never choose them. With k >= 2 shots each shot is held out in turn: the pool branch's reference
is built from the others, and the held-out shot (a good image) is compared with copies of it
carrying synthetic line-like defects (thin strokes filled with a shifted, re-lit copy of the
image, the kind of scratch a line produces). The personalized weight whose fused image score
separates them best (AUROC over every fold; ties go to the smaller weight, i.e. to the memory
bank) is written into the bundle. With one shot there is nothing to hold out: the profile's
weights stay, and the manifest says so.

Known limit, said plainly: the denoiser is trained on every shot, the held-out one included
(retraining k times does not fit the CPU budget), so the held-out shot's normal version is a
seen image and this selection is optimistic about the personalized branch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np

CANDIDATES = (0.25, 0.5, 1.0, 2.0)
SCRATCHES_PER_SHOT = 4
SCRATCH_WIDTH = (2, 6)  # pixels at the scoring size
SCRATCH_LENGTH = (0.15, 0.4)  # fraction of the image side


def synthetic_scratches(image: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` copies of a uint8 (S,S,3) image, each with one line-like synthetic defect."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    s = image.shape[0]
    out = []
    for _ in range(n):
        mask = Image.new("L", (s, s), 0)
        cx, cy = rng.uniform(0.25, 0.75, size=2) * s
        length = rng.uniform(*SCRATCH_LENGTH) * s
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        ImageDraw.Draw(mask).line([(cx - dx, cy - dy), (cx + dx, cy + dy)],
                                  fill=255, width=int(rng.integers(*SCRATCH_WIDTH, endpoint=True)))
        m = (np.asarray(mask) > 0)[..., None]
        shift = rng.integers(s // 8, s // 3, size=2) * rng.choice([-1, 1], size=2)
        fill = np.roll(image, tuple(int(v) for v in shift), axis=(0, 1)).astype(np.float32)
        fill = np.clip(fill * rng.uniform(0.5, 1.5), 0, 255)
        out.append(np.where(m, fill, image).astype(np.uint8))
    return np.stack(out)


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """P(bad score > good score), ties counted half (the Mann-Whitney AUROC)."""
    g, b = np.asarray(good)[:, None], np.asarray(bad)[None, :]
    return float(((b > g).sum() + 0.5 * (b == g).sum()) / (g.size * b.size))


def choose_weights_loo(
    shot_images: list[np.ndarray],
    encode: Callable[[np.ndarray], dict[str, np.ndarray]],
    normal_of: Callable[[np.ndarray], np.ndarray],
    config: Any,
    views: Callable[[np.ndarray], list[np.ndarray]],
    seed: int = 0,
    candidates: tuple[float, ...] = CANDIDATES,
) -> dict[str, Any]:
    """Leave-one-shot-out choice of the personalized branch's weight (pool stays at its weight).

    ``encode``: uint8 (B,S,S,3) -> encoder outputs; ``normal_of``: the same images -> their
    normal versions at the scoring size; ``views``: the augmented views the memory bank holds
    (``scoring.augment_views``). Returns ``{"weights", "method", "auroc", ...}`` for the manifest.
    """
    from o2n_edge.scoring import build_reference, score

    assert "personalized" in config.branches, "only the personalized branch's weight is chosen"
    default = dict(config.weights)
    if len(shot_images) < 2:
        return {"weights": default, "method": "profile default (one shot: nothing to hold out)"}
    shots = np.stack(shot_images)
    shot_feats = [encode(np.stack(views(im))) for im in shot_images]
    shot_normals = encode(normal_of(shots))
    per_w: dict[float, tuple[list[float], list[float]]] = {w: ([], []) for w in candidates}
    for i in range(len(shot_images)):
        keep = [j for j in range(len(shot_images)) if j != i]
        scratched = synthetic_scratches(shot_images[i], SCRATCHES_PER_SHOT, seed * 1009 + i)
        queries = np.concatenate([shots[i:i + 1], scratched])
        qf = encode(queries)
        nf = encode(normal_of(queries))
        ref_normals = {k: v[keep] for k, v in shot_normals.items()}
        for w in candidates:
            cfg = replace(config, weights={**default, "personalized": float(w)})
            ref = build_reference([shot_feats[j] for j in keep], cfg, None, None, ref_normals)
            s = score(qf, ref, cfg, nf).scores
            per_w[w][0].append(float(s[0]))
            per_w[w][1].extend(float(x) for x in s[1:])
    aurocs = {w: _auroc(np.array(g), np.array(b)) for w, (g, b) in per_w.items()}
    best = max(candidates, key=lambda w: (round(aurocs[w], 6), -w))
    return {
        "weights": {**default, "personalized": float(best)},
        "method": "leave-one-shot-out, synthetic line-like defects on the held-out shot",
        "auroc": {str(w): a for w, a in aurocs.items()},
        "candidates": list(candidates),
        "synthetic_per_shot": SCRATCHES_PER_SHOT,
        "note": "the denoiser saw every shot; the held-out shot's normal version is optimistic",
    }
