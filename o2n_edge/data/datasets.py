"""Data set discovery: MVTec AD, VisA, a plain folder layout and the built-in textile demo.

Every loader returns the same :class:`Dataset`: the training good images (the only pool the
k shots are ever drawn from), the labelled test samples with their masks, and optional extra
held-out good images for threshold calibration. Listings are sorted by file name and every
split is a pure function of the file names, so a result can always be reproduced from
(data set, category, shots, seed). A layout that does not match raises :class:`DatasetError`
saying what was expected, so a user with the wrong ``--data`` sees the fix, not a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("mvtec", "visa", "folder", "textile")
AUTO = "auto"
# Environment variable naming the data root when --data is not given.
ENV_DATA = "O2N_DATA"
# What counts as an image in a listing (compared case-insensitively: VisA ships ".JPG").
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
GOOD = "good"

# VisA: the official split file, looked up under the data root when none is passed.
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image")
VISA_ANOMALY = "anomaly"  # VisA's 1cls split has no per-image defect type
# VisA without a split csv, and the folder layout: this fraction of the good images is the
# training pool; the rest are test goods. Which ones is decided by a hash of the file name
# (not by sort order, which often follows capture time), so it is fixed and seed-free.
TRAIN_FRACTION = 0.5

# Textile demo (conformal-clip-data, sorted by file name): the k shots come only from the
# first TEXTILE_TRAIN nominal images, which are never scored; the test set is the next
# TEXTILE_TEST_GOOD nominal images plus the first TEXTILE_TEST_DEFECT local and global ones
# (300 images: an eval takes minutes on a CPU); the next TEXTILE_VAL_GOOD nominal images are
# held out for threshold calibration.
TEXTILE_CATEGORY = "textile"
TEXTILE_TRAIN = 100
TEXTILE_TEST_GOOD = 150
TEXTILE_TEST_DEFECT = 75
TEXTILE_VAL_GOOD = 50
TEXTILE_DEFECTS = ("local", "global")

# The directory that identifies each layout, checked in this order by auto-detection.
LAYOUT_MARKERS = {
    "mvtec": ("train", GOOD),
    "visa": ("Data", "Images", "Normal"),
    "folder": (GOOD,),
}
LAYOUT_HINTS = {
    "mvtec": "<root>/<category>/train/good with images (MVTec AD layout; test/<type>/, "
    "ground_truth/<type>/<stem>_mask.png)",
    "visa": "<root>/<category>/Data/Images/Normal with images (VisA layout; Data/Images/Anomaly, "
    "Data/Masks/Anomaly, optional split_csv/1cls.csv)",
    "folder": "<root>/<category>/good with images (folder layout; <defect>/ dirs, optional "
    "masks/<defect>/<stem>.png or masks/<stem>.png)",
}


class DatasetError(ValueError):
    """A data root, category or split file that does not match what the loader expects."""


@dataclass(frozen=True)
class Sample:
    """One test image with its ground truth; ``mask_path`` is None for good images."""

    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type
    mask_path: Path | None = None

    def __post_init__(self) -> None:
        assert self.label in (0, 1), f"label must be 0 or 1, got {self.label!r}"
        assert (self.label == 0) == (self.defect == GOOD), (self.label, self.defect)


@dataclass
class Dataset:
    """One category of one data set, already split into train / test / validation."""

    name: str  # "mvtec" | "visa" | "folder" | "textile"
    root: Path
    category: str
    train_good: list[Path]
    test: list[Sample]
    has_masks: bool  # every anomalous test sample has a mask (pixel metrics are meaningful)
    val_good: list[Path] = field(default_factory=list)  # held-out goods, never shots or test

    @property
    def labels(self) -> np.ndarray:
        """Test labels in test order, the array every image-level metric takes."""
        return np.array([s.label for s in self.test], dtype=np.int64)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types present in the test set (without "good"), for per-type tables."""
        return sorted({s.defect for s in self.test if s.label == 1})


