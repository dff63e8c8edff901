"""Readers of the on-disk layouts: MVTec AD (and MVTec 3D-AD's RGB frames), VisA, plain folders.

Why separate from detection: each reader knows one layout's quirks (mask naming, VisA's split
csv); a layout that does not match raises :class:`DatasetError` saying what was expected, so a
user with the wrong ``--data`` sees the fix, not a traceback.
"""

from __future__ import annotations

import csv
from pathlib import Path

from o2n_edge.data.layouts import (
    GOOD,
    LAYOUT_HINTS,
    Dataset,
    DatasetError,
    Sample,
    all_have_masks,
    category_dir,
    first_existing,
    image_dir,
    list_images,
    split_by_name_hash,
    subdirs,
)

# VisA: the official split file, looked up under the data root when none is passed.
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image")
VISA_ANOMALY = "anomaly"  # VisA's 1cls split has no per-image defect type


def load_mvtec(root: Path, category: str) -> Dataset:
    """MVTec AD (and MVTec 3D-AD's RGB frames: ``rgb/`` sub-folders, ``gt/`` masks)."""
    cat_dir = category_dir(root, category)
    train = list_images(image_dir(cat_dir / "train" / GOOD))
    if not train:
        raise DatasetError(f"expected {cat_dir}/train/good with images (MVTec AD layout)")
    test_dir = cat_dir / "test"
    test: list[Sample] = []
    for type_dir in subdirs(test_dir):
        defect = type_dir.name
        for path in list_images(image_dir(type_dir)):
            if defect == GOOD:
                test.append(Sample(path, 0, GOOD, None))
                continue
            mask = first_existing(
                [
                    cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png",
                    cat_dir / "ground_truth" / defect / f"{path.stem}.png",
                    type_dir / "gt" / f"{path.stem}.png",
                ]
            )
            test.append(Sample(path, 1, defect, mask))
    if not test:
        raise DatasetError(f"expected {cat_dir}/test/<type>/ with images (MVTec AD layout)")
    val = list_images(image_dir(cat_dir / "validation" / GOOD))
    return Dataset("mvtec", root, category, train, test, all_have_masks(test), val)


def read_visa_csv(csv_path: Path, root: Path, category: str) -> tuple[list[Path], list[Sample]]:
    """Rows of the official split for ``category``; paths are relative to the data root."""

    def resolve(rel: str) -> Path:
        rel = rel.strip()
        candidates = [root / rel, csv_path.parent / rel, csv_path.parent.parent / rel]
        found = first_existing(candidates)
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


def load_visa(root: Path, category: str, split_csv: Path | None) -> Dataset:
    """VisA: the official split csv when there is one, else a fixed name-hash split."""
    cat_dir = category_dir(root, category)
    images = cat_dir / "Data" / "Images"
    if split_csv is None and (root / VISA_SPLIT_CSV).is_file():
        split_csv = root / VISA_SPLIT_CSV
    if split_csv is not None:
        split_csv = Path(split_csv)
        if not split_csv.is_file():
            raise DatasetError(f"VisA split csv {split_csv} not found")
        train, test = read_visa_csv(split_csv, root, category)
    else:
        normal = list_images(images / "Normal")
        train, test_good = split_by_name_hash(normal)
        test = [Sample(p, 0, GOOD, None) for p in test_good]
        masks = cat_dir / "Data" / "Masks" / "Anomaly"
        for path in list_images(images / "Anomaly"):
            mask = first_existing([masks / f"{path.stem}.png", masks / f"{path.stem}_mask.png"])
            test.append(Sample(path, 1, VISA_ANOMALY, mask))
    if not train:
        raise DatasetError(
            f"expected {LAYOUT_HINTS['visa']}: no training good images for {category!r}"
        )
    return Dataset("visa", root, category, train, test, all_have_masks(test))


def load_folder(root: Path, category: str) -> Dataset:
    """``good/`` plus one directory per defect type; half the goods (by name hash) are train."""
    cat_dir = category_dir(root, category)
    good = list_images(cat_dir / GOOD)
    if not good:
        raise DatasetError(f"expected {cat_dir}/good with images (folder layout)")
    train, test_good = split_by_name_hash(good)
    test = [Sample(p, 0, GOOD, None) for p in test_good]
    masks = cat_dir / "masks"
    for defect_dir in subdirs(cat_dir):
        defect = defect_dir.name
        if defect in (GOOD, "masks"):
            continue
        for path in list_images(defect_dir):
            mask = first_existing(
                [
                    masks / defect / f"{path.stem}.png",
                    masks / defect / f"{path.stem}_mask.png",
                    masks / f"{path.stem}.png",
                    masks / f"{path.stem}_mask.png",
                ]
            )
            test.append(Sample(path, 1, defect, mask))
    return Dataset("folder", root, category, train, test, all_have_masks(test))
