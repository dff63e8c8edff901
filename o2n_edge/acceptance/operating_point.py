"""Operating-point arithmetic: false-reject and escape rates at a threshold, with confidence bounds.

Why a module of its own: these are the figures a quality engineer signs off on, so the counting
rule is written down once and pinned by tests on hand-made score lists. The rule is the
runtime's: an image is *rejected* (called anomalous) when ``score > threshold``
(:class:`o2n_edge.runtime.types.InspectResult`); a good image rejected is a *false reject*, a
defective image passed is an *escape*.

Confidence intervals are Clopper-Pearson ("exact") binomial intervals from
``scipy.stats.binomtest``: conservative (never below the nominal coverage), defined at 0 and n
events (where a test set of a few dozen images usually sits), and what acceptance-sampling
practice quotes. scipy is in the ``report`` extra anyway (connected components for PRO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

# Two-sided confidence level of every interval in the report.
CONFIDENCE = 0.95
# Default target false-reject rate for the "what threshold would give X% false rejects" row.
TARGET_FRR = 0.01


@dataclass(frozen=True)
class Rate:
    """``count`` events out of ``n`` trials, with a two-sided binomial confidence interval."""

    count: int
    n: int
    rate: float | None  # None when n == 0 (no trials: no rate)
    ci_low: float | None
    ci_high: float | None

    def to_json(self) -> dict:
        return asdict(self)


def binomial_ci(count: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson interval for ``count`` successes in ``n`` trials."""
    if n <= 0:
        raise ValueError(f"a binomial interval needs n >= 1 trials, got n = {n}")
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, n] = [0, {n}], got {count}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy.stats import binomtest

    ci = binomtest(int(count), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def rate(count: int, n: int, confidence: float = CONFIDENCE) -> Rate:
    """A :class:`Rate`; with no trials the rate and its bounds are None rather than 0/0."""
    if n == 0:
        return Rate(0, 0, None, None, None)
    lo, hi = binomial_ci(count, n, confidence)
    return Rate(int(count), int(n), count / n, lo, hi)


def _split(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of one length, got shapes {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    return s[y == 0], s[y == 1]


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does to a test set: good parts rejected, defects passed."""

    threshold: float
    false_reject: Rate  # good images with score > threshold
    escape: Rate  # defective images with score <= threshold

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "false_reject": self.false_reject.to_json(),
                "escape": self.escape.to_json()}


def operating_point(
    labels: ArrayLike, scores: ArrayLike, threshold: float, confidence: float = CONFIDENCE
) -> OperatingPoint:
    """Counts and rates at ``threshold`` (reject when score > threshold, as the runtime does)."""
    good, bad = _split(labels, scores)
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return OperatingPoint(
        threshold=t,
        false_reject=rate(int((good > t).sum()), good.size, confidence),
        escape=rate(int((bad <= t).sum()), bad.size, confidence),
    )


def threshold_for_frr(good_scores: ArrayLike, target_frr: float) -> float:
    """The lowest threshold whose false-reject rate on these good scores is <= ``target_frr``.

    Lowest, because a lower threshold can only catch more defects. With the runtime's rule
    (reject when score > t) and the good scores sorted high to low, at most
    ``r = floor(target * n)`` goods may lie strictly above t, so t is the (r+1)-th highest good
    score; any lower t would also reject that image and every image tied with it. Ties can make
    the achieved rate lower than the target (every tied image passes together).
    """
    g = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if g.ndim != 1 or g.size == 0:
        raise ValueError("threshold_for_frr needs at least one good image's score")
    if not np.isfinite(g).all():
        raise ValueError("good scores contain NaN/inf")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"the target false-reject rate must be in [0, 1), got {target_frr}")
    allowed = int(np.floor(target_frr * g.size + 1e-9))  # 1e-9: 0.01 * 300 must give 3, not 2
    return float(g[min(allowed, g.size - 1)])


@dataclass(frozen=True)
class TypeResult:
    """One defect type against every good image: its escapes at both thresholds and its AUROC."""

    defect: str
    n: int
    escape: Rate  # at the bundle's threshold
    escape_at_target: Rate  # at the target-FRR threshold
    image_auroc: float | None
    pixel_auroc: float | None = None
    pixel_pro: float | None = None

    def to_json(self) -> dict:
        return {"defect": self.defect, "n": self.n, "escape": self.escape.to_json(),
                "escape_at_target": self.escape_at_target.to_json(), "image_auroc": self.image_auroc,
                "pixel_auroc": self.pixel_auroc, "pixel_pro": self.pixel_pro}


def per_type_escapes(
    defects: Sequence[str], scores: ArrayLike, thresholds: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, list[Rate]]:
    """Escape rate of each defect type (label "good" excluded) at each of ``thresholds``."""
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(defects)
    if d.shape != s.shape:
        raise ValueError(f"defects and scores differ in length: {d.shape} vs {s.shape}")
    out: dict[str, list[Rate]] = {}
    for name in sorted(set(d.tolist()) - {"good"}):
        mine = s[d == name]
        out[name] = [rate(int((mine <= float(t)).sum()), mine.size, confidence) for t in thresholds]
    return out
