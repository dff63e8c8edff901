"""An int8 image encoder for lite: what static quantization costs in accuracy, and what it saves in time.

Why: at 448 px the encoder is 30 ms of the default's 78 ms per image on a CPU thread, and an
earlier static-int8 attempt on an older lite setting cost tire 18.9 points of image AUROC
(``variants_lite.md``). This study re-measures it on the current default before any product
decision: the exported encoder graph quantized with onnxruntime's ``quantize_static`` (QDQ,
per-channel int8 weights, uint8 activations, ``--calibration`` MinMax by default) on the views of
8 training good images that are then left out of the shot pool, so no shot calibrates its own
range. Every run is scored twice on the same draws, float32 and int8 encoder (bank and queries
alike), through ``evaluate``.

Parts: ``--part accuracy`` (hazelnut, tire, textile at ``--shots`` x ``--seeds``; ``--sets``)
and ``--part latency`` (the two graphs, 1 thread, batch 1, median of 20; run it on a quiet
machine). Results: ``results/int8_encoder.{json,md}`` (each part keeps the other's rows).

Usage: python -m benchmarks.int8_encoder --part accuracy [--sets tire] [--shots 1,2,4] [--seeds 0,1,2]
       python -m benchmarks.int8_encoder --part latency
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_result

NAME = "int8_encoder"
ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
SETS = {"hazelnut": ("hazelnut_toy", "hazelnut"), "tire": ("mvtec3d_rgb", "tire"), "textile": (None, "textile")}
CALIBRATION_IMAGES = 8
METRICS = ("image_auroc", "pixel_auroc", "pixel_pro")


def fp32_graph(encoder, work: Path) -> Path:
    """The encoder's graph as ``export`` writes it (validated, simplified), into ``work``."""
    from o2n_edge.export.onnx_export import export_onnx
    from o2n_edge.export.specs import image_encoder_spec

    spec = image_encoder_spec(encoder)
    path = work / "image_encoder.onnx"
    export_onnx(spec.wrap(encoder), spec, path)
    return path


