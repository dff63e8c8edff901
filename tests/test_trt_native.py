"""Native TensorRT: runs where a GPU and tensorrt exist; here it must fall back to ORT, and say why."""

from __future__ import annotations

import logging

import pytest

from o2n_edge.runtime.trt_session import trt_available


def test_trt_available_gives_a_reason() -> None:
    ok, why = trt_available()
    assert isinstance(ok, bool) and why


def test_trt_native_backend_falls_back_with_a_log_line(tmp_path, caplog) -> None:
    ok, _ = trt_available()
    if ok:
        pytest.skip("a GPU with tensorrt is present: the fallback path is not taken")
    from o2n_edge.runtime.pipeline import resolve_providers

    with caplog.at_level(logging.WARNING, logger="o2n_edge.runtime"):
        providers = resolve_providers("trt-native")
    assert providers[-1] == "CPUExecutionProvider"
    assert any("falling back" in r.message for r in caplog.records)
