"""Which kept images ``o2n-edge learn`` may put in the memory bank, and which calibrate the threshold.

Why a module of its own: this is the quality rule, apart from the maths. Nothing enters the bank
that a person (an operator's ``good`` verdict) or a stated rule (``--auto-good Q``) vouched for;
a ``defect`` verdict never enters; an image marked both ways stops the run (a person has to say
which is right). Every image is read back from the keep directory and its sha256 checked against
the log, so a corrupted or swapped file is listed as skipped, never learned.

The verdicts and the parent's scores are read through
:class:`~o2n_edge.runtime.feedback_log.ReadOnlyLog` (the same methods as the server's
``ResultsLog``, so the log's layout lives in one place), opened read-only: a serving process
keeps writing, and learn never changes the log.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.runtime.feedback_log import ReadOnlyLog
from o2n_edge.runtime.manifest import BundleManifest

RULE_OPERATOR = "operator:good"


class LearnError(ValueError):
    """A learn run cannot go ahead (bad input, nothing vetted, a conflicting verdict); nothing was written."""


@dataclass
class KeptImage:
    """One vetted image: its bytes as kept, and the rule that let it in."""

    sha256: str
    rule: str
    data: bytes
    path: Path

    def record(self) -> dict[str, Any]:
        """Its manifest entry (the lineage's ``added``/``calibration`` lists)."""
        return {"sha256": self.sha256, "rule": self.rule, "file": self.path.name}


@dataclass
class Vetted:
    """The outcome of vetting: bank images, calibration images (held out of the bank), skipped ones."""

    bank: list[KeptImage] = field(default_factory=list)
    calibration: list[KeptImage] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    auto_good: dict[str, Any] | None = None  # the rule's cutoff and how it was found


def read_feedback(log: Path) -> list[dict[str, Any]]:
    """Every verdict in the log's ``feedback`` table, oldest first; :class:`LearnError` when there is none."""
    if not log.is_file():
        raise LearnError(f"{log}: no such results log")
    try:
        with ReadOnlyLog(log) as rl:
            if not rl.has_table("feedback"):
                raise LearnError(f"{log} has no verdicts (no feedback table): serve records them (POST /v1/feedback)")
            return rl.feedback_rows()
    except sqlite3.Error as exc:
        raise LearnError(f"{log}: not a usable results log (SQLite): {exc}") from exc


def read_scored(log: Path, bundle_hash: str) -> list[tuple[str, float]]:
    """(image sha256, score) of every inspection the bundle ``bundle_hash`` answered."""
    try:
        with ReadOnlyLog(log) as rl:
            return rl.scored_by(bundle_hash) if rl.has_table("results") else []
    except sqlite3.Error as exc:
        raise LearnError(f"{log}: not a usable results log (SQLite): {exc}") from exc


def auto_good_cutoff(manifest: BundleManifest, q: float) -> dict[str, Any]:
    """The score below which ``--auto-good q`` admits an image: the q-quantile of the calibration scores.

    Bundles record their calibration images' scores (``threshold.scores``); one exported before
    they were recorded knows a single quantile, its threshold's, so only that q can be honoured.
    q above the threshold's quantile is refused: it would admit images the line rejected.
    """
    t = manifest.threshold
    if t is None:
        raise LearnError("the bundle has no threshold: --auto-good needs its calibration")
    q0 = float(t.quantile) if t.quantile is not None else None
    if not 0.0 < q <= 1.0:
        raise LearnError(f"--auto-good must be a quantile in (0, 1], got {q}")
    if q0 is not None and q > q0 + 1e-12:
        raise LearnError(f"--auto-good {q:g} is above the threshold's own quantile {q0:g}: it would admit rejected images")
    if t.scores:
        return {"q": q, "cutoff": float(np.quantile(np.asarray(t.scores, dtype=np.float64), q)),
                "from": f"{len(t.scores)} calibration scores in the manifest"}
    if q0 is not None and abs(q - q0) < 1e-12:
        return {"q": q, "cutoff": float(t.value), "from": "the threshold (no calibration scores in the manifest)"}
    raise LearnError(f"the bundle records no calibration scores (exported before they were kept), only its threshold, "
                     f"the {q0} quantile: use --auto-good {q0} or re-export the bundle")


def load_kept(images: Path, sha: str) -> tuple[KeptImage | None, str]:
    """The kept file ``<images>/<sha>.<ext>``, checked against its name's sha256; (None, why) when unusable."""
    found = sorted(p for p in images.glob(f"{sha}.*") if p.is_file()) if len(sha) == 64 else []
    if not found:
        return None, "not in the keep directory"
    try:
        data = found[0].read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc}"
    if hashlib.sha256(data).hexdigest() != sha:
        return None, "sha256 mismatch (the kept file is corrupted or was replaced)"
    return KeptImage(sha256=sha, rule="", data=data, path=found[0]), ""


