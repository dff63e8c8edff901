"""Per-image latency (ORT CPU, 1 thread, batch 1) of detection settings, interleaved.

Exports one shots-only bundle per setting (tire, 4 shots, seed 0; the image-encoder graph is
shared where the setting allows) and times them in one interleaved loop through the runtime,
JPEG decode (draft mode where the bundle says so) included, so a loaded machine slows all of them
alike. Writes benchmarks/results/<name>.{json,md}.

Usage: python -m benchmarks.latency_settings [--settings "v1=lite0:224:1:2-4:3:0:nodraft:head;..."] [--iters 30]
A setting is label=kind:size:tiles:layers:kernel:stats_weight[:flag...], flags: ``nodraft`` (full
JPEG decode), ``head`` (the encoder runs its classifier head for the global feature),
``rowsN`` (bank row budget N), ``pcaN`` (search in N principal axes), ``int8`` (the bank searched in
int8, re-ranked in float32; without it: float32), ``gainT`` (brightness matching, tolerance T); whatever the setting does not name is the lite profile's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from o2n_edge.profiles import Profile

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SETTINGS = ("v1-like (224 px, no statistics, no draft)=lite0:224:1:2-4:3:0:nodraft:head;"
                    "v4 default (448 px, float32 search)=lite0:448:1:2-4:3:0.5:rows8192:gain0.05;"
                    "v5 default (448 px, int8 search)=lite0:448:1:2-4:3:0.5:rows8192:gain0.05:int8;"
                    "fast (224 px, float32 search)=lite0:224:1:2-4:3:0.5:gain0.05;"
                    "fast (224 px, int8 search)=lite0:224:1:2-4:3:0.5:gain0.05:int8")


OVERHEAD = ("decode_jpeg", "preprocess", "postprocess", "encode_answer")  # the per-image work around the models


def setting_profile(text: str, base: Profile) -> Profile:
    """``base`` with a setting ``kind:size:tiles:layers:kernel:stats_weight[:flag...]`` applied."""
    parts = text.strip().split(":")
    kind, size, tiles, layers, kernel, stats = parts[:6]
    flags = parts[6:]
    encoder = replace(base.encoder, kind=f"efficientnet_{kind}", image_size=int(size), tiles=int(tiles),
                      layers=tuple(int(x) for x in layers.split("-")), aggregation=int(kernel),
                      global_from_head="head" in flags)
    changes: dict = {"encoder": encoder, "stats_weight": float(stats), "jpeg_draft": "nodraft" not in flags,
                     "brightness_tolerance": None, "search_precision": "int8" if "int8" in flags else "float32"}
    for f in flags:
        if f.startswith("rows"):
            changes["bank_max_rows"] = int(f[4:])
        elif f.startswith("pca"):
            changes["search_dims"] = int(f[3:])
        elif f.startswith("gain"):
            changes["brightness_tolerance"] = float(f[4:] or 0.0)
        elif f not in ("nodraft", "head", "int8"):
            raise ValueError(f"unknown setting flag {f!r}")
    return replace(base, **changes)


def export_setting(label: str, text: str, work: Path, out_root: Path) -> Path:
    """Export (or reuse) the shots-only tire bundle of one setting.

    Why the profile table is patched for the call: a setting changes layers, kernel and tiling,
    which ``o2n-edge export`` deliberately does not expose as options.
    """
    from o2n_edge import profiles
    from o2n_edge.export.build import ExportOptions, export_bundle

    fixed = setting_profile(text, profiles.PROFILES["lite"])
    out = out_root / label.replace(" ", "_").replace("(", "").replace(")", "")
    if (out / "manifest.json").exists():
        return out
    saved = profiles.PROFILES["lite"]
    profiles.PROFILES["lite"] = fixed
    try:
        e = fixed.encoder
        export_bundle(ExportOptions(category="tire", out=out, profile="lite", data=SHARED / "mvtec3d_rgb", shots=4,
                                    seed=0, branches="pool", pool_size=0,
                                    work_dir=work / f"{e.kind}-{e.image_size}-{e.tiles}-head{int(e.global_from_head)}",
                                    progress=False, force=True))
    finally:
        profiles.PROFILES["lite"] = saved
    return out


def main() -> None:
    """Export every setting's bundle, time them interleaved, write the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bundles", type=Path, default=ROOT / "bundles" / "latency_v5")
    ap.add_argument("--name", default="latency_lite_v5")
    args = ap.parse_args()
    from benchmarks.harness import machine_stamp, set_threads
    from o2n_edge.bench.latency import (
        jpeg_bytes,
        make_runner,
        run_interleaved,
        source_images,
        summarize,
    )

    set_threads(1)
    settings = [s.split("=", 1) for s in args.settings.split(";") if s.strip()]
    bundles = {label: export_setting(label, text, args.bundles / ".work", args.bundles) for label, text in settings}
    images = source_images(1)
    jpegs = [jpeg_bytes(images[0])]
    runners = []
    for label, path in bundles.items():
        r = make_runner("ort-cpu", path, 1, jpegs=jpegs)
        r.name = label
        runners.append(r)
    res = run_interleaved(runners, images, args.warmup, args.iters)
    rows = []
    for (label, text), r in zip(settings, runners):
        m = json.loads((bundles[label] / "manifest.json").read_text())
        s = summarize(r.samples, 1)
        stages = {k: v["p50"] for k, v in s["stages_ms"].items()}
        rows.append({"setting": label, "spec": text, "image_size": m["image_size"], "tiling": m["encoder"].get("tiling"),
                     "bank_rows": m["memory_bank"]["rows"], "patch_dim": m["memory_bank"]["dim"],
                     "stats_weight": m["scoring"].get("stats_weight", 0.0), "jpeg_draft": m.get("decode", {}).get("jpeg_draft", False),
                     "per_image_ms_p50": s["per_image_ms_p50"], "with_io_ms_p50": s.get("with_io_ms", {}).get("p50"),
                     "stages_ms_p50": stages, "first_score": float(res["scores"][label][0])})
        io = rows[-1]["with_io_ms_p50"]
        over = sum(stages.get(k, 0.0) for k in OVERHEAD)
        rows[-1].update(overhead_ms_p50=round(over, 3), overhead_share=round(over / io, 4),
                        scoring_share=round(stages.get("scoring", 0.0) / io, 4))
        print(rows[-1]["setting"], rows[-1]["per_image_ms_p50"], rows[-1]["with_io_ms_p50"], flush=True)
    doc = {"name": args.name, "machine": machine_stamp(1), "category": "tire", "shots": 4, "seed": 0,
           "branches": ["pool"], "source_side": len(images[0]), "iters": args.iters, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    keys = ["decode_jpeg", "preprocess", "image_encoder", "scoring", "postprocess", "encode_answer"]
    lines = [f"# {args.name}\n",
             f"Per-image latency, ORT CPU, 1 thread, batch 1, p50 over {args.iters} interleaved iterations; shots-only "
             "bundles (pool branch; tire, 4 shots, seed 0; bank = coreset 0.1 of the shots' views), a 512-px JPEG "
             "in. Machine: {} ({} usable cores), load average at start {}. Written by ".format(
                 doc["machine"]["cpu"], doc["machine"]["cores"], doc["machine"]["load_average_start"]) + 
             "`python -m benchmarks.latency_settings`.\n",
             "| setting | input px | bank rows x dim | stats | JPEG draft | pipeline ms | + decode/answer ms | "
             + " | ".join(f"{k} ms" for k in keys) + " | scoring share | overhead share |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(keys) + 2)]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['image_size']} | {r['bank_rows']} x {r['patch_dim']} | {r['stats_weight']:g} | "
                     f"{r['jpeg_draft']} | {r['per_image_ms_p50']:.2f} | {r['with_io_ms_p50']:.2f} | "
                     + " | ".join(f"{r['stages_ms_p50'].get(k, float('nan')):.2f}" for k in keys)
                     + f" | {100 * r['scoring_share']:.0f}% | {100 * r['overhead_share']:.0f}% |")
    ref = rows[0]["with_io_ms_p50"]
    lines += ["", f"Per-image time (with decode and answer) relative to the first row ({rows[0]['setting']}): "
              + "; ".join(f"{r['setting']} {r['with_io_ms_p50'] / ref:.2f}x" for r in rows[1:]) + ". Overhead = "
              "decode + preprocess + postprocess + encoding the answer (JSON with the heat map)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
