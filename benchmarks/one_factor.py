"""One factor at a time: what each part of the lite default does on every shared set.

Why it exists: the default must not lose to plain PatchCore on data it never saw, and a setting
chosen on one test split carries over only in part. So every difference between the default and
the baseline is changed alone, from the default, on every set, with the same shots, and the
table says per set what each one gains or costs. Test labels are used only to measure.

Settings (``--settings``; ``default`` = the lite default as it was before this study):

- ``default``: Lite0 448 px, stages 2+4, 3x3 aggregation, 6 views, 10% coreset, pool map
  standardized per border ring (15%), image score = top-1% mean of the smoothed map, global
  statistics branch at 0.5.
- ``res256`` / ``res224``: the encoder at 256 / 224 px; ``layers23``: stages 2+3;
  ``views8`` / ``views1``: all 8 rotations/flips / the shot only; ``whole``: no coreset;
  ``max`` / ``gridmax``: image score = max of the smoothed map / of the grid map; ``patch``:
  top-k mean over the area of one aggregated patch (3 x 3 cells of stride 8: 576 px, 0.29% at
  448 px, about the 1% of 224 px); ``rows4096`` / ``rows2048``: the bank's row budget;
  ``pca64`` / ``pca32``: the nearest row searched in that many principal axes; ``statsreg``: the
  statistics branch's scale floored by the spread between the shots' own quadrants;
  ``rings0``: one constant for the whole map; ``stats0``: no statistics branch;
  ``gain`` / ``band5``: brightness matching (``o2n_edge.data.photometric``): an image outside
  the drawn shots' brightness range (widened by 0 / 5%; ``band10``: 10%) brought back to its edge by one gain.
- ``baseline``: plain PatchCore (256 px, 8 views, no coreset, no standardization, grid max),
  the same maths as ``benchmarks.patchcore_baseline``.
- ``candidate``: the settings of ``--candidate`` (e.g. ``gain,max``) all at once.

Conditions: each set as shipped, and with ``--jitter`` each image (shots and test) multiplied
by a gain drawn per file from [0.65, 1.35]: good parts that vary in overall brightness, as on a
line whose lighting drifts. The gains are seeded by file name, so every setting sees the same.

Usage: python -m benchmarks.one_factor --set tire [--jitter] --shots 1,4 --seeds 0,1,2
       python -m benchmarks.one_factor --summarize
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_text
from benchmarks.scoring_sweep import SETS, Trunk, encode_trunk
from o2n_edge.data import load_dataset, load_mask, sample_shots
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.detection_metrics import image_ap, image_auroc, pixel_auroc, pixel_pro
from o2n_edge.profiles import get_profile
from o2n_edge.reference import build_reference
from o2n_edge.runtime.coreset import greedy_coreset
from o2n_edge.runtime.scoring import Reference, Scorer, ScoringConfig, upsample_and_smooth

NAME = "one_factor"
JITTER = (0.65, 1.35)
# The 8 rotations/flips: the default's 6 views first (reference.augment_views), then the two
# transposes that complete the group.
VIEWS = [lambda im: im, lambda im: im[:, ::-1], lambda im: im[::-1, :], lambda im: np.rot90(im, 1),
         lambda im: np.rot90(im, 2), lambda im: np.rot90(im, 3), lambda im: np.rot90(im[:, ::-1], 1),
         lambda im: np.rot90(im[:, ::-1], 3)]
FACTORS = ("default", "res256", "res224", "layers23", "views8", "views1", "whole", "max", "gridmax", "rings0",
           "stats0", "gain", "baseline")


@dataclass(frozen=True)
class Setting:
    """One point of the study: how the bank is built and how an image is scored."""

    size: int = 448
    layers: tuple[int, ...] = (2, 4)
    views: int = 6
    coreset: float | None = 0.1
    score: str = "top1"  # top1 | patch (top-k over one aggregated patch's area) | max | gridmax
    rings: float = 0.15
    stats: float = 0.5
    gain: float | None = None  # brightness matching: the shots' range widened by this fraction
    plain: bool = False  # the baseline: raw distances, no standardization
    max_rows: int = 8192  # the bank's row budget (Profile.bank_max_rows)
    search_dims: int = 0  # nearest-row search in this many principal axes (0 = all)
    region_floor: bool = False  # statistics branch scaled at least by the shots' region spread


    def bank_key(self) -> tuple:
        return (self.size, self.layers, self.views, self.coreset, self.gain, self.max_rows, self.search_dims)


BASE = Setting()
CHANGES: dict[str, dict[str, Any]] = {
    "default": {}, "res256": {"size": 256}, "res224": {"size": 224}, "layers23": {"layers": (2, 3)},
    "views8": {"views": 8}, "views1": {"views": 1}, "whole": {"coreset": None}, "max": {"score": "max"},
    "gridmax": {"score": "gridmax"}, "rings0": {"rings": 0.0}, "stats0": {"stats": 0.0}, "gain": {"gain": 0.0}, "band5": {"gain": 0.05}, "band10": {"gain": 0.1}, "statsreg": {"region_floor": True},
    "patch": {"score": "patch"}, "rows4096": {"max_rows": 4096}, "rows2048": {"max_rows": 2048},
    "pca64": {"search_dims": 64}, "pca32": {"search_dims": 32},
    "baseline": {"size": 256, "views": 8, "coreset": None, "score": "gridmax", "rings": 0.0, "stats": 0.0,
                 "plain": True},
}


def setting_of(name: str, candidate: str = "") -> Setting:
    if name == "candidate":
        change: dict[str, Any] = {}
        for part in candidate.split(","):
            change.update(CHANGES[part])
        return replace(BASE, **change)
    return replace(BASE, **CHANGES[name])


def jitter_gain(path: Path) -> float:
    """A gain in JITTER drawn from the file's name (stable across runs and settings)."""
    h = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return JITTER[0] + (JITTER[1] - JITTER[0]) * h


