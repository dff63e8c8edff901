"""Accuracy cost of the speed options (fp16, int8, coreset banks), through the runtime on real test sets.

Each speed option changes what is computed: fp16 graphs and int8 weights change every feature
distance a little, a coreset drops rows of the memory bank. Whether that costs detection is a
question for real images, not for a latency table, so every variant of one personalized run
scores the same test set through the same runtime and is compared with the fp32, full-bank
export of that run: image AUROC, pixel AUROC (where the set has masks), and the largest
per-image score change. Per-image latency from the same pass (batch 1) is reported next to it.

int8 comes in two kinds, both made here (neither is a product feature: both cost accuracy, see
``results/variants_lite.md``). Dynamic (``quantize_dynamic``: weights int8, activation ranges
per batch at run time) needs no calibration. Static QDQ (QuantizeLinear / DequantizeLinear pairs,
the format onnxruntime and TensorRT both consume) fixes every activation's range beforehand from
recorded inputs: the fp32 bundle runs on held-out good images (never the test set) and every feed
of the UNet and image encoder is kept. Quantized graphs are cached under ``CACHE_DIR`` (never
committed); the bundle itself is not modified.

Usage:
  python -m benchmarks.variants --set hazelnut:../shared/data/hazelnut_toy:bundles/study/hazelnut \\
      [--set tire:../shared/data/mvtec3d_rgb:bundles/study/tire] [--set textile:textile:bundles/study/textile]

Each --set is CATEGORY:DATA:PREFIX, DATA a data root or ``textile`` (the built-in set). The
variants are PREFIX-fp32 (the reference), PREFIX-fp32 with its UNet and image encoder quantized
to int8 dynamically, and statically (QDQ, calibrated on the held-out good images the export
calibrated its threshold on: never the test set) for the UNet alone and for UNet + encoder, and
every other PREFIX-* bundle that exists (e.g. PREFIX-fp16, PREFIX-coreset10), all
exported from the same personalized run (``o2n-edge export --run RUN [--precision fp16]
[--coreset 0.1] --out PREFIX-...``). Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, percentiles, set_threads, stamp_lines, write_result
from o2n_edge.bench.latency import open_ort

log = logging.getLogger(__name__)

CACHE_DIR = Path(".bench_cache") / "int8"
QUANTIZED = ("unet", "image_encoder")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class Variant:
    """One way to run a personalized run: a bundle, optionally with graphs swapped (int8)."""

    name: str
    bundle: Path
    overrides: dict[str, Path] = field(default_factory=dict)


def score_test_set(variant: Variant, images: list[np.ndarray], threads: int) -> dict[str, Any]:
    """Scores and maps of every image at batch 1, and the per-image latencies of that pass."""
    pipe, _ = open_ort(variant.bundle, threads, overrides=variant.overrides or None)
    scores, maps, ms = [], [], []
    for img in images:
        t0 = time.perf_counter()
        r = pipe.inspect(img)
        ms.append((time.perf_counter() - t0) * 1000.0)
        scores.append(r.score)
        maps.append(r.anomaly_map)
    m = pipe.manifest
    return {"scores": np.array(scores), "maps": np.stack(maps), "latency_ms": percentiles(ms),
            "precision": m["precision"], "bank_rows": int(m["memory_bank"]["rows"]),
            "graphs_swapped": sorted(variant.overrides), "providers": list(pipe.providers)}


def variants_study(variants: list[Variant], data: Path | None, dataset: str | None, category: str,
                   threads: int) -> dict[str, Any]:
    """All variants on one test set; the first variant is the reference the costs are taken from."""
    from o2n_edge.data import load_dataset, load_image, load_mask
    from o2n_edge.detection_metrics import image_auroc, pixel_auroc

    t_start = time.perf_counter()
    ds = load_dataset(data, dataset, category)
    images = [load_image(s.path) for s in ds.test]
    labels = ds.labels
    rows: list[dict[str, Any]] = []
    masks = None
    for v in variants:
        out = score_test_set(v, images, threads)
        if masks is None and ds.has_masks:
            size = out["maps"].shape[-1]
            masks = np.stack([load_mask(s.mask_path, (size, size)) for s in ds.test])
        row = {"variant": v.name, "bundle": str(v.bundle), "precision": out["precision"],
               "bank_rows": out["bank_rows"], "graphs_swapped": out["graphs_swapped"],
               "image_auroc": round(image_auroc(labels, out["scores"]), 4),
               "pixel_auroc": round(pixel_auroc(masks, out["maps"]), 4) if masks is not None else None,
               "latency_ms": out["latency_ms"], "scores": [round(float(x), 5) for x in out["scores"]]}
        if rows:
            ref = rows[0]
            row["image_auroc_cost"] = round(ref["image_auroc"] - row["image_auroc"], 4)
            if masks is not None:
                row["pixel_auroc_cost"] = round(ref["pixel_auroc"] - row["pixel_auroc"], 4)
            row["max_abs_score_diff"] = round(float(np.abs(out["scores"] - np.array(ref["scores"])).max()), 5)
        rows.append(row)
    return {"kind": "variants", "category": category, "data": str(data) if data else dataset,
            "test_images": len(images), "anomalies": int(labels.sum()), "has_masks": bool(ds.has_masks),
            "reference": variants[0].name, "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1)}


def variants_markdown(doc: dict[str, Any]) -> str:
    """One table per test set: accuracy and its cost next to the latency of each variant."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", " ".join(__doc__.split("int8 comes")[0].split()), ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    for r in doc["results"]:
        lines += [f"## {r['category']} — {r['test_images']} test images ({r['anomalies']} anomalous), "
                  f"reference: {r['reference']}", "",
                  "| variant | graphs | bank rows | image AUROC | cost | pixel AUROC | cost | max \\|Δscore\\| | "
                  "per-image p50 ms | p90 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            graphs = x["precision"] + (f" ({', '.join(x['graphs_swapped'])} int8)" if x["graphs_swapped"] else "")
            pix = f"{x['pixel_auroc']:.4f}" if x["pixel_auroc"] is not None else "—"
            cost = f"{x['image_auroc_cost']:+.4f}" if "image_auroc_cost" in x else "—"
            pcost = f"{x['pixel_auroc_cost']:+.4f}" if "pixel_auroc_cost" in x else "—"
            diff = f"{x['max_abs_score_diff']:.4f}" if "max_abs_score_diff" in x else "—"
            lines.append(f"| {x['variant']} | {graphs} | {x['bank_rows']} | {x['image_auroc']:.4f} | {cost} | {pix} | "
                         f"{pcost} | {diff} | {x['latency_ms']['p50']:.1f} | {x['latency_ms']['p90']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def quantized_overrides(bundle: Path, names: tuple[str, ...] = QUANTIZED, cache_dir: Path = CACHE_DIR) -> dict[str, Path]:
    """Quantize (once, cached by the bundle's manifest hash) and return name -> int8 graph path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from o2n_edge.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    key = hashlib.sha256(str(b.manifest["manifest_sha256"]).encode()).hexdigest()[:16]
    out = {}
    for name in names:
        if name not in b.manifest["models"]:
            continue
        dst = (cache_dir / key / f"{name}.int8.onnx").resolve()
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp.onnx")
            quantize_dynamic(str(b.model_path(name)), str(tmp), weight_type=QuantType.QInt8)
            tmp.replace(dst)
        out[name] = dst
    return out


class _Recorder:
    """Wraps a session and keeps a copy of every feed it runs (the calibration set)."""

    def __init__(self, session: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        self._session = session
        self._feeds = feeds

    def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        self._feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        return self._session.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def record_calibration_feeds(bundle: Path, images: Sequence[np.ndarray], names: Sequence[str] = QUANTIZED,
                             threads: int = 1) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the fp32 bundle on ``images`` (one at a time) and return every feed of ``names``."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(bundle, SessionOptions(intra_op_threads=threads))
    feeds: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names if n in pipe.sessions}
    for n, store in feeds.items():
        pipe.sessions[n] = _Recorder(pipe.sessions[n], store)
    for img in images:
        pipe.inspect(img)
    return feeds


class _FeedReader:
    """onnxruntime's CalibrationDataReader over recorded feeds (split to batch 1)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._items = [{k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_qdq(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                 per_channel: bool = True) -> Path:
    """Write a QDQ int8 copy of ``src`` calibrated on ``feeds`` (activations uint8, weights int8)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if not feeds:
        raise ValueError(f"{src.name}: no calibration inputs recorded")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    quantize_static(str(src), str(tmp), _FeedReader(feeds), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                    extra_options={"CalibMovingAverage": False})
    tmp.replace(dst)
    return dst


def static_int8_overrides(bundle: Path, images: Sequence[np.ndarray], cache_dir: Path, method: str = "minmax",
                          names: Sequence[str] = QUANTIZED) -> dict[str, Path]:
    """Calibrate on ``images`` and quantize ``names`` once (cached); returns name -> QDQ graph path.

    The cache key covers the bundle's manifest hash, the calibration images' bytes and the method,
    so a different calibration set never reuses stale graphs.
    """
    from o2n_edge.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    h = hashlib.sha256(str(b.manifest["manifest_sha256"]).encode())
    for img in images:
        h.update(np.ascontiguousarray(img).tobytes())
    h.update(method.encode())
    out_dir = Path(cache_dir) / f"qdq-{h.hexdigest()[:16]}"
    wanted = [n for n in names if n in b.manifest["models"]]
    paths = {n: (out_dir / f"{n}.int8.qdq.onnx").resolve() for n in wanted}
    missing = [n for n in wanted if not paths[n].is_file()]
    if missing:
        log.info("recording calibration inputs on %d images for %s", len(images), ", ".join(missing))
        feeds = record_calibration_feeds(bundle, images, missing)
        for n in missing:
            quantize_qdq(b.model_path(n), paths[n], feeds[n], method)
    return paths


def variants_of(prefix: Path, data: Path | None, dataset: str | None, category: str) -> list[Variant]:
    """fp32 first (the reference), then int8 on top of it, then the other exported variants."""
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.export.build import calibration_images
    from o2n_edge.runtime.bundle import load_bundle

    ref = Path(f"{prefix}-fp32")
    if not (ref / "manifest.json").is_file():
        raise SystemExit(f"{ref}: no bundle (export the fp32 reference first)")
    ds = load_dataset(data, dataset, category)
    shots = set(load_bundle(ref).manifest["shots"]["images"])
    calib = [load_image(p) for p in calibration_images(ds, [p for p in ds.train_good if p.name in shots])]
    static = static_int8_overrides(ref, calib, CACHE_DIR, "minmax")
    out = [Variant("fp32", ref), Variant("int8 (dynamic)", ref, quantized_overrides(ref)),
           Variant(f"int8 static UNet ({len(calib)} calibration images)", ref, {"unet": static["unet"]}),
           Variant("int8 static UNet + encoder", ref, static)]
    for other in sorted(prefix.parent.glob(prefix.name + "-*")):
        suffix = other.name[len(prefix.name) + 1:]
        if other != ref and (other / "manifest.json").is_file():
            out.append(Variant(suffix, other))
    return out


def main() -> None:
    """Command line of the study."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True, help="CATEGORY:DATA:PREFIX")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="variants_lite")
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    set_threads(a.threads)
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "note": a.note, "results": []}
    for s in a.set:
        parts = s.split(":")
        if len(parts) != 3 or not all(parts):
            p.error(f"--set {s!r}: expected CATEGORY:DATA:PREFIX")
        category, data, prefix = parts
        builtin = data == "textile"
        root, layout = (None, "textile") if builtin else (Path(data), None)
        doc["results"].append(variants_study(variants_of(Path(prefix), root, layout, category), root, layout,
                                             category, a.threads))
        print(f"{category}: done", flush=True)
    write_result(a.out, a.name, doc, variants_markdown(doc))
    print(variants_markdown(doc))


if __name__ == "__main__":
    main()
