"""`o2n-edge export`: shots -> (personalize -> distil -> pool) -> reference -> ONNX graphs -> bundle.

:func:`export_bundle` is the whole export as a sequence of named stages, read top to bottom;
each stage is a function with its own module and docstring, and passes results on through one
:class:`~o2n_edge.export.export_state.ExportState`:

1. ``resolve_inputs``      options -> profile, branches, scoring config, output and work dirs
2. ``load_shots``          dataset, the k shots, held-out calibration images, the encoder
3. ``personalize``         (tiny/sd15) personalize + distil on the shots, cached in ``runs_dir``
4. ``generate_pool``       (pool branch) anomaly-free images that widen the memory bank
5. ``build_reference``     memory bank, text features, standardization constants
6. ``apply_coreset``       bound the memory bank (greedy k-center)
7. ``calibrate_threshold`` quantile of held-out good images' scores (the runtime's scoring)
8. ``export_graphs``       ONNX graphs, cached in the work dir by input hash
9. ``write_bundle``        manifest (typed, ``o2n_edge.runtime.manifest``) + files, atomically
10. ``check_parity``       the torch-free runtime rescoring held-out images from the bundle

Why the parity check: the runtime's scores (ONNX encoder, the bundle's constants) are compared
with the export's own (torch encoder, the same numpy scoring), so a bundle that scores
differently never ships silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.export.export_state import THRESHOLD_QUANTILE, ExportOptions, ExportState
from o2n_edge.export.stages_output import export_graphs, student_record, write_bundle
from o2n_edge.export.stages_prepare import (
    MAX_CALIBRATION_IMAGES,
    calibration_images,
    generate_pool,
    load_shots,
    personalize,
    resolve_inputs,
)
from o2n_edge.export.stages_reference import apply_coreset, build_reference, calibrate_threshold

__all__ = ["MAX_CALIBRATION_IMAGES", "PARITY_IMAGES", "THRESHOLD_QUANTILE", "ExportOptions",
           "ExportState", "ExportSummary", "calibration_images", "check_parity", "export_bundle", "student_record"]

log = logging.getLogger("o2n_edge.export")

PARITY_IMAGES = 4


@dataclass
class ExportSummary:
    """What the user is told at the end (and what tests check)."""

    bundle: Path
    manifest: dict[str, Any]
    wall_s: dict[str, float] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0


def export_bundle(opts: ExportOptions) -> ExportSummary:
    """Run the whole export; returns a summary. Raises ValueError-family errors for user mistakes."""
    t_all = time.perf_counter()
    state = load_shots(opts, resolve_inputs(opts))
    personalize(state)
    generate_pool(state)
    with state.timed("reference"):
        build_reference(state)
        apply_coreset(state)
    with state.timed("calibrate"):
        calibrate_threshold(state)
    with state.timed("export_onnx"):
        export_graphs(state)
    with state.timed("bundle"):
        write_bundle(state)
    with state.timed("parity"):
        assert state.calib_scores is not None
        parity = check_parity(state.plan.out, state.calib_imgs[:PARITY_IMAGES], state.calib_scores[:PARITY_IMAGES])
    state.walls["total"] = round(time.perf_counter() - t_all, 2)
    out = state.plan.out
    size_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportSummary(bundle=out, manifest=state.manifest, wall_s=state.walls, parity=parity, bytes=size_bytes)


def check_parity(bundle: Path, images: list[np.ndarray], reference_scores: np.ndarray) -> dict[str, Any]:
    """Score ``images`` with the torch-free runtime; max |runtime - export| over them.

    Both score with the same numpy code, so a difference comes from the ONNX encoder graphs or
    from a constant that did not reach the bundle.
    """
    from o2n_edge.runtime.pipeline import OrtPipeline

    pipe = OrtPipeline(bundle)
    got = np.array([r.score for r in pipe.inspect_batch(images)])
    diff = np.abs(got - np.asarray(reference_scores))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "n": len(images),
            "reference": [float(x) for x in reference_scores], "runtime": [float(x) for x in got]}