def load_rgb(path: Path, jitter: bool) -> np.ndarray:
    from PIL import Image

    im = np.asarray(Image.open(path).convert("RGB"))
    if jitter:
        im = np.clip(im.astype(np.float32) * jitter_gain(path), 0, 255).astype(np.uint8)
    return im


class Encodings:
    """Trunk features of the test set and of every shot view, per (size, brightness range), computed once."""

    def __init__(self, test: list[np.ndarray], shots: dict[Path, np.ndarray]) -> None:
        self.test_images, self.shot_images = test, shots
        self.paths = sorted(shots)
        self.cache: dict[tuple, tuple[Trunk, Trunk]] = {}

    def get(self, size: int, levels: tuple[float, float] | None) -> tuple[Trunk, Trunk, list[Path]]:
        if (size, levels) not in self.cache:
            spec = replace(get_profile("lite").encoder, image_size=size)
            t0 = time.time()
            shots = resize_uint8([self.shot_images[p] for p in self.paths], size)
            views = [np.ascontiguousarray(v(im)) for im in shots for v in VIEWS]
            self.cache[(size, levels)] = (encode_trunk(spec, list(resize_uint8(self.test_images, size)), levels),
                                          encode_trunk(spec, views, levels))
            print(f"  encoded {size} px, brightness range {levels} in {time.time() - t0:.0f} s", file=sys.stderr,
                  flush=True)
            if levels is not None:  # a range is one draw's: keep one at a time
                for key in [k for k in self.cache if k[1] is not None and k != (size, levels)]:
                    del self.cache[key]
        return (*self.cache[(size, levels)], self.paths)


