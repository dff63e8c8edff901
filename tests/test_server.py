"""The HTTP server against a FakeInspector: happy paths, every bad input, auth, limits, metrics.

Every rejection must be a 4xx JSON ``{"error", "detail"}`` and must leave the results log
unchanged; only accepted images produce a row.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from fakes import FAKE_BUNDLE_HASH, FakeInspector
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import o2n_edge.data.images as images_mod
from o2n_edge.data.images import decode_image
from o2n_edge.runtime import render
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.server import create_app

TOKEN = "s3cret-token"
SMALL_LIMIT = 4096
HYPOTHESIS_EXAMPLES = 100


# -- image builders -------------------------------------------------------------------------


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_png(value: int = 200, size: int = 32) -> bytes:
    return _save(Image.fromarray(np.full((size, size, 3), value, np.uint8)), "PNG")


def noise_png(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    return _save(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "PNG")


def noise_jpeg(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _save(Image.fromarray(arr), "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that *claims* width x height (valid IHDR + IEND, no pixel data): a bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png16(value16: int = 65535) -> bytes:
    return _save(Image.fromarray(np.full((32, 32), value16, np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (32, 32), (0, 0, 0, 0)), "JPEG")  # CMYK white


def palette_png() -> bytes:
    return _save(Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def rgba_png(alpha: int = 0) -> bytes:
    return _save(Image.new("RGBA", (32, 32), (255, 255, 255, alpha)), "PNG")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def make_client(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[TestClient, ResultsLog, FakeInspector]]]:
    """Factory: a TestClient over a fresh app + log; everything closed afterwards."""
    made: list[tuple[TestClient, ResultsLog]] = []

    def make(
        inspector: FakeInspector | None = None, **kw: object
    ) -> tuple[TestClient, ResultsLog, FakeInspector]:
        insp = inspector or FakeInspector()
        log = ResultsLog(tmp_path / f"log{len(made)}.db")
        client = TestClient(create_app(insp, log, **kw), raise_server_exceptions=False)
        made.append((client, log))
        return client, log, insp

    yield make
    for client, log in made:
        client.close()
        log.close()


def post_raw(client: TestClient, data: bytes, ctype: str = "application/octet-stream", **kw):
    return client.post("/v1/inspect", content=data, headers={"content-type": ctype, **kw})


def post_form(client: TestClient, data: bytes, field: str = "image", query: str = "", **kw):
    return client.post(f"/v1/inspect{query}", files={field: ("x.png", data, "image/png")}, **kw)


def assert_error(resp, status: int, *needles: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error", "detail"}, body
    assert "Traceback" not in resp.text
    for needle in needles:
        assert needle.lower() in (body["error"] + " " + body["detail"]).lower(), body
    return body


# -- happy paths ----------------------------------------------------------------------------


def test_multipart_and_raw_body(make_client) -> None:
    client, log, insp = make_client()
    data = noise_png(1)
    r1 = post_form(client, data)
    r2 = post_form(client, data, field="file")
    r3 = post_raw(client, data, "image/png")
    r4 = post_raw(client, data)  # octet-stream
    expected = insp.expected_score(decode_image(data))
    for r in (r1, r2, r3, r4):
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["score"] == pytest.approx(expected)
        assert j["decision"] == ("anomalous" if expected > insp.threshold else "normal")
        assert j["threshold"] == insp.threshold
        assert j["bundle_hash"] == FAKE_BUNDLE_HASH
        assert j["image_size"] == {"height": 48, "width": 48}
        assert len(j["request_id"]) >= 8 and r.headers["x-request-id"] == j["request_id"]
        for stage in ("queue", "decode", "inspect", "encode", "log", "request", "total"):
            assert stage in j["timings_ms"], j["timings_ms"]
        assert "anomaly_map" not in j and "views" not in j
    assert log.count() == 4
    rows = log.read()
    assert {r["image_sha256"] for r in rows} == {r1.json()["image_sha256"]}
    assert [r["id"] for r in rows] == [r.json()["log_id"] for r in (r1, r2, r3, r4)]
    assert rows[0]["bundle_hash"] == FAKE_BUNDLE_HASH and "decode" in rows[0]["timings"]
    assert rows[0]["source"].startswith("http ")


def test_decision_follows_threshold(make_client) -> None:
    client, log, _ = make_client()
    dark, bright = post_raw(client, rgb_png(20)).json(), post_raw(client, rgb_png(240)).json()
    assert (dark["decision"], dark["anomalous"]) == ("normal", False)
    assert (bright["decision"], bright["anomalous"]) == ("anomalous", True)
    assert [r["decision"] for r in log.read()] == ["normal", "anomalous"]


def test_map_and_views(make_client) -> None:
    client, _, insp = make_client()
    j = post_form(client, noise_png(2), query="?map=1&views=1&source=line-3").json()
    amap = j["anomaly_map"]
    gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(amap["png_base64"]))))
    assert gray.shape == (insp.image_size, insp.image_size) == tuple(amap["shape"])
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255  # the fake's left-right gradient
    assert amap["min"] == pytest.approx(0.0) and amap["max"] > 0
    for name in ("query", "normal", "overlay"):
        im = Image.open(io.BytesIO(base64.b64decode(j["views"][name])))
        assert im.format == "PNG" and im.size == (insp.image_size, insp.image_size)


def test_views_without_normal_or_map(make_client) -> None:
    client, _, _ = make_client(FakeInspector(with_normal=False, with_map=False))
    j = client.post("/v1/inspect?views=1&map=true", content=noise_png(3)).json()
    assert j["anomaly_map"] is None
    assert j["views"]["normal"] is None and j["views"]["overlay"] is None
    assert j["views"]["query"]


def test_source_and_request_id(make_client) -> None:
    client, log, _ = make_client()
    r = client.post(
        "/v1/inspect?source=line-7/cam-2",
        content=rgb_png(),
        headers={"content-type": "image/png", "x-request-id": "abc-123"},
    )
    assert r.json()["request_id"] == "abc-123"
    bad = client.post(
        "/v1/inspect", content=rgb_png(), headers={"x-request-id": "<script>" + "x" * 100}
    )
    assert bad.json()["request_id"] != "<script>" + "x" * 100  # untamed ids are replaced
    assert log.read()[0]["source"] == "line-7/cam-2"


@pytest.mark.parametrize(
    "name,data,expected_score",
    [
        ("16-bit PNG full scale -> 255", png16(65535), 255.0),
        ("16-bit PNG 257 -> 1", png16(257), 1.0),
        ("CMYK JPEG white", cmyk_jpeg(), None),
        ("palette PNG", palette_png(), 200.0),
        ("RGBA transparent -> black", rgba_png(0), 0.0),
        ("RGBA opaque white", rgba_png(255), 255.0),
    ],
)
def test_odd_modes_accepted(make_client, name: str, data: bytes, expected_score) -> None:
    """Documented conversions in o2n_edge.data.images: these are images, so 200."""
    client, log, insp = make_client()
    r = post_form(client, data)
    assert r.status_code == 200, (name, r.text)
    score = r.json()["score"]
    if expected_score is not None:
        assert score == pytest.approx(expected_score, abs=1.0), name
    else:
        assert score == pytest.approx(insp.expected_score(decode_image(data)))
    assert log.count() == 1


# -- rejections: right status, JSON error, log unchanged ------------------------------------

_RNG = random.Random(1234)
_JPEG = noise_jpeg(5)
_PNG = noise_png(5)

REJECTS = [
    ("zero bytes raw", lambda c: post_raw(c, b""), 400, "empty"),
    ("zero bytes multipart", lambda c: post_form(c, b""), 400, "empty"),
    ("random bytes", lambda c: post_raw(c, bytes(_RNG.getrandbits(8) for _ in range(512))), 400,
     "not a recognised image"),
    ("text as image/png", lambda c: post_raw(c, b"hello world", "image/png"), 400, "invalid image"),
    ("truncated JPEG", lambda c: post_raw(c, _JPEG[: len(_JPEG) // 2], "image/jpeg"), 400,
     "truncated"),
    ("truncated PNG", lambda c: post_form(c, _PNG[: len(_PNG) // 2]), 400, "truncated"),
    ("PNG header only (no data)", lambda c: post_raw(c, png_header_only(64, 64)), 400,
     "invalid image"),
    ("1x1 image", lambda c: post_raw(c, rgb_png(size=1)), 400, "too small"),
    ("huge image header (bomb)", lambda c: post_raw(c, png_header_only(100_000, 100_000)), 400,
     "decompression bomb"),
    ("text/plain", lambda c: post_raw(c, rgb_png(), "text/plain"), 415, "Content-Type"),
    ("application/json", lambda c: c.post("/v1/inspect", json={"image": "x"}), 415,
     "application/json"),
    ("urlencoded form", lambda c: c.post("/v1/inspect", data={"image": "x"}), 415,
     "unsupported"),
    ("multipart without image field", lambda c: post_form(c, rgb_png(), field="photo"), 422,
     "'image' or 'file'"),
    ("multipart image as text",
     lambda c: c.post("/v1/inspect", data={"image": "abc"}, files={"other": ("a", b"1")}),
     422, "file upload"),
    ("malformed multipart", lambda c: post_raw(c, b"--xx\r\ngarbage",
                                               "multipart/form-data; boundary=xx"), None, None),
    ("bad query flag", lambda c: c.post("/v1/inspect?map=maybe", content=rgb_png()), 422, "map"),
]


@pytest.mark.parametrize("name,send,status,needle", REJECTS, ids=[r[0] for r in REJECTS])
def test_rejects_change_nothing(make_client, name, send, status, needle) -> None:
    client, log, insp = make_client()
    before = log.count()
    r = send(client)
    if status is None:  # malformed multipart: 400 (parser error) or 422 (no parts) are both fine
        assert r.status_code in (400, 422), r.text
        assert_error(r, r.status_code)
    else:
        assert_error(r, status, needle)
    assert log.count() == before
    assert insp.calls == 0  # rejected before the model ran


def test_bomb_with_small_pixel_limit(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real, decodable image over MAX_PIXELS is refused before decoding."""
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 32 * 32 - 1)
    client, log, insp = make_client()
    assert_error(post_raw(client, rgb_png(size=32)), 400, "decompression bomb")
    assert log.count() == 0 and insp.calls == 0
    assert post_raw(client, rgb_png(size=16)).status_code == 200


