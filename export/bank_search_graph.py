"""The ONNX graph of the memory-bank nearest-neighbour search, shipped inside the runtime package.

Why a graph at all: the search is one (queries x bank) matrix product and an argmin, which is
most of the scoring time of a line-side image. As a graph it runs on the same execution provider
as the models (cuBLAS on a GPU, with the bank bound on the device once); on the CPU the pipeline
uses numpy's BLAS instead, which measured twice as fast as MLAS for this product.

Why the bank is an input, not an initializer: one small graph serves every bundle, the bank is
not stored twice, and on a GPU the pipeline binds the bank once and reuses it.

The runtime may not import ``onnx``, so the graph is written once by this module into
``runtime/static/bank_search.onnx``; a test rebuilds it and compares bytes.

Inputs: ``queries`` (N, D+1) float32, the query rows with a trailing 1; ``bank_t`` (D+1, M)
float32, the bank's rows as ``[-2 b, |b|^2]`` transposed. Their product is ``|b|^2 - 2 q.b``, the
squared distance less the per-row constant ``|q|^2``, so its argmin is the nearest bank row.
Output: ``nearest`` (N,) int64.
"""

from __future__ import annotations

from pathlib import Path

OPSET = 17
GRAPH_PATH = Path(__file__).resolve().parent.parent / "runtime" / "static" / "bank_search.onnx"


def build_bank_search_graph() -> bytes:
    """Serialized ModelProto of MatMul -> ArgMin(axis=1) with symbolic N, D1, M."""
    from onnx import TensorProto, checker, helper

    queries = helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["N", "D1"])
    bank_t = helper.make_tensor_value_info("bank_t", TensorProto.FLOAT, ["D1", "M"])
    nearest = helper.make_tensor_value_info("nearest", TensorProto.INT64, ["N"])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["queries", "bank_t"], ["partial_d2"], name="partial_squared_distance"),
            helper.make_node("ArgMin", ["partial_d2"], ["nearest"], name="nearest_row", axis=1, keepdims=0),
        ],
        "o2n_bank_search",
        [queries, bank_t],
        [nearest],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="o2n-edge")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14 the runtime supports
    checker.check_model(model)
    return model.SerializeToString()


def write_bank_search_graph(path: Path = GRAPH_PATH) -> Path:
    """Regenerate the shipped graph file (run after changing :func:`build_bank_search_graph`)."""
    path.write_bytes(build_bank_search_graph())
    return path


if __name__ == "__main__":
    print(write_bank_search_graph())