def vet(manifest: BundleManifest, log: Path, images: Path, *, auto_good: float | None = None,
        holdout: float = 0.3, seed: int = 0, skip_conflicts: bool = False) -> Vetted:
    """Sort the log's verdicts into bank, calibration and skipped images (the rules in the module doc).

    Calibration images stay calibration images across learn runs (the parent's are kept and new
    good verdicts add ``holdout`` of theirs), so no image ever calibrates a bank it is in; images
    already in the parent's bank are not added twice.
    """
    if not 0.0 <= holdout < 1.0:
        raise LearnError(f"--holdout must be in [0, 1), got {holdout}")
    out = Vetted()
    labels: dict[str, set[str]] = defaultdict(set)
    requests: dict[str, list[str]] = defaultdict(list)
    for row in read_feedback(log):
        sha, label = str(row["image_sha256"] or ""), str(row["label"])
        if label not in ("good", "defect"):
            out.skipped.append({"sha256": sha, "request_id": row["request_id"], "reason": f"unknown label {label!r}"})
            continue
        labels[sha].add(label)
        requests[sha].append(str(row["request_id"]))
    both = sorted(s for s, ls in labels.items() if ls == {"good", "defect"})
    if both and not skip_conflicts:
        names = "; ".join(f"{s} (requests {', '.join(requests[s])})" for s in both)
        raise LearnError(f"images marked both good and defect: {names}. Settle the verdicts, or pass "
                         "--skip-conflicts to leave them out")
    for s in both:
        out.skipped.append({"sha256": s, "reason": "marked both good and defect"})
    lineage = manifest.lineage
    in_bank = set(lineage.earlier or []) | {a["sha256"] for a in lineage.added or []} if lineage else set()
    old_cal = [c["sha256"] for c in (lineage.calibration or [])] if lineage else []
    good = sorted(s for s, ls in labels.items() if ls == {"good"} and s not in in_bank)
    fresh = [s for s in good if s not in set(old_cal)]
    order = np.random.default_rng(seed).permutation(len(fresh))
    n_cal = int(round(holdout * len(fresh)))
    cal_new = {fresh[i] for i in order[:n_cal]}
    for s in good:
        kept, why = load_kept(images, s)
        if kept is None:
            out.skipped.append({"sha256": s, "rule": RULE_OPERATOR, "reason": why})
            continue
        kept.rule = RULE_OPERATOR
        (out.calibration if s in cal_new or s in old_cal else out.bank).append(kept)
    if auto_good is not None:
        _auto_good(out, manifest, log, images, auto_good, seen=in_bank | set(labels))
    return out


def _auto_good(out: Vetted, manifest: BundleManifest, log: Path, images: Path, q: float, seen: set[str]) -> None:
    """Images the parent scored below the cutoff that carry no verdict at all (so no defect verdict)."""
    out.auto_good = auto_good_cutoff(manifest, q)
    cutoff, rule = out.auto_good["cutoff"], f"auto-good:q={q:g}"
    taken: set[str] = set()
    for sha, score in read_scored(log, manifest.manifest_sha256):
        if sha in seen or sha in taken or score >= cutoff:
            continue
        taken.add(sha)
        kept, why = load_kept(images, sha)
        if kept is None:
            out.skipped.append({"sha256": sha, "rule": rule, "reason": why})
            continue
        kept.rule = rule
        out.bank.append(kept)
