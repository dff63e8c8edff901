"""A confidence cascade over :class:`~o2n_edge.runtime.pipeline.OrtPipeline`: cheap branches first.

Why: on a line almost every part is good, and the one-to-normal transform (VAE encode, UNet
steps, VAE decode, a second encoder pass) is most of an inspection's cost. The pool and text
branches need only the query's encoder features, so they run first; when their fused score is
below ``skip_below`` the part is declared normal without the transform. Otherwise the transform
runs and the full triplet score decides, reusing the query features already computed.

``skip_below`` must be calibrated on data the cascade is *not* evaluated on (see
``o2n_edge.bench.cascade``): it trades latency for the risk of passing an anomaly that only the
personalized branch would have caught.

Results of skipped images: ``decision`` is normal, ``score`` is the *cheap* score (a different
scale from the full score and its threshold), ``normal`` is None and ``timings_ms`` has no
transform stages; :attr:`CascadePipeline.last_escalated` says which images of the last batch
ran the full path. No torch here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.runtime.pipeline import OrtPipeline, _ms
from o2n_edge.runtime.scoring import RuntimeScores, Scorer
from o2n_edge.runtime.types import InspectResult

EXPENSIVE_BRANCH = "personalized"


def cheap_scorer(pipe: OrtPipeline) -> Scorer:
    """A scorer of the pipeline's bundle restricted to the branches that need no transform."""
    params = pipe.params
    cheap = tuple(b for b in params.branches if b != EXPENSIVE_BRANCH)
    if not cheap:
        raise ValueError("the bundle has no branch besides 'personalized': nothing cheap to run first")
    cheap_params = replace(params, branches=cheap, weights={b: params.weights[b] for b in cheap})
    pool = "pool" in cheap
    return Scorer(
        cheap_params,
        pipe.scorer.memory_bank if pool else None,
        pipe.scorer.global_bank if pool else None,
        pipe.scorer.text_features if "text" in cheap else None,
        search=pipe.scorer.search,
    )


class CascadePipeline:
    """Implements :class:`o2n_edge.runtime.types.Inspector`; skips the transform when confident."""

    def __init__(self, pipe: OrtPipeline, skip_below: float) -> None:
        if not pipe.uses_transform:
            raise ValueError("the bundle does not run the transform: a cascade has nothing to skip")
        self.pipe = pipe
        self.skip_below = float(skip_below)
        self.cheap = cheap_scorer(pipe)
        self.bundle_hash = pipe.bundle_hash
        self.threshold = pipe.threshold
        self.image_size = pipe.image_size
        self.last_escalated: list[bool] = []

    def cheap_scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Cheap-branch image scores (what ``skip_below`` is compared with)."""
        query = resize_uint8(list(images), self.image_size)
        return self.cheap.score(self.pipe.encode(query)).scores

    def inspect_batch(self, images: Sequence[np.ndarray]) -> list[InspectResult]:
        """Score images; the transform runs only for those at or above ``skip_below``."""
        t_all = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        query = resize_uint8(list(images), self.image_size)
        timings["preprocess"] = _ms(t0)
        t0 = time.perf_counter()
        feats = self.pipe.encode(query)
        timings["image_encoder"] = _ms(t0)
        t0 = time.perf_counter()
        cheap = self.cheap.score(feats)
        timings["cheap_scoring"] = _ms(t0)
        escalate = np.asarray(cheap.scores) >= self.skip_below
        self.last_escalated = [bool(x) for x in escalate]
        out: list[InspectResult | None] = [None] * len(query)
        for i in np.flatnonzero(~escalate):
            s = float(cheap.scores[i])
            out[i] = InspectResult(score=s, decision=False, threshold=self.threshold, timings_ms=dict(timings),
                                   anomaly_map=cheap.maps[i], query=query[i], normal=None)
        idx = np.flatnonzero(escalate)
        if idx.size:
            full_t = dict(timings)
            sub = query[idx]
            normals = self.pipe.normal_versions(sub, full_t)
            t0 = time.perf_counter()
            normal_feats = self.pipe.encode(normals)
            full_t["image_encoder_normal"] = _ms(t0)
            t0 = time.perf_counter()
            known = RuntimeScores(scores=cheap.scores[idx], maps=cheap.maps[idx],
                                  branch_maps={k: v[idx] for k, v in cheap.branch_maps.items()},
                                  global_scores={k: v[idx] for k, v in cheap.global_scores.items()})
            res = self.pipe.scorer.score({k: v[idx] for k, v in feats.items()}, normal_feats, known)
            full_t["scoring"] = _ms(t0)
            for j, i in enumerate(idx):
                s = float(res.scores[j])
                out[i] = InspectResult(score=s, decision=s > self.threshold, threshold=self.threshold,
                                       timings_ms=dict(full_t), anomaly_map=res.maps[j], query=query[i],
                                       normal=normals[j])
        total = _ms(t_all)
        results = [r for r in out if r is not None]
        assert len(results) == len(query)
        for r in results:
            r.timings_ms["total"] = total
        return results

    def inspect(self, image: np.ndarray) -> InspectResult:
        return self.inspect_batch([image])[0]
