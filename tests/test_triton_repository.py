"""`o2n-edge triton`: the repository layout, every config parsed by Triton's ModelConfig protobuf,
and the Python-backend models' logic against a stand-in ``triton_python_backend_utils``.

The BLS pipeline cannot be served here with onnxruntime graph models (the PyPI Triton has no
onnxruntime backend), so its logic runs in-process: the graph calls go, through the stand-in's
``InferenceRequest.exec``, to real ONNX Runtime sessions on the repository's graph files.
(`test_triton_server.py` also serves it on a real tritonserver with Python-backend graphs.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes_triton import FakePb, Request, Tensor
from PIL import Image
from typer.testing import CliRunner

from o2n_edge.cli import app
from o2n_edge.data.images import load_image
from o2n_edge.runtime.bundle import load_bundle
from o2n_edge.runtime.pipeline import OrtPipeline
from o2n_edge.triton import python_models as pm
from o2n_edge.triton.config import ConfigError, check_config
from o2n_edge.triton.repository import RepositoryOptions, write_repository

try:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
except ImportError:  # the model-logic tests below still run
    model_config_pb2 = json_format = None
needs_protobuf = pytest.mark.skipif(
    model_config_pb2 is None, reason="tritonclient missing: pip install 'o2n-edge[triton]'"
)

runner = CliRunner()
GRAPHS = ("image_encoder", "vae_encoder", "unet", "vae_decoder")
SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    return write_repository(tiny_bundle.bundle, out)


def parsed(repo_path: Path, model: str):
    return check_config((repo_path / model / "config.pbtxt").read_text(), model)


def params(msg) -> dict[str, str]:
    return {k: v.string_value for k, v in msg.parameters.items()}


@needs_protobuf
def test_layout_and_every_config_parses(repo, tiny_bundle) -> None:
    manifest = tiny_bundle.manifest
    expected = {"o2n_inspect", "o2n_pipeline", *(f"o2n_{g}" for g in GRAPHS)}
    assert set(repo.models) == expected
    assert {p.name for p in repo.path.iterdir()} == expected
    assert repo.checked and repo.linked
    for model in expected:
        msg = parsed(repo.path, model)
        assert msg.name == model
        assert params(msg)["bundle_hash"] == manifest["manifest_sha256"]
        assert msg.max_batch_size == repo.max_batch > 0
        assert msg.dynamic_batching.max_queue_delay_microseconds == 5000
        assert msg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    # graph models: onnxruntime backend, shapes from the bundle's export specs (batch axis dropped)
    for g in GRAPHS:
        msg = parsed(repo.path, f"o2n_{g}")
        entry = manifest["models"][g]
        assert msg.backend == "onnxruntime" and (repo.path / f"o2n_{g}/1/model.onnx").is_file()
        assert sorted(i.name for i in msg.input) == sorted(entry["inputs"])
        assert sorted(o.name for o in msg.output) == sorted(entry["outputs"])
        for t in msg.input:
            shape = entry["inputs"][t.name]["shape"][1:]
            if shape:
                assert list(t.dims) == [d if isinstance(d, int) else -1 for d in shape]
            else:  # per-sample scalar
                assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == []
    maxes = [p["max"][0] for g in GRAPHS for prof in manifest["models"][g]["trt_profiles"] for p in prof.values()]
    assert repo.max_batch == min(maxes)
    # inspect models: the documented tensors; the map at the scoring size
    for model in ("o2n_inspect", "o2n_pipeline"):
        msg = json_format.MessageToDict(parsed(repo.path, model))
        assert msg["backend"] == "python"
        assert [(i["name"], i["dataType"], i.get("optional", False)) for i in msg["input"]] == [
            ("IMAGE", "TYPE_STRING", True), ("IMAGE_RAW", "TYPE_UINT8", True)]
        outs = {o["name"]: o["dims"] for o in msg["output"]}
        size = str(manifest["image_size"])
        assert outs == {"SCORE": ["1"], "DECISION": ["1"], "THRESHOLD": ["1"], "ANOMALY_MAP": [size, size]}
    graphs = json.loads(params(parsed(repo.path, "o2n_pipeline"))["o2n_graph_models"])
    assert graphs == {g: f"o2n_{g}" for g in GRAPHS}


@needs_protobuf
def test_bundle_copies_verify_and_are_hard_links(repo, tiny_bundle) -> None:
    for model in ("o2n_inspect", "o2n_pipeline"):
        copy = load_bundle(repo.path / model / "1" / "bundle")  # verifies every hash
        assert copy.manifest["manifest_sha256"] == tiny_bundle.manifest["manifest_sha256"]
    src = Path(tiny_bundle.bundle) / "unet.onnx"
    assert os.stat(src).st_ino == os.stat(repo.path / "o2n_unet/1/model.onnx").st_ino
    model_py = (repo.path / "o2n_inspect/1/model.py").read_text()
    assert "class TritonPythonModel(_Model)" in model_py and "InspectModel as _Model" in model_py


@needs_protobuf
def test_config_check_can_fail() -> None:
    with pytest.raises(ConfigError, match="bad/config.pbtxt"):
        check_config('name: "x"\nmax_batch_size: "eight"\n', "bad/config.pbtxt")
    with pytest.raises(ConfigError):
        check_config("no_such_field: 1\n", "x")


@needs_protobuf
def test_options_python_graphs_gpu_and_atomic_replace(tiny_bundle, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "repo"
    opts = RepositoryOptions(name="hz", graph_backend="python", device="gpu", instances=2, max_batch=2)
    s = write_repository(tiny_bundle.bundle, out, opts)
    msg = parsed(out, "hz_unet")
    assert msg.backend == "python" and msg.max_batch_size == 2
    assert msg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert msg.instance_group[0].count == 2
    assert params(msg)["o2n_graph_file"] == "unet.onnx" and (out / "hz_unet/1/unet.onnx").is_file()
    assert params(parsed(out, "hz_inspect"))["o2n_backend"] == "cuda"
    assert s.models["hz_unet"] == "python"
    with pytest.raises(FileExistsError, match="--force"):
        write_repository(tiny_bundle.bundle, out, opts)
    # a failure half-way leaves the old repository in place and no temp folder behind
    import o2n_edge.triton.repository as repo_mod

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(repo_mod._Writer, "graph", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_repository(tiny_bundle.bundle, out, RepositoryOptions(force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert (out / "hz_unet").is_dir()
    monkeypatch.undo()
    write_repository(tiny_bundle.bundle, out, RepositoryOptions(force=True))
    assert (out / "o2n_unet").is_dir() and not (out / "hz_unet").exists()
    with pytest.raises(ValueError, match="--graph-backend"):
        write_repository(tiny_bundle.bundle, tmp_path / "r2", RepositoryOptions(graph_backend="tvm"))


@needs_protobuf
def test_cli(tiny_bundle, tmp_path: Path) -> None:
    res = runner.invoke(app, ["triton", str(tiny_bundle.bundle), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "o2n_pipeline" in res.output and "checked" in res.output
    res = runner.invoke(app, ["triton", str(tmp_path), "--out", str(tmp_path / "r3")])
    assert res.exit_code == 2 and "manifest.json" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["triton", str(tiny_bundle.bundle), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--force" in res.output


# -- the Python-backend models, in-process with a stand-in pb_utils ----------------------------


def _args(summary, model: str) -> dict[str, str]:
    """What Triton hands ``initialize``: the config as JSON (only its parameters are read)."""
    parameters = {p["key"]: p["value"] for p in summary.configs[model]["parameters"]}
    config = json.dumps({"name": model, "parameters": parameters})
    return {"model_config": config, "model_repository": str(summary.path / model), "model_version": "1"}


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def _images(shared_data: Path, n: int = 3) -> list[Path]:
    root = shared_data / "hazelnut_toy/hazelnut/test"
    return sorted(root.glob("*/*.jpg"))[:: max(1, len(list(root.glob("*/*.jpg"))) // n)][:n]


def _model(cls, pb: FakePb, summary, model: str):
    class Bound(cls):
        pass

    Bound.pb = pb
    m = Bound()
    m.initialize(_args(summary, model))
    return m


def _check_against_runtime(model, pb: FakePb, tiny_bundle, shared_data: Path) -> None:
    paths = _images(shared_data)
    expected = [r.score for r in OrtPipeline(tiny_bundle.bundle).inspect_batch([load_image(p) for p in paths])]
    encoded = [p.read_bytes() for p in paths]
    requests = [
        Request([Tensor("IMAGE", np.array([[encoded[0]]], dtype=object))]),
        Request([Tensor("IMAGE_RAW", load_image(paths[1])[None])]),
        Request([Tensor("IMAGE", np.array([[encoded[2][:300]]], dtype=object))]),  # truncated
        Request([Tensor("IMAGE", np.array([[encoded[2]], [encoded[0]]], dtype=object))]),  # batch of 2
        Request([]),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    good = {0: [expected[0]], 1: [expected[1]], 3: [expected[2], expected[0]]}
    for i, want in good.items():
        r = responses[i]
        assert not r.has_error(), r.error().message()
        out = {t.name(): t.as_numpy() for t in r.output_tensors}
        np.testing.assert_allclose(out["SCORE"][:, 0], want, atol=SCORE_ATOL, rtol=0)
        assert out["DECISION"].dtype == np.bool_ and out["THRESHOLD"][0, 0] == pytest.approx(model.pipeline.threshold)
        size = tiny_bundle.manifest["image_size"]
        assert out["ANOMALY_MAP"].shape == (len(want), size, size)
    for i in (2, 4):
        assert responses[i].has_error() and "invalid image" in responses[i].error().message()
        assert responses[i].error().code == pb.TritonError.INVALID_ARG


def test_self_contained_model_logic(repo, tiny_bundle, shared_data: Path) -> None:
    pb = FakePb()
    model = _model(pm.InspectModel, pb, repo, "o2n_inspect")
    _check_against_runtime(model, pb, tiny_bundle, shared_data)
    assert pb.calls == []  # nothing leaves the model


def test_bls_pipeline_logic_with_stand_in_graph_calls(tiny_bundle, shared_data: Path, tmp_path: Path) -> None:
    summary = write_repository(tiny_bundle.bundle, tmp_path / "repo", RepositoryOptions(graph_backend="python"))
    pb = FakePb()
    for g in GRAPHS:
        pb.models[f"o2n_{g}"] = _model(pm.GraphModel, pb, summary, f"o2n_{g}").execute
    model = _model(pm.PipelineModel, pb, summary, "o2n_pipeline")
    _check_against_runtime(model, pb, tiny_bundle, shared_data)
    assert set(pb.calls) == {f"o2n_{g}" for g in GRAPHS}
    # a failing graph model fails the batch with an error, never the model
    del pb.models["o2n_unet"]
    r = model.execute([Request([Tensor("IMAGE", np.array([[_png(_images(shared_data)[0])]], dtype=object))])])
    assert r[0].has_error() and "o2n_unet" in r[0].error().message()


def test_triton_side_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import o2n_edge.triton.repository, o2n_edge.triton.python_models\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_gpu_instance_runs_on_its_own_gpu() -> None:
    opts = pm._session_options({"o2n_backend": "cuda", "o2n_threads": "2"},
                               {"model_instance_kind": "GPU", "model_instance_device_id": "1"})
    assert opts.backend == "cuda" and opts.intra_op_threads == 2
    assert opts.provider_options["CUDAExecutionProvider"] == {"device_id": 1}
    assert pm._session_options({}, {"model_instance_kind": "CPU"}).provider_options == {}


@needs_protobuf
def test_tensorrt_plans_become_tensorrt_plan_models(tiny_bundle, tmp_path: Path, monkeypatch) -> None:
    """Where the bundle holds a plan valid on this machine (stand-in here: no GPU), it is served as is."""
    from types import SimpleNamespace

    import o2n_edge.runtime.engine_cache as engine_cache

    engines = tmp_path / "engines"
    engines.mkdir()
    plan = engines / "unet-stand-in.plan"
    plan.write_bytes(b"not a real plan")
    key = SimpleNamespace(profiles=({"sample": {"min": [1, 4, 8, 8], "opt": [1, 4, 8, 8], "max": [2, 4, 8, 8]}},))

    def fake_find_plans(cache_dir, name, onnx_path):
        return [(plan, key)] if name == "unet" else []

    monkeypatch.setattr(engine_cache, "find_plans", fake_find_plans)
    monkeypatch.setattr("o2n_edge.runtime.bundle.Bundle.engines_dir", property(lambda self: engines))
    with pytest.raises(ValueError, match="batch <= 2"):
        write_repository(tiny_bundle.bundle, tmp_path / "out" / "r1", RepositoryOptions(max_batch=4))
    s = write_repository(tiny_bundle.bundle, tmp_path / "out" / "r2", RepositoryOptions(max_batch=2))
    msg = parsed(s.path, "o2n_unet")
    assert msg.platform == "tensorrt_plan" and s.models["o2n_unet"] == "tensorrt_plan"
    assert (s.path / "o2n_unet/1/model.plan").read_bytes() == b"not a real plan"
    assert parsed(s.path, "o2n_vae_decoder").backend == "onnxruntime"
    s = write_repository(tiny_bundle.bundle, tmp_path / "out" / "r3", RepositoryOptions(max_batch=4, engines=False))
    assert s.models["o2n_unet"] == "onnxruntime"