def list_images(directory: Path) -> list[Path]:
    """Image files directly in ``directory``, sorted by name; hidden and other files skipped."""
    if not directory.is_dir():
        return []
    return sorted(
        (
            p
            for p in directory.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _subdirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_dir(directory: Path) -> Path:
    """MVTec 3D-AD keeps the RGB frames in an ``rgb/`` sub-folder; MVTec AD does not."""
    rgb = directory / "rgb"
    return rgb if rgb.is_dir() else directory


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _has_masks(test: list[Sample]) -> bool:
    anomalous = [s for s in test if s.label == 1]
    return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


def _split_fraction(
    paths: list[Path], fraction: float = TRAIN_FRACTION
) -> tuple[list[Path], list[Path]]:
    """Split by a hash of each file name: fixed without a seed; a new file moves at most one."""
    if not paths:
        return [], []
    n_train = max(1, int(len(paths) * fraction))
    by_hash = sorted(paths, key=lambda p: (hashlib.sha256(p.name.encode()).hexdigest(), p.name))
    train = sorted(by_hash[:n_train], key=lambda p: p.name)
    rest = sorted(by_hash[n_train:], key=lambda p: p.name)
    return train, rest


def _matches(cat_dir: Path, layout: str) -> bool:
    return cat_dir.joinpath(*LAYOUT_MARKERS[layout]).is_dir()


def _layout_of(cat_dir: Path) -> str | None:
    """First layout (in LAYOUT_MARKERS order) whose marker directory exists."""
    return next((layout for layout in LAYOUT_MARKERS if _matches(cat_dir, layout)), None)


def _check_category_name(category: str) -> None:
    """A category is one directory name; anything else could escape the data root."""
    if not category or category in (".", "..") or "/" in category or "\\" in category:
        raise DatasetError(f"category must be a single directory name, got {category!r}")


def _category_dir(root: Path, category: str) -> Path:
    _check_category_name(category)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    cat_dir = root / category
    if not cat_dir.is_dir():
        found = list_categories(root) or [p.name for p in _subdirs(root)]
        listing = ", ".join(found) if found else "none"
        raise DatasetError(
            f"category {category!r} not found under {root}; categories there: {listing}"
        )
    return cat_dir


def detect_layout(root: Path, category: str) -> str:
    """Name the layout ("mvtec", "visa" or "folder") of ``root/category`` from its directories."""
    cat_dir = _category_dir(Path(root), category)
    layout = _layout_of(cat_dir)
    if layout is None:
        expected = "\n".join(f"  - {hint}" for hint in LAYOUT_HINTS.values())
        raise DatasetError(
            f"{cat_dir} matches no known data set layout; expected one of:\n{expected}"
        )
    return layout


def list_categories(root: Path, dataset: str | None = None) -> list[str]:
    """Categories under ``root`` whose layout matches ``dataset`` (any layout when None/auto)."""
    dataset = _check_dataset_name(dataset)
    if dataset == "textile":
        return [TEXTILE_CATEGORY]
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    wanted = None if dataset == AUTO else dataset
    return [
        d.name
        for d in _subdirs(root)
        if (_layout_of(d) is not None if wanted is None else _matches(d, wanted))
    ]


def _check_dataset_name(dataset: str | None) -> str:
    name = AUTO if dataset is None else dataset.lower()
    if name != AUTO and name not in DATASETS:
        choices = ", ".join((*DATASETS, AUTO))
        raise DatasetError(f"unknown data set {dataset!r}; choose one of: {choices}")
    return name


def _resolve_root(root: str | Path | None) -> Path:
    if root is None:
        env = os.environ.get(ENV_DATA)
        if not env:
            raise DatasetError(f"no data root: pass --data <dir> or set {ENV_DATA}")
        root = env
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data root {path} is not a directory")
    return path


def _load_mvtec(root: Path, category: str) -> Dataset:
    """MVTec AD (and MVTec 3D-AD's RGB frames: ``rgb/`` sub-folders, ``gt/`` masks)."""
    cat_dir = _category_dir(root, category)
    train = list_images(_image_dir(cat_dir / "train" / GOOD))
    if not train:
        raise DatasetError(f"expected {cat_dir}/train/good with images (MVTec AD layout)")
    test_dir = cat_dir / "test"
    test: list[Sample] = []
    for type_dir in _subdirs(test_dir):
        defect = type_dir.name
        for path in list_images(_image_dir(type_dir)):
            if defect == GOOD:
                test.append(Sample(path, 0, GOOD, None))
                continue
            mask = _first_existing(
                [
                    cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png",
                    cat_dir / "ground_truth" / defect / f"{path.stem}.png",
                    type_dir / "gt" / f"{path.stem}.png",
                ]
            )
            test.append(Sample(path, 1, defect, mask))
    if not test:
        raise DatasetError(f"expected {cat_dir}/test/<type>/ with images (MVTec AD layout)")
    val = list_images(_image_dir(cat_dir / "validation" / GOOD))
    return Dataset("mvtec", root, category, train, test, _has_masks(test), val)


def _read_visa_csv(csv_path: Path, root: Path, category: str) -> tuple[list[Path], list[Sample]]:
    """Rows of the official split for ``category``; paths are relative to the data root."""

    def resolve(rel: str) -> Path:
        rel = rel.strip()
        candidates = [root / rel, csv_path.parent / rel, csv_path.parent.parent / rel]
        found = _first_existing(candidates)
        if found is None:
            raise DatasetError(f"{csv_path}: listed file {rel!r} not found under {root}")
        return found

    try:
        with csv_path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0].keys()) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read VisA split csv {csv_path}: {exc}") from exc
    missing = [c for c in VISA_CSV_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: expected columns {', '.join(VISA_CSV_COLUMNS)}, mask; "
            f"missing {', '.join(missing)}"
        )
    mine = [r for r in rows if (r["object"] or "").strip() == category]
    if not mine:
        objects = sorted({(r["object"] or "").strip() for r in rows})
        raise DatasetError(
            f"{csv_path}: no rows for {category!r}; objects there: {', '.join(objects)}"
        )
    train: list[Path] = []
    test: list[Sample] = []
    for row in mine:
        split, label = (row["split"] or "").strip().lower(), (row["label"] or "").strip().lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DatasetError(
                f"{csv_path}: expected split train/test and label normal/anomaly, "
                f"got {split!r}/{label!r}"
            )
        path = resolve(row["image"] or "")
        if split == "train":
            if label == "normal":  # a few-shot method trains on good images only
                train.append(path)
        elif label == "normal":
            test.append(Sample(path, 0, GOOD, None))
        else:
            mask_rel = (row.get("mask") or "").strip()
            test.append(Sample(path, 1, VISA_ANOMALY, resolve(mask_rel) if mask_rel else None))
    return sorted(train, key=lambda p: p.name), sorted(test, key=lambda s: (s.label, s.path.name))


