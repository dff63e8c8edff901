"""The repository on a REAL tritonserver (the one the PyPI wheel nvidia-pytriton carries), CPU only.

What runs: the self-contained Python-backend model (its scores equal `o2n-edge infer` on the same
images within 1e-5; a corrupt image gets an error and the server keeps serving; concurrent
clients through tritonclient HTTP and gRPC get the right answers), and the BLS pipeline with
Python-backend graph models (`--graph-backend python`), since this Triton has no onnxruntime
backend. The server listens on 127.0.0.1 only, on free ports. Skips, with the reason, where the
wheel cannot run (not x86-64 Linux, glibc < 2.35, no libpython shared library, not installed).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from o2n_edge.cli import app
from o2n_edge.data.images import load_image
from benchmarks.triton_server import LocalTriton, unavailable
from o2n_edge.triton.repository import RepositoryOptions, write_repository

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"real tritonserver cannot run here: {WHY}")

SCORE_ATOL = 1e-5
CLIENTS = 4  # per protocol
REQUESTS_PER_CLIENT = 3
runner = CliRunner()


def _images(shared_data: Path) -> list[Path]:
    root = shared_data / "hazelnut_toy/hazelnut/test"
    paths = sorted(root.glob("*/*.jpg"))
    return paths[:: max(1, len(paths) // 4)][:4]


@pytest.fixture(scope="module")
def expected(tiny_bundle, shared_data: Path) -> dict[Path, float]:
    """`o2n-edge infer --json` on the same images: the reference every answer must match."""
    paths = _images(shared_data)
    res = runner.invoke(app, ["infer", "--bundle", str(tiny_bundle.bundle), *map(str, paths), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("["):])
    return {p: row["score"] for p, row in zip(paths, rows)}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    """The full repository on disk; only the self-contained model loaded (explicit control)."""
    out = tmp_path_factory.mktemp("triton-real") / "model_repository"
    write_repository(tiny_bundle.bundle, out, RepositoryOptions(queue_delay_us=2000))
    with LocalTriton(out, models=["o2n_inspect"]) as triton:
        yield triton


def _infer_http(url: str, model: str, data: bytes):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=object))
    try:
        return client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput(n) for n in
                                                   ("SCORE", "DECISION", "THRESHOLD", "ANOMALY_MAP")])
    finally:
        client.close()


def _infer_grpc(url: str, model: str, data: bytes):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=object))
    try:
        return client.infer(model, [inp])
    finally:
        client.close()


def test_scores_equal_infer_cli(server, expected, tiny_bundle) -> None:
    import tritonclient.http as httpclient

    for path, score in expected.items():
        r = _infer_http(server.http_url, "o2n_inspect", path.read_bytes())
        assert abs(float(r.as_numpy("SCORE")[0, 0]) - score) <= SCORE_ATOL, path
        threshold = float(r.as_numpy("THRESHOLD")[0, 0])
        assert threshold == pytest.approx(tiny_bundle.manifest["threshold"]["value"])
        assert bool(r.as_numpy("DECISION")[0, 0]) == (score > threshold)
        size = tiny_bundle.manifest["image_size"]
        assert r.as_numpy("ANOMALY_MAP").shape == (1, size, size)
    # raw uint8 HxWx3 gives the same score as the encoded file
    path = next(iter(expected))
    client = httpclient.InferenceServerClient(server.http_url)
    raw = load_image(path)[None]
    inp = httpclient.InferInput("IMAGE_RAW", list(raw.shape), "UINT8")
    inp.set_data_from_numpy(raw)
    r = client.infer("o2n_inspect", [inp])
    assert abs(float(r.as_numpy("SCORE")[0, 0]) - expected[path]) <= SCORE_ATOL
    # the bundle hash travels as model metadata (config parameter)
    config = client.get_model_config("o2n_inspect")
    assert config["parameters"]["bundle_hash"]["string_value"] == tiny_bundle.manifest["manifest_sha256"]
    client.close()


def test_corrupt_image_is_an_error_and_the_server_keeps_serving(server, expected) -> None:
    from tritonclient.utils import InferenceServerException

    path, score = next(iter(expected.items()))
    for bad in (path.read_bytes()[:400], b"", b"not an image at all"):
        with pytest.raises(InferenceServerException, match="invalid image"):
            _infer_http(server.http_url, "o2n_inspect", bad)
    assert server.alive() and server.ready()
    r = _infer_grpc(server.grpc_url, "o2n_inspect", path.read_bytes())
    assert abs(float(r.as_numpy("SCORE")[0, 0]) - score) <= SCORE_ATOL


def test_concurrent_http_and_grpc_clients(server, expected) -> None:
    items = list(expected.items())
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int, grpc: bool) -> int:
        done = 0
        for j in range(REQUESTS_PER_CLIENT):
            path, score = items[(k + j) % len(items)]
            r = (_infer_grpc if grpc else _infer_http)(
                server.grpc_url if grpc else server.http_url, "o2n_inspect", path.read_bytes())
            got = float(r.as_numpy("SCORE")[0, 0])
            if abs(got - score) > SCORE_ATOL:
                with lock:
                    errors.append(f"{'grpc' if grpc else 'http'} {path.name}: {got} != {score}")
            done += 1
        return done

    with ThreadPoolExecutor(2 * CLIENTS) as pool:
        futures = [pool.submit(client, k, grpc) for k in range(CLIENTS) for grpc in (False, True)]
        total = sum(f.result() for f in futures)
    assert not errors, errors
    assert total == 2 * CLIENTS * REQUESTS_PER_CLIENT and server.alive()


def test_bls_pipeline_on_a_real_server(tiny_bundle, expected, tmp_path: Path) -> None:
    """The BLS model calling Python-backend graph models through Triton itself."""
    out = tmp_path / "model_repository"
    write_repository(tiny_bundle.bundle, out, RepositoryOptions(graph_backend="python"))
    models = ["o2n_pipeline", "o2n_image_encoder", "o2n_vae_encoder", "o2n_unet", "o2n_vae_decoder"]
    with LocalTriton(out, models=models) as triton:
        for path, score in expected.items():
            r = _infer_grpc(triton.grpc_url, "o2n_pipeline", path.read_bytes())
            assert abs(float(r.as_numpy("SCORE")[0, 0]) - score) <= SCORE_ATOL, path
