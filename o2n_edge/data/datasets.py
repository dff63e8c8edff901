"""Data set discovery: MVTec AD, VisA, a plain folder layout and the built-in textile demo.

Every loader returns the same :class:`Dataset`: the training good images (the only pool the
k shots are ever drawn from), the labelled test samples with their masks, and optional extra
held-out good images for threshold calibration. This module is the entry point (which layout,
which root); the types and detection are in :mod:`o2n_edge.data.layouts`, the readers in
:mod:`o2n_edge.data.loaders` and the textile set in :mod:`o2n_edge.data.textile`.
"""

from __future__ import annotations

import os
from pathlib import Path

from o2n_edge.data.layouts import (  # noqa: F401 - the data set API, importable from here as before
    AUTO,
    DATASETS,
    ENV_DATA,
    GOOD,
    IMAGE_SUFFIXES,
    LAYOUT_HINTS,
    LAYOUT_MARKERS,
    TRAIN_FRACTION,
    Dataset,
    DatasetError,
    Sample,
    category_dir,
    matches_layout,
    detect_layout,
    layout_categories,
    list_images,
)
from o2n_edge.data.loaders import VISA_SPLIT_CSV, load_folder, load_mvtec, load_visa  # noqa: F401
from o2n_edge.data.textile import (  # noqa: F401
    TEXTILE_CATEGORY,
    TEXTILE_DEFECTS,
    TEXTILE_TEST_DEFECT,
    TEXTILE_TEST_GOOD,
    TEXTILE_TRAIN,
    TEXTILE_VAL_GOOD,
    load_textile,
)


def list_categories(root: Path, dataset: str | None = None) -> list[str]:
    """Categories under ``root`` whose layout matches ``dataset`` (any layout when None/auto)."""
    dataset = _check_dataset_name(dataset)
    if dataset == "textile":
        return [TEXTILE_CATEGORY]
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    wanted = None if dataset == AUTO else dataset
    return layout_categories(root, wanted)


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
        return load_textile(category)
    base = _resolve_root(root)
    if name == AUTO:
        name = detect_layout(base, category)
    elif not matches_layout(category_dir(base, category), name):
        hint = LAYOUT_HINTS[name].replace("<root>", str(base)).replace("<category>", category)
        raise DatasetError(f"expected {hint}")
    if name == "mvtec":
        return load_mvtec(base, category)
    if name == "visa":
        return load_visa(base, category, None if split_csv is None else Path(split_csv))
    return load_folder(base, category)
