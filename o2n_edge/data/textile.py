"""The built-in textile demo set (the PyPI package ``conformal-clip-data``), with a fixed split.

Why built in: it gives a first run real images without downloading a benchmark; its fixed split
(below) keeps the shots out of the scored images and holds goods out for the threshold.
"""

from __future__ import annotations

from pathlib import Path

from o2n_edge.data.layouts import GOOD, Dataset, DatasetError, Sample, list_images

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


def load_textile(category: str) -> Dataset:
    """The demo set with the fixed split documented above."""
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
