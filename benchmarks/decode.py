"""JPEG decode + resize to the scoring size: full decode vs PIL draft mode.

For each JPEG set: median ms per image of decode_image + resize_uint8 to the scoring size, with
and without draft mode, interleaved in one loop, and the mean/max absolute pixel difference of
the two results. Synthetic 1024-px JPEGs (an MVTec-sized frame, made from a hazelnut photo) are
added so the gain at a typical camera size is measured too.
Writes benchmarks/results/<name>.{json,md}.

Usage: python -m benchmarks.decode [--size 224] [--repeats 20] [--name decode_draft]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from o2n_edge.data.images import decode_image
from o2n_edge.data.preprocess import resize_uint8

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"


def jpeg_sets() -> dict[str, list[bytes]]:
    haz = sorted((SHARED / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))[:10]
    sets = {"hazelnut_toy 512 px": [p.read_bytes() for p in haz]}
    big = []
    for p in haz:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=92)
        big.append(buf.getvalue())
    sets["1024 px (hazelnut upscaled, q92)"] = big
    try:
        from conformal_clip_data import nominal_dir

        sets["textile 250 px"] = [p.read_bytes() for p in sorted(Path(nominal_dir()).glob("*.jpg"))[:10]]
    except ImportError:
        pass
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--name", default="decode_draft")
    args = ap.parse_args()
    rows = []
    for name, blobs in jpeg_sets().items():
        full_ms, draft_ms, diffs, shapes = [], [], [], set()
        for _ in range(args.repeats):
            for b in blobs:
                t = time.perf_counter()
                a = resize_uint8(decode_image(b, "x"), args.size)[0]
                full_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                raw = decode_image(b, "x", draft_size=args.size)
                d = resize_uint8(raw, args.size)[0]
                draft_ms.append((time.perf_counter() - t) * 1000)
                shapes.add(raw.shape[:2])
                diffs.append(np.abs(a.astype(int) - d.astype(int)))
        diff = np.stack(diffs)
        rows.append({"set": name, "images": len(blobs), "repeats": args.repeats, "size": args.size,
                     "full_ms_p50": float(np.median(full_ms)), "draft_ms_p50": float(np.median(draft_ms)),
                     "full_ms_min": float(np.min(full_ms)), "draft_ms_min": float(np.min(draft_ms)),
                     "speedup": float(np.min(full_ms) / np.min(draft_ms)),
                     "draft_decoded_shapes": sorted(list(s) for s in shapes),
                     "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max())})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "threads": 1},
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# {args.name}\n", f"decode_image + resize to {args.size} px, median ms per image, full decode vs PIL "
             "draft mode (interleaved; shared, loaded 2-core machine, so the minimum is the figure to read; the "
             "speed-up is min/min). Pixel difference of the two 224-px results "
             "(0-255 scale). Written by `python -m benchmarks.decode`.\n",
             "| JPEG set | images x repeats | full ms min (p50) | draft ms min (p50) | speed-up | draft decodes to | mean abs diff | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['images']} x {r['repeats']} | {r['full_ms_min']:.2f} ({r['full_ms_p50']:.2f}) | "
                     f"{r['draft_ms_min']:.2f} ({r['draft_ms_p50']:.2f}) | "
                     f"{r['speedup']:.2f}x | {', '.join(f'{h}x{w}' for h, w in r['draft_decoded_shapes'])} | "
                     f"{r['mean_abs_diff']:.2f} | {r['max_abs_diff']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
