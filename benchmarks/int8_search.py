"""The int8 bank search on real features: how often it finds the exact nearest row, and where its time goes.

Why: the lite default searches its bank in int8 on a CPU (``runtime.bank_search.Int8BankSearch``):
an int8 product proposes each patch's best rows and float32 re-ranks them. Whether that changes
scores is measured end to end by ``benchmarks.accuracy_v2 --search-precision``; this study shows
the mechanism behind it on one bundle: the share of patches whose int8 candidates hold the exact
nearest row (1, 2, 4, 8 candidates), how much farther the chosen row is where they miss, and the
time of the product, the candidate selection and the re-rank against the float32 search, and
the product's time with a third of the width (48 principal axes): its cost is the (patches x
rows) int32 output, not the dimension.

Bundle: the tire default of ``benchmarks.latency_settings`` (4 shots, seed 0, 448 px), the
queries every 10th tire test image, 1 thread.

Usage: python -m benchmarks.int8_search [--bundle DIR] [--data ../shared/data] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_result

NAME = "int8_search"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "bundles" / "latency_v5" / "v5_default_448_px,_int8_search"
CANDIDATES = (1, 2, 4, 8)


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def recall(search, bank: np.ndarray, queries: list[np.ndarray]) -> list[dict]:
    """Per candidate count: share of patches given the exact nearest row, and the distance ratio."""
    from o2n_edge.runtime import bank_search
    from o2n_edge.runtime.scoring import knn_distance

    rows = []
    saved = bank_search.INT8_CANDIDATES
    try:
        exact = [knn_distance(q, bank) for q in queries]
        for k in CANDIDATES:
            bank_search.INT8_CANDIDATES = k
            got = [knn_distance(q, bank, search) for q in queries]
            ratio = np.concatenate([g / np.maximum(e, 1e-12) for g, e in zip(got, exact)])
            rows.append({"candidates": k, "exact_share": float(np.mean(ratio <= 1 + 1e-9)),
                         "mean_ratio": float(ratio.mean()), "max_ratio": float(ratio.max())})
    finally:
        bank_search.INT8_CANDIDATES = saved
    return rows


def timing(search, bank: np.ndarray, q: np.ndarray, repeats: int) -> dict:
    """Median ms per image of each part, 3,136 patches against the bank."""
    import onnxruntime as ort

    from o2n_edge.runtime.bank_search import INT8_CHUNK, NumpyBankSearch

    rows = search.quantize(q)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the cut graph's output shape is inferred from the 1x1 placeholder: a warning per run
    bank_value = ort.OrtValue.ortvalue_from_numpy(search.bank_q)  # its own copy, as a session of its own
    options.add_initializer("bank_q", bank_value)
    # the product alone: the shipped graph cut before its TopK (onnx builds it, as export does)
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["queries_q", "bank_q", "zp"], ["closeness"])], "product",
        [helper.make_tensor_value_info("queries_q", TensorProto.UINT8, ["N", "D1"])],
        [helper.make_tensor_value_info("closeness", TensorProto.INT32, ["N", "M"])],
        [helper.make_tensor("bank_q", TensorProto.INT8, [1, 1], [0]), helper.make_tensor("zp", TensorProto.UINT8, [], [128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    product = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    numpy_search = NumpyBankSearch(bank)
    chunks = range(0, len(rows), INT8_CHUNK)
    # the same candidates from 48 principal axes instead of 152 dimensions: does the width matter?
    from o2n_edge.runtime.bank_search import Int8BankSearch, principal_axes

    mean, basis = principal_axes(bank, 48)
    mean32, basis32 = mean.astype(np.float32), basis.astype(np.float32)
    narrow = Int8BankSearch((bank - mean32) @ basis32, threads=1)
    return {
        "product_and_topk_48_axes_ms": _best_ms(lambda: narrow.candidates((q - mean32) @ basis32), repeats),
        "quantize_ms": _best_ms(lambda: search.quantize(q), repeats),
        "product_ms": _best_ms(lambda: [product.run(None, {"queries_q": rows[i:i + INT8_CHUNK]}) for i in chunks],
                               repeats),
        "product_and_topk_ms": _best_ms(lambda: search.candidates(q), repeats),
        "int8_search_ms": _best_ms(lambda: search(q), repeats),
        "float32_search_ms": _best_ms(lambda: [numpy_search(q[i:i + 256]) for i in range(0, len(q), 256)], repeats),
    }


def markdown(doc: dict) -> str:
    t = doc["timing"]
    lines = [f"# {NAME}", "", *stamp_lines(doc["machine"]), "",
             f"Bundle `{doc['bundle']}` (bank {doc['bank_rows']} x {doc['dim']}), {doc['images']} tire test images "
             f"({doc['patches']} patches each), 1 thread. Written by `python -m benchmarks.int8_search`.", "",
             "## Does the int8 product propose the exact nearest row?", "",
             "| candidates re-ranked | patches given the exact nearest row | mean distance ratio | max distance ratio |",
             "|---|---|---|---|"]
    for r in doc["recall"]:
        lines.append(f"| {r['candidates']} | {100 * r['exact_share']:.2f}% | {r['mean_ratio']:.6f} | {r['max_ratio']:.4f} |")
    lines += ["", "## Time per image (median ms)", "", "| part | ms |", "|---|---|",
              f"| quantize the queries | {t['quantize_ms']:.1f} |",
              f"| int8 product (MatMulInteger) alone | {t['product_ms']:.1f} |",
              f"| product + best {doc['shipped_candidates']} (the shipped graph) | {t['product_and_topk_ms']:.1f} |",
              f"| the same in the bank's first 48 principal axes (projection included) | "
              f"{t['product_and_topk_48_axes_ms']:.1f} |",
              f"| the whole int8 search (with the float32 re-rank) | {t['int8_search_ms']:.1f} |",
              f"| the float32 search it replaces (numpy, chunks of 256) | {t['float32_search_ms']:.1f} |", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    set_threads(1)
    from o2n_edge.runtime.bank_search import INT8_CANDIDATES, Int8BankSearch
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    if not (a.bundle / "manifest.json").exists():
        raise SystemExit(f"{a.bundle}: no bundle; run python -m benchmarks.latency_settings first (it exports it)")
    pipe = OrtPipeline(a.bundle, SessionOptions(intra_op_threads=1))
    bank = pipe.scorer.reference.memory_bank.astype(np.float32)
    paths = sorted((a.data / "mvtec3d_rgb" / "tire" / "test").glob("*/*.png"))[::10]
    queries = [pipe.encode(pipe.decode(p.read_bytes(), p.name)[None])["patch"].reshape(-1, bank.shape[1])
               for p in paths]
    search = Int8BankSearch(bank, threads=1)
    doc = {"machine": machine_stamp(1), "bundle": str(a.bundle.relative_to(ROOT) if a.bundle.is_relative_to(ROOT)
                                                       else a.bundle),
           "bank_rows": int(bank.shape[0]), "dim": int(bank.shape[1]), "images": len(paths),
           "patches": int(queries[0].shape[0]), "shipped_candidates": INT8_CANDIDATES,
           "recall": recall(search, bank, queries), "timing": timing(search, bank, queries[0], a.repeats)}
    print(write_result(a.out, NAME, doc, markdown(doc)))


if __name__ == "__main__":
    main()