def quantized_graph(encoder, fp32: Path, calib: list[np.ndarray], method: str, work: Path) -> Path:
    """``fp32`` quantized (QDQ, per-channel weights) with the views of ``calib`` as calibration data."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from o2n_edge.reference import augment_views

    pixels = encoder.preprocess([v for im in calib for v in augment_views(im)]).numpy()

    class Views(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            self.i += 1
            return {"pixels": pixels[self.i - 1:self.i]} if self.i <= len(pixels) else None

    pre = work / "pre.onnx"
    out = work / f"image_encoder_int8_{method}.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Views(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax,
                                      "percentile": CalibrationMethod.Percentile}[method])
    return out


def accuracy(sets: list[str], shots: list[int], seeds: list[int], method: str, work: Path) -> list[dict]:
    import onnxruntime as ort

    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.encoders import build_encoder
    from o2n_edge.encoders.onnx_runner import onnx_runner_for
    from o2n_edge.evaluation import evaluate
    from o2n_edge.profiles import get_profile

    profile = get_profile("lite")
    rows = []
    for name in sets:
        root, cat = SETS[name]
        ds = load_dataset(None if root is None else SHARED / root, "textile" if root is None else None, cat)
        calib_paths = ds.train_good[-CALIBRATION_IMAGES:]
        ds = replace(ds, train_good=ds.train_good[:-CALIBRATION_IMAGES])  # no shot calibrates its own range
        encoder = build_encoder(profile.encoder)
        runner = onnx_runner_for(encoder)
        assert runner is not None, "the study needs the onnxruntime encoding (onnxruntime installed, CPU)"
        fp32 = fp32_graph(encoder, work)
        int8 = quantized_graph(encoder, fp32, [load_image(p, profile.encoder.image_size, True) for p in calib_paths],
                               method, work)
        options = runner.session.get_session_options()
        for precision, graph in (("float32", fp32), ("int8", int8)):
            runner.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            t0 = time.time()
            doc = evaluate(ds, profile, shots, seeds, ("pool",), progress=False, encoder=encoder,
                           coreset=profile.coreset_ratio)
            for r in doc["runs"]:
                rows.append({"set": name, "encoder": precision, "calibration": method if precision == "int8" else None,
                             "shots": r["shots"], "seed": r["seed"], **{m: r.get(m) for m in METRICS}})
            print(f"{name} {precision}: {time.time() - t0:.0f} s", flush=True)
    return rows


def latency(method: str, work: Path) -> dict:
    import onnxruntime as ort

    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import get_profile

    profile = get_profile("lite")
    encoder = build_encoder(profile.encoder)
    ds = load_dataset(SHARED / "mvtec3d_rgb", None, "tire")
    fp32 = fp32_graph(encoder, work)
    int8 = quantized_graph(encoder, fp32, [load_image(p, 448, True) for p in ds.train_good[-CALIBRATION_IMAGES:]],
                           method, work)
    x = encoder.preprocess([load_image(ds.test[0].path, 448, True)]).numpy()
    out = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for precision, graph in (("float32", fp32), ("int8", int8)):
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, {"pixels": x})
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            session.run(None, {"pixels": x})
            times.append(time.perf_counter() - t0)
        out[f"{precision}_ms"] = round(1000 * float(np.median(times)), 1)
    return out


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for name in SETS:
        for k in sorted({r["shots"] for r in rows if r["set"] == name}):
            pair = {p: [r for r in rows if r["set"] == name and r["shots"] == k and r["encoder"] == p]
                    for p in ("float32", "int8")}
            row = {"set": name, "shots": k, "seeds": [r["seed"] for r in pair["int8"]]}
            for m in METRICS:
                vals = {p: [r[m] for r in pair[p] if r.get(m) is not None] for p in pair}
                if vals["float32"] and len(vals["float32"]) == len(vals["int8"]):
                    row[m] = {p: float(np.mean(v)) for p, v in vals.items()}
                    row[m]["worst_change"] = float(min(np.array(vals["int8"]) - np.array(vals["float32"])))
            out.append(row)
    return out


def markdown(doc: dict) -> str:
    lines = [f"# {NAME}", "", *stamp_lines(doc["machine"]), "",
             "Lite default at 448 px, pool branch, exported coreset; the encoder graph float32 vs int8 (onnxruntime "
             "quantize_static: QDQ, per-channel int8 weights, uint8 activations, calibration "
             f"{doc.get('calibration', 'minmax')} on the views of {CALIBRATION_IMAGES} training goods left out of the "
             "shot pool). Same draws for both. Percent; Δ = int8 - float32 of the means; worst = the largest drop of "
             "one run. Written by `python -m benchmarks.int8_encoder`.", ""]
    if doc.get("summary"):
        lines += ["| set | shots | seeds | image AUROC fp32 → int8 (Δ, worst) | pixel AUROC fp32 → int8 (Δ, worst) | "
                  "PRO fp32 → int8 (Δ, worst) |", "|---|---|---|---|---|---|"]
        for r in doc["summary"]:
            cells = []
            for m in METRICS:
                v = r.get(m)
                cells.append("—" if not v else f"{100 * v['float32']:.1f} → {100 * v['int8']:.1f} "
                             f"({100 * (v['int8'] - v['float32']):+.1f}, {100 * v['worst_change']:+.1f})")
            lines.append(f"| {r['set']} | {r['shots']} | {','.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
        lines.append("")
    if doc.get("latency"):
        lat = doc["latency"]
        lines += [f"Encoder alone, 448 px, 1 thread, batch 1, median of 20: float32 {lat['float32_ms']} ms, "
                  f"int8 {lat['int8_ms']} ms ({lat['float32_ms'] / lat['int8_ms']:.2f}x).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("accuracy", "latency"), required=True)
    ap.add_argument("--sets", default="hazelnut,tire,textile")
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--calibration", choices=("minmax", "percentile"), default="minmax")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=ROOT / "bundles" / "int8_encoder")
    a = ap.parse_args()
    set_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["machine"] = machine_stamp(1)
    doc["calibration"] = a.calibration
    if a.part == "accuracy":
        sets = a.sets.split(",")
        work = a.work / "_".join(sets)
        work.mkdir(parents=True, exist_ok=True)
        new = accuracy(sets, [int(x) for x in a.shots.split(",")], [int(x) for x in a.seeds.split(",")],
                       a.calibration, work)
        doc["runs"] = [r for r in doc.get("runs", []) if r["set"] not in sets] + new
        doc["summary"] = summary(doc["runs"])
    else:
        doc["latency"] = latency(a.calibration, a.work)
    print(write_result(a.out, NAME, doc, markdown(doc)))


if __name__ == "__main__":
    main()