def _load_visa(root: Path, category: str, split_csv: Path | None) -> Dataset:
    """VisA: the official split csv when there is one, else a fixed name-hash split."""
    cat_dir = _category_dir(root, category)
    images = cat_dir / "Data" / "Images"
    if split_csv is None and (root / VISA_SPLIT_CSV).is_file():
        split_csv = root / VISA_SPLIT_CSV
    if split_csv is not None:
        split_csv = Path(split_csv)
        if not split_csv.is_file():
            raise DatasetError(f"VisA split csv {split_csv} not found")
        train, test = _read_visa_csv(split_csv, root, category)
    else:
        normal = list_images(images / "Normal")
        train, test_good = _split_fraction(normal)
        test = [Sample(p, 0, GOOD, None) for p in test_good]
        masks = cat_dir / "Data" / "Masks" / "Anomaly"
        for path in list_images(images / "Anomaly"):
            mask = _first_existing([masks / f"{path.stem}.png", masks / f"{path.stem}_mask.png"])
            test.append(Sample(path, 1, VISA_ANOMALY, mask))
    if not train:
        raise DatasetError(
            f"expected {LAYOUT_HINTS['visa']}: no training good images for {category!r}"
        )
    return Dataset("visa", root, category, train, test, _has_masks(test))


def _load_folder(root: Path, category: str) -> Dataset:
    """``good/`` plus one directory per defect type; half the goods (by name hash) are train."""
    cat_dir = _category_dir(root, category)
    good = list_images(cat_dir / GOOD)
    if not good:
        raise DatasetError(f"expected {cat_dir}/good with images (folder layout)")
    train, test_good = _split_fraction(good)
    test = [Sample(p, 0, GOOD, None) for p in test_good]
    masks = cat_dir / "masks"
    for defect_dir in _subdirs(cat_dir):
        defect = defect_dir.name
        if defect in (GOOD, "masks"):
            continue
        for path in list_images(defect_dir):
            mask = _first_existing(
                [
                    masks / defect / f"{path.stem}.png",
                    masks / defect / f"{path.stem}_mask.png",
                    masks / f"{path.stem}.png",
                    masks / f"{path.stem}_mask.png",
                ]
            )
            test.append(Sample(path, 1, defect, mask))
    return Dataset("folder", root, category, train, test, _has_masks(test))