def run_one(enc: Encodings, s: Setting, shot_paths: list[Path], labels: np.ndarray,
            masks: np.ndarray | None, seed: int, pixel_cache: dict) -> dict[str, Any]:
    """Image and pixel metrics of one setting on one shot draw (PRO with 200 thresholds: ~1e-3 of exact)."""
    t0 = time.time()
    from o2n_edge.data.photometric import shots_range

    levels = None
    if s.gain is not None:  # the drawn shots' range, measured at the encoder's size as the product does
        levels = shots_range(list(resize_uint8([enc.shot_images[p] for p in shot_paths], s.size)), s.gain)
    test_trunk, shot_trunk, paths = enc.get(s.size, levels)
    tf = test_trunk.compose(s.layers, 3)
    sf = shot_trunk.compose(s.layers, 3)
    shot_feats = []
    for p in shot_paths:
        rows = [paths.index(p) * len(VIEWS) + j for j in range(s.views)]
        shot_feats.append({k: v[rows] for k, v in sf.items()})
    config = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=s.size, global_weight=0.0,
                           topk_fraction={"top1": 0.01, "patch": (3 * 8 / s.size) ** 2}.get(s.score, 0.0),
                           stats_weight=s.stats, border_fraction=s.rings, smoothing_sigma=4.0,
                           search_dims=s.search_dims, stats_region_floor=s.region_floor)
    ref = build_reference(shot_feats, config)
    bank = ref.memory_bank
    if s.coreset is not None:
        bank = bank[greedy_coreset(bank, s.coreset, seed=seed, max_rows=s.max_rows)]
    if s.plain:
        ref = Reference(memory_bank=bank, global_bank=ref.global_bank)
    else:
        ref = replace(ref, memory_bank=bank)
    scorer = Scorer(config, ref)
    maps, globals_ = scorer.branch_outputs(tf)
    res = scorer.score_maps(maps, globals_, tf)
    scores = res.scores
    if s.score == "gridmax":
        fused, _ = scorer.fuse(maps, globals_)
        scores = fused.reshape(len(fused), -1).max(1)
        if res.stats is not None:
            c, sc = ref.norm_of("global_stats")
            scores = scores + s.stats * (res.stats - c) / sc
    out = {"image_auroc": image_auroc(labels, scores), "image_ap": image_ap(labels, scores)}
    if masks is not None:
        key = (s.bank_key(), s.rings, s.plain)  # settings that differ only in the image score share a map
        if key not in pixel_cache:
            pix = res.maps if not s.plain else upsample_and_smooth(maps["pool"], s.size, 4.0).astype(np.float32)
            pix = resize_maps(pix, masks.shape[-1])
            pixel_cache[key] = {"pixel_auroc": pixel_auroc(masks, pix), "pixel_pro": pixel_pro(masks, pix)}
        out.update(pixel_cache[key])
    return {**out, "bank_rows": int(len(bank)), "s": round(time.time() - t0, 1)}


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """Maps to the masks' side (bilinear), so every setting is measured on the same 448-px masks."""
    if maps.shape[-1] == size:
        return maps
    from o2n_edge.runtime.scoring import bilinear_matrix

    a = bilinear_matrix(size, maps.shape[-1])
    return np.einsum("sh,bhw,tw->bst", a, maps.astype(np.float64), a, optimize=True).astype(np.float32)


