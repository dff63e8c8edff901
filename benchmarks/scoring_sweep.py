"""Scoring sweep: many image-score variants from one nearest-neighbour pass per run.

The exploration behind the lite detection core v3 default. For each (preprocessing, encoder
resolution, layers, kernel, shot views, shots, seed) the test set's pool map is computed once
and every image-score variant below is derived from it, so they are compared on identical
features. Each run appends one line to ``--out`` (JSONL); ``--summarize OUT.md IN.jsonl ...``
writes the mean image AUROC per shot count of every variant. Test labels are used only to
measure: nothing here chooses a setting for a bundle.

Variants (``auroc`` keys): ``cur`` = the v2 image score (top-1% of the smoothed map + 0.5 x the
global cosine term); ``map``/``max``/``gridmax`` = top-1% / max of the smoothed map / max of the
grid; ``ring`` / ``r10`` / ``r15`` = top-1% after per-border-ring standardization over 3 rings /
10% / 15% of the grid side; ``crop`` = top-1% ignoring a 10% margin; ``peak*`` = top-1% minus the
map's median; ``+s1`` / ``+s.5`` = plus 1 / 0.5 x the standardized statistics branch;
``+g.5`` = plus 0.5 x the global cosine term. Views: v1 = the shot only, v3 = + flips,
v6 = + right-angle rotations, ``p`` = + gamma/gain variants.

Usage: python -m benchmarks.scoring_sweep --set tire --encs lite0:224,lite0:448 --views v6 --coreset 0.1 --out X.jsonl
       python -m benchmarks.scoring_sweep --summarize benchmarks/results/scoring_sweep.md X.jsonl ...
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from o2n_edge.data import load_dataset, sample_shots
from o2n_edge.data.photometric import BrightnessRange
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.data.tiling import TileLayout, stitch_outputs
from o2n_edge.profiles import EncoderSpec, get_profile
from o2n_edge.reference import build_reference
from o2n_edge.runtime.bank_search import NumpyBankSearch
from o2n_edge.runtime.scoring import (
    ScoringConfig,
    cosine_distance_to_bank,
    feature_stats,
    pool_map,
    ring_index,
    stats_distance,
    topk_mean,
    upsample_and_smooth,
)

SHARED = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
SETS = {"textile": ("textile", None), "tire": ("mvtec", SHARED / "mvtec3d_rgb"),
        "hazelnut": ("mvtec", SHARED / "hazelnut_toy")}
STAGES = (1, 2, 3, 4)  # every backbone stage a --layers setting may take patch features from
ENCODE_BATCH = 8


def _gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    lut = (255 * (np.arange(256) / 255) ** g).clip(0, 255).astype(np.uint8)
    return lambda im: lut[im]


def _gain(a: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda im: (im.astype(np.float32) * a).clip(0, 255).astype(np.uint8)


TF = [lambda im: im, lambda im: im[:, ::-1], lambda im: im[::-1, :], lambda im: np.rot90(im, 1), lambda im: np.rot90(im, 2),
      lambda im: np.rot90(im, 3), _gamma(0.7), _gamma(1.4), _gain(0.75), _gain(1.3)]
NTF = len(TF)
VIEWSETS = {"v1": [0], "v3": [0, 1, 2], "v6": [0, 1, 2, 3, 4, 5], "v3p": [0, 1, 2, 6, 7, 8, 9], "v1p": [0, 6, 7, 8, 9], "v6p": list(range(10))}


@dataclass
class Trunk:
    """Backbone stage maps of a set of images, kept so each (layers, kernel) costs a compose, not a pass.

    The features are composed with the encoder's own ``compose_patch`` and stitched like the
    runtime stitches graph outputs, so they equal what the exported encoder would give.
    """

    layout: TileLayout
    stages: dict[int, Any]  # stage -> torch.Tensor (N*tiles, C, h, w)
    global_: np.ndarray  # (N, G), merged over tiles

    def compose(self, layers: tuple[int, ...], kernel: int) -> dict[str, np.ndarray]:
        """{"patch": (N,H,W,D), "global": (N,G)} as the exported graph with these settings gives them."""
        import torch

        from o2n_edge.encoders.efficientnet import compose_patch

        with torch.inference_mode():
            patch = compose_patch({i: self.stages[i] for i in layers}, layers, kernel).numpy()
        return {"patch": stitch_outputs({"patch": patch}, self.layout)["patch"], "global": self.global_}


def encode_trunk(spec: EncoderSpec, images: list[np.ndarray], brightness_range: BrightnessRange | None = None) -> Trunk:
    """Run the EfficientNet-Lite backbone of ``spec`` over uint8 ``images`` once, keeping every stage."""
    import torch

    from o2n_edge.encoders import build_encoder

    enc = build_encoder(replace(spec, layers=(), aggregation=1))
    chunks: dict[int, list[Any]] = {i: [] for i in STAGES}
    globs = []
    with torch.inference_mode():
        for s in range(0, len(images), ENCODE_BATCH):
            feats, head = enc.stage_maps(enc.preprocess(images[s:s + ENCODE_BATCH], brightness_range), STAGES)
            for i in STAGES:
                chunks[i].append(feats[i].float().clone())
            globs.append(head.mean(dim=(2, 3)).float().numpy())
    glob = stitch_outputs({"global": np.concatenate(globs)}, enc.layout)["global"]
    return Trunk(enc.layout, {i: torch.cat(v) for i, v in chunks.items()}, glob)


def load(p: Path, prep: str) -> np.ndarray:
    """An RGB image, optionally autocontrasted (``ac``) or equalized (``eq``)."""
    im = Image.open(p).convert("RGB")
    if prep == "ac":
        im = ImageOps.autocontrast(im, cutoff=1)
    elif prep == "eq":
        im = ImageOps.equalize(im)
    return np.asarray(im)


def ring_scores(gm: np.ndarray, loo: np.ndarray, nr: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1% and max of the smoothed map after standardizing each border ring (< nr) on its own."""
    h, w = gm.shape[1:]
    ring = ring_index(h, w, nr)
    center = np.zeros((h, w))
    scale = np.zeros((h, w))
    for r in range(nr + 1):
        sel = ring == r
        v = loo[:, sel]
        center[sel] = v.mean()
        scale[sel] = max(float(v.std(ddof=1)), 0.1 * float(v.mean()))  # as first measured: sample std
    rfull = upsample_and_smooth((gm - center) / scale, side, 4.0)
    return topk_mean(rfull, 0.01), rfull.reshape(len(rfull), -1).max(1)