def _load_textile(category: str) -> Dataset:
    """The demo set with the fixed split documented at the top of this module."""
    if category != TEXTILE_CATEGORY:
        raise DatasetError(
            f"the textile data set has one category, {TEXTILE_CATEGORY!r}; got {category!r}"
        )
    try:
        from conformal_clip_data import global_dir, local_dir, nominal_dir
    except ImportError as exc:
        raise DatasetError(
            "the textile demo data needs the conformal-clip-data package: "
            "pip install 'o2n-edge[demo]'"
        ) from exc
    nominal = list_images(Path(nominal_dir()))
    defects = {"local": list_images(Path(local_dir())), "global": list_images(Path(global_dir()))}
    n_good = TEXTILE_TRAIN + TEXTILE_TEST_GOOD + TEXTILE_VAL_GOOD
    if len(nominal) < n_good or any(len(v) < TEXTILE_TEST_DEFECT for v in defects.values()):
        counts = ", ".join(f"{k} {len(v)}" for k, v in {"nominal": nominal, **defects}.items())
        raise DatasetError(
            f"textile data incomplete ({counts}); need {n_good} nominal and "
            f"{TEXTILE_TEST_DEFECT} of each defect type: reinstall 'o2n-edge[demo]'"
        )
    train = nominal[:TEXTILE_TRAIN]
    test_good = nominal[TEXTILE_TRAIN : TEXTILE_TRAIN + TEXTILE_TEST_GOOD]
    val = nominal[TEXTILE_TRAIN + TEXTILE_TEST_GOOD : n_good]
    test = [Sample(p, 0, GOOD, None) for p in test_good]
    for defect in TEXTILE_DEFECTS:
        test.extend(Sample(p, 1, defect, None) for p in defects[defect][:TEXTILE_TEST_DEFECT])
    return Dataset("textile", Path(nominal_dir()).parent, TEXTILE_CATEGORY, train, test, False, val)


def load_dataset(
    root: str | Path | None,
    dataset: str | None,
    category: str,
    *,
    split_csv: str | Path | None = None,
) -> Dataset:
    """Load one category; ``dataset`` None/"auto" detects the layout, "textile" ignores ``root``.

    ``root`` None falls back to the ``O2N_DATA`` environment variable. ``split_csv`` (VisA
    only) overrides ``<root>/split_csv/1cls.csv``.
    """
    name = _check_dataset_name(dataset)
    if name == "textile":
        return _load_textile(category)
    base = _resolve_root(root)
    if name == AUTO:
        name = detect_layout(base, category)
    elif not _matches(_category_dir(base, category), name):
        hint = LAYOUT_HINTS[name].replace("<root>", str(base)).replace("<category>", category)
        raise DatasetError(f"expected {hint}")
    if name == "mvtec":
        return _load_mvtec(base, category)
    if name == "visa":
        return _load_visa(base, category, None if split_csv is None else Path(split_csv))
    return _load_folder(base, category)
