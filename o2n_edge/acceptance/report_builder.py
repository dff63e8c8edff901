"""One report run: check the extra, score the test split through the bundle, analyze, draw, write.

The output directory (``report.html`` + ``report.json``) is written into a temporary sibling and
renamed into place, so an interrupted run leaves either the previous report or the new one,
never half of one.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import MissingExtraError
from o2n_edge.atomic import AtomicDir
from o2n_edge.acceptance.operating_point import CONFIDENCE, TARGET_FRR
from o2n_edge.data import Dataset
from o2n_edge.runtime.manifest import BundleManifest

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
# Modules of the ``report`` extra (import name -> what it is for, named in the error).
REPORT_MODULES = {"matplotlib": "the plots", "sklearn": "ROC/PR curves and AUROC", "scipy": "intervals and PRO"}
# Gallery strips are photos: JPEG keeps a page with a dozen of them at a few hundred kB.
GALLERY_JPEG_QUALITY = 88


def require_report_extra() -> None:
    """Fail with the extra to install before any work is done, not after scoring 300 images."""
    import importlib

    missing = []
    for module, purpose in REPORT_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{module} ({purpose})")
    if missing:
        raise MissingExtraError(f"the report needs {', '.join(missing)}: pip install 'o2n-edge[report]'")


@dataclass
class ReportSummary:
    out: Path
    doc: dict

    @property
    def html(self) -> Path:
        return self.out / REPORT_HTML

    @property
    def json(self) -> Path:
        return self.out / REPORT_JSON


def _jpeg_strip(query: np.ndarray, normal: np.ndarray | None, anomaly_map: np.ndarray | None,
                vmin: float, vmax: float) -> bytes:
    from PIL import Image

    from o2n_edge.runtime.render import overlay, side_by_side

    panels = [query] + ([normal] if normal is not None else [])
    if anomaly_map is not None:
        panels.append(overlay(query, anomaly_map, vmin=vmin, vmax=vmax))
    buf = io.BytesIO()
    Image.fromarray(side_by_side(panels)).save(buf, format="JPEG", quality=GALLERY_JPEG_QUALITY)
    return buf.getvalue()


def _gallery_cards(inspector, scored, doc: dict, progress: bool) -> tuple[dict[str, list[dict]], bool]:
    """Re-inspect the picked images and draw them with ONE colour scale for every card.

    A per-image scale (what the operator page uses to show *where*) would paint a clean good
    part's noise as hot as a real defect; here the reader compares cards, so red means the same
    map value everywhere.
    """
    from o2n_edge.acceptance.collect import inspect_one, relative_name
    from o2n_edge.progress import progress_iter

    picks = [(kind, i) for kind in ("escapes", "false_rejects") for i in doc["gallery"][kind]]
    results = [(kind, i, inspect_one(inspector, scored.samples[i])) for kind, i in progress_iter(picks, "gallery", progress)]
    maps = [r.anomaly_map for _, _, r in results if r.anomaly_map is not None]
    vmin = float(min(np.min(m) for m in maps)) if maps else 0.0
    vmax = float(max(np.max(m) for m in maps)) if maps else 1.0
    doc["gallery"]["map_range"] = [vmin, vmax]
    cards: dict[str, list[dict]] = {"escapes": [], "false_rejects": []}
    threshold = doc["at_bundle_threshold"]["threshold"]
    has_normal = False
    for kind, i, r in results:
        has_normal = has_normal or r.normal is not None
        rejected = r.score > threshold
        miss = (not rejected) if kind == "escapes" else rejected
        tag = ("ESCAPE" if miss else "caught") if kind == "escapes" else ("FALSE REJECT" if miss else "passed")
        cards[kind].append({"file": relative_name(scored.samples[i]), "score": float(r.score), "miss": miss, "tag": tag,
                            "jpeg": _jpeg_strip(r.query, r.normal, r.anomaly_map, vmin, vmax)})
    return cards, has_normal


def _manifest_of(pipe: Any) -> BundleManifest:
    """The inspector's typed manifest: its bundle's, else parsed from its ``manifest`` dict."""
    bundle = getattr(pipe, "bundle", None)
    typed = getattr(bundle, "manifest_data", None)
    return typed if isinstance(typed, BundleManifest) else BundleManifest.from_dict(pipe.manifest)


def _bundle_info(pipe: Any, bundle: Path) -> dict[str, Any]:
    """What the report says about the bundle (the decision threshold's provenance included)."""
    m = _manifest_of(pipe)
    shots = m.shots
    threshold = m.threshold.to_dict() if m.threshold is not None else {}
    return {
        "path": str(bundle),
        "manifest_sha256": m.manifest_sha256 or "",
        "profile": m.profile,
        "category": m.category,
        "dataset": m.dataset,
        "precision": m.precision,
        "branches": list(m.branches),
        "shots": shots.k if shots is not None else None,
        "shot_images": shots.images if shots is not None else None,
        "threshold": {k: v for k, v in threshold.items() if k not in ("images", "scores")},
        "versions": m.versions or {},
        "has_normal_version": False,
        "lineage": _lineage_info(m),
    }


def _lineage_info(m: BundleManifest) -> dict[str, Any] | None:
    """A learned bundle's parent and the images ``o2n-edge learn`` added (None for an exported bundle):
    the figures below describe that bank, so the report says where it came from."""
    lin = m.lineage
    if lin is None:
        return None
    return {"parent_hash": lin.parent_hash, "parent_path": lin.parent_path, "created_at": lin.created_at,
            "added": [{"sha256": a.get("sha256"), "rule": a.get("rule")} for a in lin.added or []],
            "earlier": len(lin.earlier or []), "calibration": len(lin.calibration or [])}


def _dataset_info(ds: Dataset) -> dict:
    counts: dict[str, int] = {}
    for s in ds.test:
        counts[s.defect] = counts.get(s.defect, 0) + 1
    return {"name": ds.name, "category": ds.category, "root": str(ds.root), "has_masks": ds.has_masks,
            "counts": dict(sorted(counts.items(), key=lambda kv: (kv[0] != "good", kv[0])))}


def write_atomically(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``out`` as one step: temp sibling directory, then rename.

    An existing report directory is replaced; any other existing directory is refused (the report
    must never delete something it did not write).
    """
    out = Path(out)
    is_report = (out / REPORT_JSON).is_file()
    if out.exists() and not is_report and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a report directory: choose another --out")
    with AtomicDir(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def build_report(
    bundle: Path,
    dataset: Dataset,
    out: Path,
    *,
    backend: str = "cpu",
    threads: int = 0,
    target_frr: float = TARGET_FRR,
    confidence: float = CONFIDENCE,
    gallery_size: int = 6,
    progress: bool = True,
    inspector=None,
    provenance: dict | None = None,
) -> ReportSummary:
    """Score ``dataset``'s test split with ``bundle`` and write the report to ``out``.

    ``inspector`` replaces the ONNX Runtime pipeline (tests pass a double); it must be an
    :class:`o2n_edge.runtime.types.Inspector` with a ``manifest``. ``provenance`` (e.g. the
    commit and command the bundle came from) is copied into the document and shown on the page.
    """
    from o2n_edge import __version__
    from o2n_edge.acceptance.analyze import analyze
    from o2n_edge.acceptance.collect import check_split, score_test_set
    from o2n_edge.acceptance.page import render_page
    from o2n_edge.acceptance.plots import all_plots

    t0 = time.perf_counter()
    require_report_extra()
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"--target-frr must be a fraction in [0, 1), got {target_frr}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence}")
    if gallery_size < 0:
        raise ValueError(f"--gallery must be >= 0, got {gallery_size}")
    check_split(dataset)
    if inspector is None:
        from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

        inspector = OrtPipeline(bundle, SessionOptions(backend=backend, intra_op_threads=threads))
    info = _bundle_info(inspector, Path(bundle))
    if info["category"] and info["category"] != dataset.category:
        raise ValueError(f"the bundle is for category {info['category']!r}, the data set's is {dataset.category!r}")

    scored = score_test_set(inspector, dataset, progress)
    doc = analyze(scored, float(inspector.threshold), target_frr, confidence, gallery_size)
    cards, has_normal = _gallery_cards(inspector, scored, doc, progress)
    info["has_normal_version"] = has_normal
    plots = all_plots(scored.labels, scored.scores, scored.defects, doc)
    doc = {
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "o2n_edge_version": __version__,
        "providers": list(getattr(inspector, "providers", []) or ["test double"]),
        "bundle": info,
        "dataset": _dataset_info(dataset),
        "provenance": dict(provenance or {}),
        **doc,
        "scoring_wall_s": round(scored.wall_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    html = render_page(doc, plots, cards)
    write_atomically(Path(out), {REPORT_JSON: (json.dumps(doc, indent=2) + "\n").encode(),
                                 REPORT_HTML: html.encode()})
    return ReportSummary(Path(out), doc)
