"""Score a data set's test split through a bundle, the way the line will: the torch-free runtime.

Only the runtime's public API is used (:meth:`Inspector.inspect_batch` and
:class:`InspectResult`), so whatever the pipeline does inside (branches, tiling, new scoring
constants) is what the report measures. Anomaly maps are kept only when the data set has masks
(pixel metrics need them); the gallery re-inspects its handful of images instead of keeping every
query and normal version in memory, so a large test set costs a score per image plus its map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from o2n_edge.data import Dataset, Sample, load_image, load_mask
from o2n_edge.progress import progress_iter
from o2n_edge.runtime.types import Inspector, InspectResult

# Images per inspect_batch call: the pipeline's own batch default (one ORT call per stage).
BATCH = 8


class ReportDataError(ValueError):
    """A test split the report cannot judge a threshold on (no goods, or no defects)."""


@dataclass
class ScoredSet:
    """Every test image's score (test order), with maps and masks when the data set has masks."""

    samples: list[Sample]
    scores: np.ndarray  # (N,) float64
    decisions: np.ndarray  # (N,) bool, the runtime's own verdict (True = rejected)
    maps: np.ndarray | None  # (N, S, S) float32 at the scoring size, or None without masks
    masks: np.ndarray | None  # (N, S, S) bool, or None
    wall_s: float

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def defects(self) -> list[str]:
        return [s.defect for s in self.samples]


def check_split(dataset: Dataset) -> None:
    """A one-line error when a rate cannot be measured: no goods (false rejects) or no defects."""
    n_bad = sum(s.label for s in dataset.test)
    n_good = len(dataset.test) - n_bad
    where = f"{dataset.name} data set, category {dataset.category!r} ({dataset.root})"
    if n_good == 0:
        raise ReportDataError(f"the test split of the {where} has no good images: "
                              "the false-reject rate cannot be measured (add test/good images)")
    if n_bad == 0:
        raise ReportDataError(f"the test split of the {where} has no defective images: "
                              "the escape rate cannot be measured (add test/<defect type> images)")


def score_test_set(inspector: Inspector, dataset: Dataset, progress: bool = True, batch: int = BATCH) -> ScoredSet:
    """Inspect every test image in batches; maps/masks are kept only when masks exist."""
    check_split(dataset)
    t0 = time.perf_counter()
    size = int(inspector.image_size)
    samples = list(dataset.test)
    keep_maps = dataset.has_masks
    scores = np.empty(len(samples), dtype=np.float64)
    decisions = np.empty(len(samples), dtype=bool)
    maps = np.empty((len(samples), size, size), dtype=np.float32) if keep_maps else None
    starts = range(0, len(samples), batch)
    for start in progress_iter(starts, f"scoring {len(samples)} test images", progress, total=len(starts)):
        chunk = samples[start:start + batch]
        results = inspector.inspect_batch([_load(inspector, s, size) for s in chunk])
        for i, r in enumerate(results):
            scores[start + i] = r.score
            decisions[start + i] = r.decision
            if maps is not None:
                maps[start + i] = _map_at(r, size)
    masks = None
    if keep_maps:
        masks = np.stack([load_mask(s.mask_path, (size, size)) for s in samples])
    return ScoredSet(samples, scores, decisions, maps, masks, time.perf_counter() - t0)


def inspect_one(inspector: Inspector, sample: Sample) -> InspectResult:
    """Re-inspect one image for the gallery (query, normal version when the bundle makes one, map)."""
    return inspector.inspect(_load(inspector, sample, int(inspector.image_size)))


def _load(inspector: Inspector, sample: Sample, size: int) -> np.ndarray:
    """Decode as the line does: the pipeline's own ``decode`` when it has one (it follows the
    bundle's decoding settings), else the shared decoder at the scoring size (what every
    pipeline resizes to first, so the result is the same)."""
    decode = getattr(inspector, "decode", None)
    if callable(decode):
        return decode(Path(sample.path).read_bytes(), str(sample.path))
    return load_image(sample.path, size)


def _map_at(result: InspectResult, size: int) -> np.ndarray:
    if result.anomaly_map is None:
        raise ValueError("the pipeline returned no anomaly map: pixel metrics cannot be computed")
    m = np.asarray(result.anomaly_map, dtype=np.float32)
    if m.shape != (size, size):
        from o2n_edge.runtime.render import resize_map

        m = resize_map(m, size, size)
    return m


def relative_name(sample: Sample) -> str:
    """``<defect>/<file>``: what a quality engineer can find in the data set."""
    return f"{sample.defect}/{Path(sample.path).name}"