def lower_median(maps: np.ndarray) -> np.ndarray:
    """(B,...) -> (B,): the lower middle value, as torch's median (what the results were measured with)."""
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    return flat[:, (flat.shape[1] - 1) // 2]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Image AUROC (sklearn, imported late: only a run needs it)."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, s))


def summarize(out_md: str, inputs: list[str]) -> None:
    """Mean image AUROC per shot count of every (set, setting, variant), best first per set."""
    import collections

    rows = [json.loads(line) for f in inputs for line in open(f)]
    acc = collections.defaultdict(list)
    for r in rows:
        key = (r["set"], r["prep"], r["enc"], r["layers"], r["kernel"], r["views"], r.get("coreset", 1.0))
        for n, v in r["auroc"].items():
            acc[(key, n, r["k"])].append(v)
    table = collections.defaultdict(dict)
    for (key, n, k), v in acc.items():
        table[(key, n)][k] = (100 * float(np.mean(v)), len(v))
    lines = ["# scoring_sweep\n", __doc__.split("Usage:")[0].strip() + "\n",
             "Image AUROC (percent), mean over seeds (n = runs) per shot count; `mean` = over the shot counts present. "
             "Written by `python -m benchmarks.scoring_sweep --summarize`.\n",
             "| set | prep | encoder | layers | kernel | views | bank | variant | mean | k=1 | k=2 | k=4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for set_name in ("tire", "textile", "hazelnut"):
        items = [(key, n, d) for (key, n), d in table.items() if key[0] == set_name]
        items.sort(key=lambda x: -np.mean([v[0] for v in x[2].values()]))
        for key, n, d in items:
            cells = [f"{d[k][0]:.1f} (n{d[k][1]})" if k in d else "—" for k in (1, 2, 4)]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | "
                         f"{'coreset ' + str(key[6]) if key[6] < 1 else 'whole'} | {n} | "
                         f"{np.mean([v[0] for v in d.values()]):.1f} | " + " | ".join(cells) + " |")
    Path(out_md).write_text("\n".join(lines) + "\n")


def main() -> None:
    """Sweep (one JSONL line per run) or ``--summarize``."""
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", required=True)
    ap.add_argument("--preps", default="plain")
    ap.add_argument("--encs", default="lite0:224")
    ap.add_argument("--layers", default="2-4")
    ap.add_argument("--kernels", default="3")
    ap.add_argument("--views", default="v6")
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--coreset", type=float, default=1.0)
    a = ap.parse_args()
    ds_kind, root = SETS[a.set]
    ds = load_dataset(root, ds_kind, a.set)
    import torch

    torch.set_num_threads(2)
    labels = ds.labels
    test_paths = [s.path for s in ds.test]
    shots_of = {(k, sd): sample_shots(ds.train_good, k, sd) for k in map(int, a.shots.split(",")) for sd in map(int, a.seeds.split(","))}
    uniq = sorted({p for v in shots_of.values() for p in v})
    prof = get_profile("lite")
    out = open(a.out, "a")
    for prep in a.preps.split(","):
        test_imgs = [load(p, prep) for p in test_paths]
        shot_imgs = {p: load(p, prep) for p in uniq}
        for enc in a.encs.split(","):
            kind, size = enc.split(":")[:2]
            tiles = int(enc.split(":")[2]) if enc.count(":") >= 2 else 1
            spec = replace(prof.encoder, kind=f"efficientnet_{kind}", image_size=int(size), tiles=tiles)
            side = spec.input_size
            t0 = time.time()
            views = [np.ascontiguousarray(f(resize_uint8([shot_imgs[p]], side)[0])) for p in uniq for f in TF]
            tt = encode_trunk(spec, list(resize_uint8(test_imgs, side)))
            st = encode_trunk(spec, views)
            print(f"{a.set} {prep} {enc}: encoded in {time.time()-t0:.0f}s", file=sys.stderr, flush=True)
            for layers, kern in itertools.product(a.layers.split(","), map(int, a.kernels.split(","))):
                lay = tuple(int(x) for x in layers.split("-"))
                tf = tt.compose(lay, kern)
                sf = st.compose(lay, kern)
                for vs in a.views.split(","):
                    vidx = VIEWSETS[vs]
                    for (k, sd), paths in shots_of.items():
                        t1 = time.time()
                        shot_feats = []
                        for p in paths:
                            i = uniq.index(p)
                            rows = [i * NTF + j for j in vidx]
                            shot_feats.append({kk: v[rows] for kk, v in sf.items()})
                        if k == 1 and len(vidx) == 1:
                            continue
                        cfg = replace(ScoringConfig.from_profile(replace(prof, stats_weight=1.0), ("pool",)), image_size=side)
                        ref = build_reference(shot_feats, cfg)
                        mb = ref.memory_bank
                        if a.coreset < 1.0:
                            from o2n_edge.runtime.coreset import greedy_coreset
                            mb = mb[greedy_coreset(mb, a.coreset, seed=0)]
                        gm = pool_map(tf["patch"], mb, NumpyBankSearch(mb))
                        c, sc = ref.norm_of("pool")
                        gc, gs = ref.norm_of("global_pool")
                        stdm = (gm - c) / sc
                        glob = (cosine_distance_to_bank(tf["global"], ref.global_bank) - gc) / gs
                        full = upsample_and_smooth(stdm, side, 4.0)
                        top1 = topk_mean(full, 0.01)
                        mx = full.reshape(len(full), -1).max(1)
                        gmax = stdm.reshape(len(gm), -1).max(1)
                        # ring-wise standardization from leave-one-shot-out maps
                        loo = []
                        for i, f in enumerate(shot_feats):
                            others = [g for j, g in enumerate(shot_feats) if j != i] if k > 1 else [{kk: v[1:] for kk, v in f.items()}]
                            ob = np.concatenate([g["patch"].reshape(-1, g["patch"].shape[-1]) for g in others])
                            loo.append(pool_map(f["patch"][:1], ob)[0])
                        loo = np.stack(loo)
                        h = gm.shape[1]
                        rtop, rmax = ring_scores(gm, loo, 3, side)
                        r10, r10max = ring_scores(gm, loo, max(1, round(0.1 * h)), side)
                        r15, _ = ring_scores(gm, loo, max(1, round(0.15 * h)), side)
                        mgp = max(1, side // 10)
                        crop = full[:, mgp:-mgp, mgp:-mgp]
                        ctop = topk_mean(crop, 0.01)
                        cmax = crop.reshape(len(crop), -1).max(1)
                        med = lower_median(full)
                        gmed = lower_median(stdm)
                        gmean = stdm.reshape(len(gm), -1).mean(1)
                        stc, sts = ref.norm_of("global_stats")
                        stats = (stats_distance(feature_stats(tf["patch"]), ref.stats_bank, ref.stats_scale) - stc) / sts
                        aggs = {"cur": top1 + 0.5 * glob, "map": top1, "max": mx, "gridmax": gmax,
                                "cur+s1": top1 + 0.5 * glob + stats, "map+s1": top1 + stats, "max+s1": mx + stats,
                                "map+s.5": top1 + 0.5 * stats, "stats": stats, "glob": glob, "ring": rtop, "ringmax": rmax, "ring+s1": rtop + stats, "ringmax+s1": rmax + stats,
                                "ring+s.5": rtop + 0.5 * stats, "r10": r10, "r10max": r10max, "r15": r15, "r10+s1": r10 + stats, "r10+s.5": r10 + 0.5 * stats,
                                "r15+s1": r15 + stats, "r15+s.5": r15 + 0.5 * stats, "r10+g.5": r10 + 0.5 * glob, "r10+g.5+s.5": r10 + 0.5 * glob + 0.5 * stats,
                                "r10+g.5+s1": r10 + 0.5 * glob + stats, "r10max+s.5": r10max + 0.5 * stats, "crop": ctop, "cropmax": cmax, "crop+s1": ctop + stats,
                                "peak": top1 - med, "peakmax": mx - med, "peakgrid": gmax - gmed, "peakmean": top1 - gmean,
                                "peak+s1": top1 - med + stats, "peakmax+s1": mx - med + stats, "peak+s.5": top1 - med + 0.5 * stats}
                        rec = {"set": a.set, "prep": prep, "enc": enc, "layers": layers, "kernel": kern, "views": vs,
                               "k": k, "seed": sd, "coreset": a.coreset, "s": round(time.time() - t1, 1),
                               "auroc": {n: auroc(labels, v) for n, v in aggs.items()}}
                        types = np.array([s.defect for s in ds.test])
                        for dt in sorted(set(types) - {"good"}):
                            m = (types == "good") | (types == dt)
                            rec.setdefault("by_type", {})[dt] = {n: auroc(labels[m], v[m]) for n, v in aggs.items() if n in ("cur", "map", "map+s1", "ring", "r10", "r15", "r10+s1", "r10+s.5", "crop", "crop+s1")}
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        print(f"  {prep} {enc} L{layers} k{kern} {vs} k={k} s{sd}: " + " ".join(f"{n}={100*v:.1f}" for n, v in rec["auroc"].items()) + f" ({rec['s']}s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
