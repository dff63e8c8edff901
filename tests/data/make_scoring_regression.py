"""Write ``tests/data/scoring_regression.npz``: fixed scoring inputs and the scores they must give.

Why a stored file: the scoring code changes shape over time (it was once written twice, in torch
and in numpy); the numbers it produces must not. The inputs are stored too (float32), so the
regression test never depends on a random generator's stream across numpy versions.

Regenerate only when a change of the scores is intended, and say so in the commit:

    .venv/bin/python tests/data/make_scoring_regression.py
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "scoring_regression.npz"
MAP_STRIDE = 4  # stored maps keep every 4th pixel each way (keeps the file small)

# case -> (profile, branches, image size, shots used, overrides of the profile's scoring fields)
CASES: dict[str, tuple[str, tuple[str, ...], int, int, dict]] = {
    # the lite default: pool branch, border rings 0.15, statistics branch 0.5, no global cosine
    "lite_k1": ("lite", ("pool",), 40, 1, {}),
    "lite_k3": ("lite", ("pool",), 40, 3, {}),
    # tiny/sd15 style: three branches, global weight 0.5
    "triplet_k1": ("tiny", ("personalized", "pool", "text"), 32, 1, {}),
    # ... with every optional piece on at once: generated pool + statistics + border rings
    "triplet_k2_stats_rings": ("tiny", ("personalized", "pool", "text"), 32, 2,
                               {"stats_weight": 0.25, "border_fraction": 0.25}),
}
LITE_GRID, LITE_DIM = 10, 6  # border_fraction 0.15 of 10 -> 2 rings + the interior
TRIPLET_GRID, TRIPLET_DIM, TRIPLET_TEXT_DIM = 8, 6, 4
VIEWS = 6  # augmented views per shot (augment_views), the original first


def _grid(rng: np.random.Generator, b: int, h: int, d: int) -> np.ndarray:
    """Patch features with a brighter border (as a CNN's padded edge gives) and a shared mean."""
    x = rng.normal(size=(b, h, h, d)) + 0.5
    i, j = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    edge = np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, h - 1 - j)) == 0
    x[:, edge] += rng.normal(scale=1.5, size=(b, int(edge.sum()), d))
    return x.astype(np.float32)


def make_inputs() -> dict[str, np.ndarray]:
    """Every input array, under ``in/...`` keys."""
    rng = np.random.default_rng(20240611)
    out: dict[str, np.ndarray] = {}
    h, d = LITE_GRID, LITE_DIM
    for i in range(3):
        out[f"in/lite/shot{i}/patch"] = _grid(rng, VIEWS, h, d)
        out[f"in/lite/shot{i}/global"] = rng.normal(size=(VIEWS, 5)).astype(np.float32)
    q = _grid(rng, 4, h, d)
    q[1, 4:6, 4:6] += 3.0  # a small defect inside
    q[2] *= 1.6  # a whole-image change
    out["in/lite/query/patch"] = q
    out["in/lite/query/global"] = rng.normal(size=(4, 5)).astype(np.float32)

    h, d, g = TRIPLET_GRID, TRIPLET_DIM, TRIPLET_TEXT_DIM

    def feats(prefix: str, b: int, text: bool = True) -> None:
        out[f"{prefix}/patch"] = _grid(rng, b, h, d)
        out[f"{prefix}/global"] = rng.normal(size=(b, g)).astype(np.float32)
        if text:
            out[f"{prefix}/patch_text"] = rng.normal(size=(b, h, h, g)).astype(np.float32)

    for i in range(2):
        feats(f"in/triplet/shot{i}", VIEWS)
    feats("in/triplet/pool", 2)
    feats("in/triplet/shot_normal", 2, text=False)
    feats("in/triplet/query", 3)
    out["in/triplet/query/patch"][0, 3:5, 3:5] += 2.5
    feats("in/triplet/query_normal", 3, text=False)
    # two close prompt ensembles, so the text probabilities are not saturated at 0 or 1
    t = rng.normal(size=(1, g)) + rng.normal(scale=0.03, size=(2, g))
    out["in/triplet/text_features"] = (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)
    out["in/image"] = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return out


def _take(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray] | None:
    got = {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
    return got or None


def case_inputs(arrays: dict[str, np.ndarray], case: str) -> dict:
    """The arguments of one case: shot features, pool, normals, text features, queries."""
    profile, _, _, shots, _ = CASES[case]
    fam = "lite" if profile == "lite" else "triplet"
    shot_feats = [_take(arrays, f"in/{fam}/shot{i}") for i in range(shots)]
    with_pool = fam == "triplet" and shots > 1
    return {
        "shot_feats": shot_feats,
        "pool_feats": _take(arrays, f"in/{fam}/pool") if with_pool else None,
        "shot_normal": ({k: v[:shots] for k, v in _take(arrays, f"in/{fam}/shot_normal").items()}
                        if fam == "triplet" else None),
        "text_features": arrays.get(f"in/{fam}/text_features"),
        "query": _take(arrays, f"in/{fam}/query"),
        "query_normal": _take(arrays, f"in/{fam}/query_normal"),
    }


def case_config(case: str):
    """The case's scoring config: the profile's defaults, a small image, the case's overrides."""
    from o2n_edge.profiles import get_profile
    from o2n_edge.runtime.scoring import ScoringConfig

    profile, branches, size, _, overrides = CASES[case]
    config = ScoringConfig.from_profile(get_profile(profile), branches)
    # settings added to the profiles after the file was written take their off value: the file
    # pins the maths it was written with; the new settings have their own tests
    config = replace(config, search_dims=0, stats_region_floor=False, search_precision="float32")
    return replace(config, image_size=size, **overrides)


def compute(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every expected output, under ``<case>/...`` keys (plus ``augment_views``)."""
    from o2n_edge.reference import augment_views, build_reference
    from o2n_edge.runtime.scoring import score, scoring_manifest

    out: dict[str, np.ndarray] = {}
    for case in CASES:
        config = case_config(case)
        a = case_inputs(arrays, case)
        ref = build_reference(a["shot_feats"], config, a["text_features"], a["pool_feats"], a["shot_normal"])
        out[f"{case}/manifest"] = np.array(json.dumps(scoring_manifest(config, ref), sort_keys=True))
        if ref.stats_bank is not None:
            out[f"{case}/stats_bank"] = ref.stats_bank
            out[f"{case}/stats_scale"] = ref.stats_scale
        res = score(a["query"], ref, config, a["query_normal"])
        out[f"{case}/scores"] = np.asarray(res.scores, dtype=np.float64)
        out[f"{case}/maps"] = np.asarray(res.maps, dtype=np.float32)[:, ::MAP_STRIDE, ::MAP_STRIDE]
        for b in config.branches:
            out[f"{case}/branch_map/{b}"] = np.asarray(res.branch_maps[b], dtype=np.float32)
            out[f"{case}/global/{b}"] = np.asarray(res.global_scores[b], dtype=np.float64)
        if res.stats is not None:
            out[f"{case}/stats"] = np.asarray(res.stats, dtype=np.float64)
    out["augment_views"] = np.stack(augment_views(arrays["in/image"]))
    return out


def main() -> None:
    arrays = make_inputs()
    np.savez_compressed(OUT, **arrays, **compute(arrays))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
