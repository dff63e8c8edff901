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

The int8 search (``scoring.search_precision = "int8"``, CPU) is a second graph,
``runtime/static/bank_search_int8.onnx``: MatMulInteger -> TopK over uint8 query rows (zero
point 128) and an int8 bank whose product is the quantized ``q.b - |b|^2 / 2``; it returns each
query's ``k`` best candidate rows (``k`` an input), which the runtime re-ranks in float32. Its
bank must be a constant for onnxruntime to pre-pack it once (as an input it is re-packed on
every call, twice the time), so the graph holds a 1x1 placeholder initializer ``bank_q`` that
the runtime replaces with the bundle's bank through ``SessionOptions.add_initializer``.
"""

from __future__ import annotations

from pathlib import Path

OPSET = 17
GRAPH_PATH = Path(__file__).resolve().parent.parent / "runtime" / "static" / "bank_search.onnx"
INT8_GRAPH_PATH = GRAPH_PATH.with_name("bank_search_int8.onnx")


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


def build_int8_search_graph() -> bytes:
    """Serialized ModelProto of MatMulInteger -> TopK(axis=1); the bank is a placeholder initializer.

    ``k`` is an input, not an attribute or initializer: shape inference would check a constant
    ``k`` against the 1x1 placeholder's width and refuse the graph.
    """
    from onnx import TensorProto, checker, helper

    queries = helper.make_tensor_value_info("queries_q", TensorProto.UINT8, ["N", "D1"])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    candidates = helper.make_tensor_value_info("candidates", TensorProto.INT64, ["N", "K"])
    placeholder = helper.make_tensor("bank_q", TensorProto.INT8, [1, 1], [0])
    zero_point = helper.make_tensor("queries_zero_point", TensorProto.UINT8, [], [128])
    graph = helper.make_graph(
        [
            helper.make_node("MatMulInteger", ["queries_q", "bank_q", "queries_zero_point"], ["closeness"],
                             name="quantized_closeness"),
            helper.make_node("TopK", ["closeness", "k"], ["best_closeness", "candidates"], name="candidate_rows",
                             axis=1),
        ],
        "o2n_bank_search_int8",
        [queries, k],
        [candidates],
        [placeholder, zero_point],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="o2n-edge")
    model.ir_version = 8
    checker.check_model(model)
    return model.SerializeToString()


def write_bank_search_graph(path: Path = GRAPH_PATH, int8_path: Path = INT8_GRAPH_PATH) -> list[Path]:
    """Regenerate the shipped graph files (run after changing a builder above)."""
    path.write_bytes(build_bank_search_graph())
    int8_path.write_bytes(build_int8_search_graph())
    return [path, int8_path]


if __name__ == "__main__":
    print(*write_bank_search_graph(), sep="\n")
