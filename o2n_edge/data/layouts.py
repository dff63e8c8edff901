"""On-disk data set layouts: the Dataset/Sample types, image listings and layout detection.

Why a module of its own: every loader (MVTec AD, VisA, the folder layout, the textile demo)
returns the same :class:`Dataset`, and auto-detection must agree with the loaders about which
directory marks which layout; both live here so there is one definition of each. Listings are
sorted by file name and every split is a pure function of the file names, so a result can be
reproduced from (data set, category, shots, seed).
"""

from __future__ import annotations

import hashlib
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

# VisA without a split csv, and the folder layout: this fraction of the good images is the
# training pool; the rest are test goods. Which ones is decided by a hash of the file name
# (not by sort order, which often follows capture time), so it is fixed and seed-free.
TRAIN_FRACTION = 0.5

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


def subdirs(directory: Path) -> list[Path]:
    """Visible sub-directories, sorted by name (defect types, categories)."""
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def image_dir(directory: Path) -> Path:
    """MVTec 3D-AD keeps the RGB frames in an ``rgb/`` sub-folder; MVTec AD does not."""
    rgb = directory / "rgb"
    return rgb if rgb.is_dir() else directory


def first_existing(candidates: list[Path]) -> Path | None:
    """The first candidate that is a file: mask naming differs between releases of a layout."""
    return next((c for c in candidates if c.is_file()), None)


def all_have_masks(test: list[Sample]) -> bool:
    """Whether pixel metrics are meaningful: every anomalous sample has a mask."""
    anomalous = [s for s in test if s.label == 1]
    return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


def split_by_name_hash(
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


def matches_layout(cat_dir: Path, layout: str) -> bool:
    """Whether ``cat_dir`` has ``layout``'s marker directory."""
    return cat_dir.joinpath(*LAYOUT_MARKERS[layout]).is_dir()


def layout_of(cat_dir: Path) -> str | None:
    """First layout (in LAYOUT_MARKERS order) whose marker directory exists."""
    return next((layout for layout in LAYOUT_MARKERS if matches_layout(cat_dir, layout)), None)


def _check_category_name(category: str) -> None:
    """A category is one directory name; anything else could escape the data root."""
    if not category or category in (".", "..") or "/" in category or "\\" in category:
        raise DatasetError(f"category must be a single directory name, got {category!r}")


def category_dir(root: Path, category: str) -> Path:
    """``root/category``, or a DatasetError listing the categories that are there."""
    _check_category_name(category)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    cat_dir = root / category
    if not cat_dir.is_dir():
        found = layout_categories(root) or [p.name for p in subdirs(root)]
        listing = ", ".join(found) if found else "none"
        raise DatasetError(
            f"category {category!r} not found under {root}; categories there: {listing}"
        )
    return cat_dir


def layout_categories(root: Path, layout: str | None = None) -> list[str]:
    """Directories under ``root`` that match ``layout`` (any known layout when None)."""
    return [
        d.name
        for d in subdirs(root)
        if (layout_of(d) is not None if layout is None else matches_layout(d, layout))
    ]


def detect_layout(root: Path, category: str) -> str:
    """Name the layout ("mvtec", "visa" or "folder") of ``root/category`` from its directories."""
    cat_dir = category_dir(Path(root), category)
    layout = layout_of(cat_dir)
    if layout is None:
        expected = "\n".join(f"  - {hint}" for hint in LAYOUT_HINTS.values())
        raise DatasetError(
            f"{cat_dir} matches no known data set layout; expected one of:\n{expected}"
        )
    return layout