def run(set_name: str, jitter: bool, shots: list[int], seeds: list[int], names: list[str], candidate: str,
        out: Path) -> None:
    kind, root = SETS[set_name]
    ds = load_dataset(root, kind, set_name)
    labels = np.array([s.label for s in ds.test], dtype=np.int64)
    masks = (np.stack([load_mask(s.mask_path, (448, 448)) for s in ds.test]) if ds.has_masks else None)
    draws = {(k, sd): sample_shots(ds.train_good, k, sd) for k in shots for sd in seeds}
    uniq = sorted({p for v in draws.values() for p in v})
    enc = Encodings([load_rgb(s.path, jitter) for s in ds.test], {p: load_rgb(p, jitter) for p in uniq})
    cond = f"{set_name}{'+jitter' if jitter else ''}"
    done = set()
    if out.exists():
        done = {(r["condition"], r["setting"], r["shots"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
    for (k, sd), paths in draws.items():
        pixel_cache: dict = {}
        expanded = [(n, c) for n in names for c in (candidate.split(";") if n == "candidate" else [""])]
        for name, combo in expanded:
            s = setting_of(name, combo)
            label = f"candidate:{combo}" if name == "candidate" else name
            if (cond, label, k, sd) in done or (k == 1 and s.views == 1):
                continue  # one shot with one view has no second image to measure constants on
            rec = {"condition": cond, "setting": label, "shots": k, "seed": sd,
                   **run_one(enc, s, paths, labels, masks, sd, pixel_cache)}
            with out.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"{cond} k={k} s{sd} {label}: image AUROC {100 * rec['image_auroc']:.1f} ({rec['s']} s)",
                  file=sys.stderr, flush=True)


def summarize(inputs: list[Path]) -> None:
    """``one_factor.md`` + ``.json``: per condition, each setting's mean and its change from the default."""
    import collections

    recs = [json.loads(x) for f in inputs for x in f.read_text().splitlines() if x.strip()]
    conds = list(dict.fromkeys(r["condition"] for r in recs))
    names = list(dict.fromkeys(r["setting"] for r in recs))
    by = collections.defaultdict(list)
    for r in recs:
        by[(r["condition"], r["setting"])].append(r)
    lines = [f"# {NAME}", "", *stamp_lines(machine_stamp(1)), "",
             __doc__.split("Conditions:")[0].split("Settings")[0].strip(), "",
             "Settings: see `benchmarks/one_factor.py`. Image AUROC, percent, mean over every (shots, seed) the "
             "setting and the default both ran (1 and 4 shots, seeds 0-2 unless noted); in brackets the "
             "change from the default. Pixel AUROC / PRO on the sets with masks, at 448 px. "
             "Written by `python -m benchmarks.one_factor --summarize`.", ""]
    rows = []
    for metric, title in (("image_auroc", "Image AUROC"), ("pixel_pro", "PRO"), ("pixel_auroc", "Pixel AUROC")):
        lines += [f"## {title}", "", "| setting | " + " | ".join(conds) + " | worst change |",
                  "|---|" + "---|" * (len(conds) + 1)]
        for n in names:
            cells, deltas = [], []
            for c in conds:
                mine = {(r["shots"], r["seed"]): r for r in by[(c, n)] if r.get(metric) is not None}
                base = {(r["shots"], r["seed"]): r for r in by[(c, "default")] if r.get(metric) is not None}
                keys = sorted(set(mine) & set(base))
                if not keys:
                    cells.append("—")
                    continue
                v = 100 * np.mean([mine[x][metric] for x in keys])
                d = v - 100 * np.mean([base[x][metric] for x in keys])
                deltas.append(d)
                cells.append(f"{v:.1f} ({d:+.1f})" if n != "default" else f"{v:.1f}")
                rows.append({"metric": metric, "condition": c, "setting": n, "mean": v, "delta": d,
                             "runs": [list(x) for x in keys]})
            worst = f"{min(deltas):+.1f}" if deltas and n != "default" else ""
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {worst} |")
        lines.append("")
    lines += ["Runs of the default per condition (shots/seed): " + "; ".join(
        f"{c}: " + " ".join(f"{r['shots']}/{r['seed']}" for r in sorted(by[(c, "default")],
                                                                      key=lambda r: (r["shots"], r["seed"])))
        for c in conds) + ". Settings measured on fewer runs are compared on those only.", ""]
    write_text(RESULTS / f"{NAME}.md", "\n".join(lines))
    write_text(RESULTS / f"{NAME}.json", json.dumps({"rows": rows, "runs": recs}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS))
    ap.add_argument("--jitter", action="store_true", help="every image's brightness scaled by a per-file gain")
    ap.add_argument("--shots", default="1,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--settings", default=",".join(FACTORS))
    ap.add_argument("--candidate", default="", help="comma list of factor names applied together; ';' separates several")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.runs.jsonl")
    ap.add_argument("--summarize", nargs="*", type=Path, default=None, help="JSONL files to summarize")
    a = ap.parse_args()
    if a.summarize is not None:
        summarize(a.summarize or [a.out])
        return
    set_threads(1)
    run(a.set, a.jitter, [int(x) for x in a.shots.split(",")], [int(x) for x in a.seeds.split(",")],
        a.settings.split(","), a.candidate, a.out)


if __name__ == "__main__":
    main()
