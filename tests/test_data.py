"""Data layer: real MVTec-layout data, textile split, synthetic VisA/folder layouts, bad images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from o2n_edge.data import (
    MIN_SIDE,
    Dataset,
    DatasetError,
    ImageError,
    decode_image,
    detect_layout,
    list_categories,
    load_dataset,
    load_image,
    load_mask,
    sample_shots,
)
from o2n_edge.data import images as images_mod

RNG_SEED = 1234


# ---------------------------------------------------------------------------------- helpers
def _noise(h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray) -> bytes:
    return _encode(Image.fromarray(arr), "PNG")


def _write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` with no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _assert_rgb(arr: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if shape is not None:
        assert arr.shape[:2] == shape


# ------------------------------------------------------------------------ real MVTec data
def test_hazelnut_toy_layout(shared_data: Path) -> None:
    root = shared_data / "hazelnut_toy"
    assert detect_layout(root, "hazelnut") == "mvtec"
    assert list_categories(root) == ["hazelnut"]
    ds = load_dataset(root, None, "hazelnut")
    assert ds.name == "mvtec" and ds.category == "hazelnut" and ds.root == root
    assert len(ds.train_good) == 28 and all(p.suffix == ".jpg" for p in ds.train_good)
    assert ds.train_good == sorted(ds.train_good)
    goods = [s for s in ds.test if s.label == 0]
    bad = [s for s in ds.test if s.label == 1]
    assert len(goods) == 6 and len(bad) == 17
    assert ds.defect_types == ["colour"] and ds.has_masks and ds.val_good == []
    assert all(s.mask_path is None for s in goods)
    assert all(s.mask_path and s.mask_path.name == f"{s.path.stem}_mask.png" for s in bad)
    assert ds.labels.tolist() == [s.label for s in ds.test] and ds.labels.sum() == 17
    # Explicit name works too; the loader is deterministic.
    again = load_dataset(str(root), "mvtec", "hazelnut")
    assert again.test == ds.test and again.train_good == ds.train_good


def test_hazelnut_images_and_masks(shared_data: Path) -> None:
    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    img = load_image(ds.train_good[0])
    _assert_rgb(img, (512, 512))
    _assert_rgb(load_image(ds.train_good[0], size=64), (64, 64))
    _assert_rgb(load_image(ds.train_good[0], size=(40, 24)), (24, 40))  # (width, height)
    bad = next(s for s in ds.test if s.label == 1)
    mask = load_mask(bad.mask_path, (512, 512))
    assert mask.dtype == bool and mask.shape == (512, 512) and 0 < mask.sum() < mask.size
    small = load_mask(bad.mask_path, (64, 32))
    assert small.shape == (64, 32) and small.any()
    assert not load_mask(None, (5, 7)).any() and load_mask(None, (5, 7)).shape == (5, 7)


def test_mvtec3d_tire_layout(shared_data: Path) -> None:
    root = shared_data / "mvtec3d_rgb"
    ds = load_dataset(root, "auto", "tire")
    assert ds.name == "mvtec"
    assert len(ds.train_good) == 60 and len(ds.val_good) == 29
    counts = {t: sum(s.defect == t for s in ds.test) for t in ["good", *ds.defect_types]}
    assert counts == {"good": 25, "combined": 5, "contamination": 28, "cut": 27, "hole": 27}
    assert ds.has_masks
    assert not set(ds.val_good) & set(ds.train_good)
    bad = next(s for s in ds.test if s.defect == "cut")
    img = load_image(bad.path)
    _assert_rgb(img, (400, 300))
    mask = load_mask(bad.mask_path, img.shape[:2])
    assert mask.shape == (400, 300) and mask.any()


def test_mvtec3d_native_rgb_gt_subfolders(tmp_path: Path) -> None:
    cat = tmp_path / "tire"
    _write_png(cat / "train/good/rgb/000.png", _noise())
    _write_png(cat / "test/good/rgb/000.png", _noise())
    _write_png(cat / "test/cut/rgb/000.png", _noise())
    m = np.zeros((32, 48), np.uint8)
    m[4:9, 4:9] = 255
    _write_png(cat / "test/cut/gt/000.png", m)
    ds = load_dataset(tmp_path, None, "tire")
    assert [p.name for p in ds.train_good] == ["000.png"]
    cut = next(s for s in ds.test if s.label == 1)
    assert cut.mask_path == cat / "test/cut/gt/000.png" and ds.has_masks
    assert load_mask(cut.mask_path, (32, 48)).sum() == 25


# ------------------------------------------------------------------------------- textile
def test_textile_fixed_split() -> None:
    pytest.importorskip("conformal_clip_data")
    ds = load_dataset(None, "textile", "textile")
    assert ds.name == "textile" and not ds.has_masks
    assert len(ds.train_good) == 100 and len(ds.val_good) == 50
    assert len(ds.test) == 300 and ds.labels.sum() == 150
    assert ds.defect_types == ["global", "local"]
    assert sum(s.defect == "good" for s in ds.test) == 150
    assert sum(s.defect == "local" for s in ds.test) == 75
    goods = {s.path for s in ds.test if s.label == 0}
    assert not goods & set(ds.train_good) and not goods & set(ds.val_good)
    assert not set(ds.train_good) & set(ds.val_good)
    assert ds.train_good[0].name == "textile_0001.jpg" and ds.train_good == sorted(ds.train_good)
    assert list_categories(Path("/nonexistent"), "textile") == ["textile"]
    with pytest.raises(DatasetError, match="textile"):
        load_dataset(None, "textile", "hazelnut")


# ----------------------------------------------------------------------- synthetic layouts
def _make_visa(root: Path, cat: str = "candle", n_normal: int = 6, n_anom: int = 3) -> None:
    for i in range(n_normal):
        _write_png(root / cat / "Data/Images/Normal" / f"{i:04d}.JPG", _noise(seed=i))
    for i in range(n_anom):
        _write_png(root / cat / "Data/Images/Anomaly" / f"{i:03d}.JPG", _noise(seed=100 + i))
        m = np.zeros((32, 48), np.uint8)
        m[2:6, 2:6] = 1  # VisA masks are 0/1, not 0/255
        _write_png(root / cat / "Data/Masks/Anomaly" / f"{i:03d}.png", m)
    (root / cat / "Data/Images/Normal/.DS_Store").write_bytes(b"junk")
    (root / cat / "Data/Images/Normal/notes.txt").write_text("not an image")


def test_visa_without_csv(tmp_path: Path) -> None:
    _make_visa(tmp_path)
    assert detect_layout(tmp_path, "candle") == "visa"
    ds = load_dataset(tmp_path, None, "candle")
    assert ds.name == "visa" and len(ds.train_good) == 3
    goods = [s.path for s in ds.test if s.label == 0]
    assert len(goods) == 3 and not set(goods) & set(ds.train_good)
    assert ds.labels.sum() == 3 and ds.has_masks and ds.defect_types == ["anomaly"]
    bad = next(s for s in ds.test if s.label == 1)
    assert load_mask(bad.mask_path, (32, 48)).sum() == 16
    assert load_dataset(tmp_path, "visa", "candle").train_good == ds.train_good


def test_visa_with_split_csv(tmp_path: Path) -> None:
    _make_visa(tmp_path)
    _make_visa(tmp_path, "pcb1", n_normal=2, n_anom=1)
    rows = ["object,split,label,image,mask"]
    rows += [f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG," for i in range(4)]
    rows += [f"candle,test,normal,candle/Data/Images/Normal/{i:04d}.JPG," for i in range(4, 6)]
    rows += [
        f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,"
        f"candle/Data/Masks/Anomaly/{i:03d}.png"
        for i in range(3)
    ]
    rows += ["pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,"]
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_categories(tmp_path) == ["candle", "pcb1"]  # split_csv/ is not a category
    ds = load_dataset(tmp_path, "visa", "candle")
    assert [p.name for p in ds.train_good] == [f"{i:04d}.JPG" for i in range(4)]
    assert len(ds.test) == 5 and ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.has_masks
    # An explicit csv elsewhere overrides the default one.
    other = tmp_path / "mine.csv"
    other.write_text("\n".join(rows[:2] + rows[5:6]) + "\n")
    ds2 = load_dataset(tmp_path, "visa", "candle", split_csv=other)
    assert len(ds2.train_good) == 1 and len(ds2.test) == 1
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("object,split,label,image\ncandle,train,normal,candle/missing.JPG\n")
    with pytest.raises(DatasetError, match="missing.JPG"):
        load_dataset(tmp_path, "visa", "candle", split_csv=bad_csv)
    bad_csv.write_text("object,image\ncandle,x\n")
    with pytest.raises(DatasetError, match="expected columns"):
        load_dataset(tmp_path, "visa", "candle", split_csv=bad_csv)
    with pytest.raises(DatasetError, match="no rows for 'capsules'"):
        _make_visa(tmp_path, "capsules", 2, 0)
        load_dataset(tmp_path, "visa", "capsules")


def test_folder_layout(tmp_path: Path) -> None:
    cat = tmp_path / "widget"
    for i in range(7):
        _write_png(cat / "good" / f"g{i}.png", _noise(seed=i))
    for i in range(2):
        _write_png(cat / "scratch" / f"s{i}.png", _noise(seed=10 + i))
    _write_png(cat / "dent" / "d0.bmp", _noise(seed=20))
    m = np.zeros((32, 48), np.uint8)
    m[0:3, 0:3] = 255
    _write_png(cat / "masks/scratch/s0.png", m)
    _write_png(cat / "masks/s1.png", m)
    ds = load_dataset(tmp_path, "auto", "widget")
    assert ds.name == "folder" and len(ds.train_good) == 3
    assert sum(s.label == 0 for s in ds.test) == 4
    assert ds.defect_types == ["dent", "scratch"]
    masks = {s.path.name: s.mask_path for s in ds.test if s.label == 1}
    assert masks["s0.png"] == cat / "masks/scratch/s0.png"
    assert masks["s1.png"] == cat / "masks/s1.png"
    assert masks["d0.bmp"] is None and not ds.has_masks
    # The split depends on file names only: a new good image leaves the others where they were.
    _write_png(cat / "good" / "g7.png", _noise(seed=7))
    ds2 = load_dataset(tmp_path, "folder", "widget")
    assert len(set(ds.train_good) & set(ds2.train_good)) >= 3


def test_dataset_errors(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = shared_data / "hazelnut_toy"
    with pytest.raises(DatasetError, match="categories there: hazelnut"):
        load_dataset(root, None, "nope")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(tmp_path / "missing_root", "mvtec", "x")
    (tmp_path / "odd" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="MVTec AD.*\n.*VisA.*\n.*folder"):
        detect_layout(tmp_path, "odd")
    with pytest.raises(DatasetError, match="MVTec AD layout"):
        load_dataset(tmp_path, "mvtec", "odd")
    (tmp_path / "odd" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/good with images"):
        load_dataset(tmp_path, "mvtec", "odd")
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset(root, "kaggle", "hazelnut")
    with pytest.raises(DatasetError, match="single directory name"):
        load_dataset(root, None, "../hazelnut_toy")
    monkeypatch.delenv("O2N_DATA", raising=False)
    with pytest.raises(DatasetError, match="--data.*O2N_DATA"):
        load_dataset(None, None, "hazelnut")
    monkeypatch.setenv("O2N_DATA", str(root))
    assert len(load_dataset(None, None, "hazelnut").train_good) == 28


def test_textile_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "conformal_clip_data", None)  # import now fails
    with pytest.raises(DatasetError, match=r"pip install 'o2n-edge\[demo\]'"):
        load_dataset(None, "textile", "textile")


# ------------------------------------------------------------------------------ sampling
def test_sample_shots_seeded_nested() -> None:
    pool = [Path(f"{i:03d}.png") for i in range(28)]
    a = sample_shots(pool, 4, seed=0)
    assert a == sample_shots(pool, 4, seed=0) and len(set(a)) == 4 and set(a) <= set(pool)
    assert sample_shots(pool, 2, seed=0) == a[:2] and sample_shots(pool, 1, seed=0) == a[:1]
    assert sample_shots(pool, 8, seed=0)[:4] == a
    assert any(sample_shots(pool, 4, seed=s) != a for s in range(1, 4))
    assert sorted(sample_shots(pool, 28, seed=3)) == pool
    for k in (0, 29, -1):
        with pytest.raises(ValueError, match="28 training good images"):
            sample_shots(pool, k, seed=0)
    with pytest.raises(ValueError):
        sample_shots(pool, 2.0, seed=0)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- image decoding
def test_decode_good_png_and_jpeg() -> None:
    arr = _noise()
    assert np.array_equal(decode_image(_png_bytes(arr)), arr)
    _assert_rgb(decode_image(_encode(Image.fromarray(arr), "JPEG")), (32, 48))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"hello, this is not an image at all" * 10, "not a recognised image"),
        (np.random.default_rng(RNG_SEED).bytes(4096), "not a recognised"),
    ],
    ids=["zero-bytes", "text", "random-bytes"],
)
def test_decode_rejects_non_images(data: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match) as info:
        decode_image(data, name="upload.png")
    assert "upload.png" in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_decode_rejects_truncated(fmt: str, keep: float) -> None:
    data = _encode(Image.fromarray(_noise(64, 64)), fmt)
    with pytest.raises(ImageError, match="truncated|corrupt"):
        decode_image(data[: int(len(data) * keep)], name="cut")


def test_decode_rejects_truncated_real_files(shared_data: Path) -> None:
    for rel in ["hazelnut_toy/hazelnut/train/good/00.jpg", "mvtec3d_rgb/tire/train/good/000.png"]:
        data = (shared_data / rel).read_bytes()
        with pytest.raises(ImageError, match=rel.rsplit("/", 1)[-1]):
            decode_image(data[: len(data) // 2], name=rel)


def test_decompression_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_png_header_only(100_000, 100_000))  # PIL's own hard limit
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(_png_header_only(8_000, 8_000))  # ours, checked before decoding
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(_png_bytes(_noise(20, 20)))


def test_too_small_images() -> None:
    for h, w in [(1, 1), (MIN_SIDE - 1, 64)]:
        with pytest.raises(ImageError, match="too small"):
            decode_image(_png_bytes(_noise(h, w)))
    _assert_rgb(decode_image(_png_bytes(_noise(MIN_SIDE, MIN_SIDE))), (MIN_SIDE, MIN_SIDE))


def test_sixteen_bit_grayscale() -> None:
    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    out = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    _assert_rgb(out, (16, 16))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - ramp / 257).max() <= 0.5 + 1e-9
    as_i = Image.fromarray(ramp.astype(np.int32))  # mode "I", how some 16-bit files load
    assert np.array_equal(decode_image(_encode(as_i, "TIFF")), out)


def test_odd_modes_convert() -> None:
    rgb = _noise(16, 16)
    cmyk = decode_image(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
    _assert_rgb(cmyk, (16, 16))
    gray = decode_image(_encode(Image.fromarray(rgb).convert("L"), "PNG"))
    assert np.array_equal(gray[..., 0], gray[..., 1])
    bw = decode_image(_encode(Image.fromarray(rgb).convert("1"), "PNG"))
    assert set(np.unique(bw)) <= {0, 255}
    ycc = decode_image(_encode(Image.fromarray(rgb).convert("YCbCr"), "TIFF"))
    _assert_rgb(ycc, (16, 16))
    assert np.abs(ycc.astype(int) - rgb).max() <= 3
    lab = decode_image(_encode(Image.fromarray(rgb).convert("LAB"), "TIFF"))
    _assert_rgb(lab, (16, 16))
    floats = np.full((16, 16), 300.0, np.float32)
    floats[:8] = 100.4
    out_f = decode_image(_encode(Image.fromarray(floats, mode="F"), "TIFF"))
    assert (out_f[:8] == 100).all() and (out_f[8:] == 255).all()  # PIL's 0..255, clipped


def test_alpha_composited_on_black() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:8, :, 3] = 255  # top opaque, bottom transparent
    out = decode_image(_png_bytes(rgba))
    assert (out[:8] == 200).all() and (out[8:] == 0).all()
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    out_la = decode_image(_encode(la, "PNG"))
    assert (out_la[:8] == 200).all() and (out_la[8:] == 0).all()


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 16, 8))  # top half green (index 1), bottom red (index 0) transparent
    out = decode_image(_encode(pal, "PNG", transparency=0))
    assert (out[:8] == [0, 255, 0]).all() and (out[8:] == 0).all()
    opaque = decode_image(_encode(pal, "PNG"))
    assert (opaque[8:] == [255, 0, 0]).all()


def test_exif_orientation_applied() -> None:
    im = Image.fromarray(_noise(10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(_encode(im, "JPEG", exif=exif))
    assert out.shape == (20, 10, 3)


def test_load_image_and_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="mask file not found"):
        load_mask(tmp_path / "missing_mask.png", (8, 8))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="size"):
        load_image(_write_png(tmp_path / "ok.png", _noise()), size=0)


def test_load_mask_modes(tmp_path: Path) -> None:
    m = np.zeros((20, 30), bool)
    m[5:10, 5:10] = True
    p1 = tmp_path / "m1.png"
    Image.fromarray(m).save(p1)  # mode "1"
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[m] = [255, 0, 0]
    p2 = _write_png(tmp_path / "m2.png", rgb)
    for p in (p1, p2):
        out = load_mask(p, (20, 30))
        assert out.dtype == bool and np.array_equal(out, m)
    assert load_mask(p1, (40, 60)).sum() == 100  # nearest neighbour: stays binary, area x4


# A valid PNG and JPEG, mutated, reach far deeper into the decoders than random bytes.
_SEEDS = [_png_bytes(_noise(16, 16)), _encode(Image.fromarray(_noise(16, 16)), "JPEG")]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), _mutated()))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    try:
        out = decode_image(data, name="fuzz")
    except ImageError as exc:
        assert "fuzz" in str(exc)
        return
    _assert_rgb(out)
    assert min(out.shape[:2]) >= MIN_SIDE


def test_dataset_dataclass_properties(tmp_path: Path) -> None:
    ds = Dataset("folder", tmp_path, "x", [], [], False)
    assert ds.labels.shape == (0,) and ds.defect_types == [] and ds.val_good == []