def test_body_limit_413(make_client) -> None:
    client, log, _ = make_client(max_body_bytes=SMALL_LIMIT)
    big = noise_png(7, size=96)
    assert len(big) > SMALL_LIMIT
    assert_error(post_raw(client, big, "image/png"), 413, "exceeds")  # via Content-Length

    def chunks() -> Iterator[bytes]:  # no Content-Length: only the streamed size can tell
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post("/v1/inspect", content=chunks(), headers={"content-type": "image/png"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "exceeds")
    assert_error(post_form(client, big), 413)  # multipart counts the whole body
    assert log.count() == 0
    assert post_raw(client, rgb_png()).status_code == 200  # small images still pass
    assert log.count() == 1


def test_token_required(make_client) -> None:
    client, log, insp = make_client(token=TOKEN)
    r = post_raw(client, rgb_png())
    assert_error(r, 401, "missing bearer token")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(post_raw(client, rgb_png(), authorization="Bearer wrong"), 401, "wrong")
    assert_error(post_raw(client, rgb_png(), authorization=f"Basic {TOKEN}"), 401)
    assert_error(post_raw(client, rgb_png(), authorization=f"Bearer {TOKEN}x"), 401)
    assert_error(client.get("/v1/results"), 401)
    assert log.count() == 0 and insp.calls == 0
    # auth is checked before content: no token + bad content is still 401
    assert_error(post_raw(client, b"", "text/plain"), 401)
    ok = post_raw(client, rgb_png(), authorization=f"Bearer {TOKEN}")
    assert ok.status_code == 200
    results = client.get("/v1/results", headers={"authorization": f"Bearer {TOKEN}"})
    assert results.status_code == 200 and results.json()["total"] == 1
    for open_path in ("/healthz", "/readyz", "/metrics", "/"):
        assert client.get(open_path).status_code == 200, open_path


def test_queue_full_503(make_client) -> None:
    client, log, insp = make_client(max_queue=2)
    client.app.state.o2n.pending = 2  # as if two requests were in flight
    r = post_raw(client, rgb_png())
    assert_error(r, 503, "max_queue=2")
    assert int(r.headers["retry-after"]) >= 1
    assert log.count() == 0 and insp.calls == 0
    metrics = parse_metrics(client.get("/metrics").text)
    assert metrics["o2n_rejected_total"] == 1
    assert metrics["o2n_queue_depth"] == 2
    client.app.state.o2n.pending = 0
    assert post_raw(client, rgb_png()).status_code == 200


def test_unexpected_error_is_500_without_traceback(make_client, caplog) -> None:
    client, log, _ = make_client(FakeInspector(fail_with=RuntimeError("secret internals")))
    with caplog.at_level(logging.ERROR, logger="o2n_edge.server"):
        r = post_raw(client, rgb_png())
    body = assert_error(r, 500, "internal error")
    assert "secret internals" not in r.text and body.get("request_id")
    assert log.count() == 0
    assert any("secret internals" in (rec.exc_text or str(rec.exc_info)) for rec in caplog.records)


# -- health, readiness, metrics, results, page ----------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; fails on any malformed line."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")) or not line, line
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def test_health_ready_metrics(make_client) -> None:
    client, log, insp = make_client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["bundle_hash"] == FAKE_BUNDLE_HASH and ready["threshold"] == insp.threshold
    m0 = parse_metrics(client.get("/metrics").text)
    post_raw(client, rgb_png(20))
    post_raw(client, rgb_png(240))
    post_raw(client, b"")
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m1 = parse_metrics(r.text)
    key = 'o2n_http_requests_total{path="/v1/inspect",status="%d"}'
    assert m1[key % 200] - m0.get(key % 200, 0) == 2
    assert m1[key % 400] - m0.get(key % 400, 0) == 1
    assert m1['o2n_decisions_total{decision="normal"}'] == 1
    assert m1['o2n_decisions_total{decision="anomalous"}'] == 1
    assert m1["o2n_inspect_latency_seconds_count"] == 3
    assert m1['o2n_inspect_latency_seconds_bucket{le="+Inf"}'] == 3
    buckets = [v for k, v in m1.items() if k.startswith("o2n_inspect_latency_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert m1["o2n_queue_depth"] == 0 and m1["o2n_rejected_total"] == 0
    assert m1[f'o2n_bundle_info{{bundle_hash="{FAKE_BUNDLE_HASH}"}}'] == 1


# Dashboards and alert rules key on these names and types: a rename breaks them silently.
PINNED_METRICS = {
    "o2n_http_requests_total": "counter",
    "o2n_inspect_latency_seconds": "histogram",
    "o2n_decisions_total": "counter",
    "o2n_rejected_total": "counter",
    "o2n_queue_depth": "gauge",
    "o2n_queue_capacity": "gauge",
    "o2n_threshold": "gauge",
    "o2n_bundle_info": "gauge",
}


def test_metric_names_are_a_contract(make_client) -> None:
    client, _, insp = make_client(max_queue=3)
    post_raw(client, rgb_png(20))
    text = client.get("/metrics").text
    types = dict(
        line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE ")
    )
    for name, kind in PINNED_METRICS.items():
        assert types.get(name) == kind, (name, types.get(name))
    m = parse_metrics(text)
    assert m["o2n_queue_capacity"] == 3 and m["o2n_threshold"] == insp.threshold
    assert m['o2n_inspect_latency_seconds_bucket{le="0.005"}'] <= m[
        'o2n_inspect_latency_seconds_bucket{le="30.0"}'
    ]


def test_readyz_fails_when_log_unwritable(make_client) -> None:
    client, log, _ = make_client()
    log.close()
    assert_error(client.get("/readyz"), 503, "not ready")
    assert client.get("/healthz").status_code == 200  # alive, just not ready


def test_results_endpoint(make_client) -> None:
    client, _, _ = make_client()
    for v in (10, 20, 30):
        post_raw(client, rgb_png(v))
    j = client.get("/v1/results?limit=2").json()
    assert j["total"] == 3
    assert [round(r["score"]) for r in j["results"]] == [30, 20]  # newest first
    assert_error(client.get("/v1/results?limit=0"), 422)
    assert_error(client.get("/v1/results?since=notatime"), 400, "ISO")


def test_operator_page_and_docs(make_client) -> None:
    client, _, _ = make_client()
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for needle in ('id="file"', 'id="decision"', 'id="results"', "sessionStorage", "/v1/inspect"):
        assert needle in html
    assert "http://" not in html and "https://" not in html  # no CDN, no external fonts
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]
    assert_error(client.get("/nope"), 404)


def test_render_side_by_side_png() -> None:
    q = np.zeros((32, 32, 3), np.uint8)
    strip = Image.open(io.BytesIO(render.side_by_side_png(q, q[:16, :16], np.eye(8))))
    assert strip.size == (32 * 3 + 2 * render.STRIP_GAP, 32)
    hm = render.heatmap(np.array([[0.0, 1.0]]))
    assert tuple(hm[0, 0]) == (0, 0, 128) and tuple(hm[0, 1]) == (128, 0, 0)  # jet ends
    assert render.normalize_map(np.array([[np.nan, 1.0]])).tolist() == [[0.0, 0.0]]


# -- property: arbitrary bytes never crash the server and never log a non-200 ----------------


def _mutated_png() -> st.SearchStrategy[bytes]:
    base = noise_png(9, size=16)

    def mutate(args: tuple[int, int, int]) -> bytes:
        cut, pos, val = args
        data = bytearray(base[: max(0, len(base) - cut)])
        if data:
            data[pos % len(data)] = val
        return bytes(data)

    return st.tuples(
        st.integers(0, len(base)), st.integers(0, 10_000), st.integers(0, 255)
    ).map(mutate)


def test_arbitrary_bytes_never_500(make_client) -> None:
    client, log, _ = make_client(max_body_bytes=SMALL_LIMIT)
    statuses: list[int] = []
    valid = noise_png(9, size=16)

    @settings(
        max_examples=HYPOTHESIS_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
        database=None,
    )
    @given(
        data=st.one_of(
            st.binary(max_size=SMALL_LIMIT + 512),
            st.binary(min_size=SMALL_LIMIT - 64, max_size=SMALL_LIMIT + 512),  # around the limit
            _mutated_png(),
            st.just(valid),
        ),
        ctype=st.sampled_from(
            ["application/octet-stream", "image/png", "image/jpeg", "multipart", "text/plain"]
        ),
    )
    def check(data: bytes, ctype: str) -> None:
        if ctype == "multipart":
            r = post_form(client, data)
        else:
            r = post_raw(client, data, ctype)
        assert r.status_code in {200, 400, 413, 415}, (r.status_code, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)
        statuses.append(r.status_code)
        assert log.count() == statuses.count(200)

    check()
    assert len(statuses) >= HYPOTHESIS_EXAMPLES // 2
    print("hypothesis statuses:", {s: statuses.count(s) for s in sorted(set(statuses))})
    assert {200, 400, 413, 415} <= set(statuses)


def test_server_modules_never_import_torch() -> None:
    """Runtime rule: importing the server stack must not pull torch in, even indirectly."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import o2n_edge.runtime.server, o2n_edge.runtime.results_log, o2n_edge.runtime.render\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
