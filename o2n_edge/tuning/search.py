"""Self-tuning from the shots alone: pick resolution, layers and fusion by pseudo-validation.

For each candidate setting, every shot is held out in turn (leave-one-shot-out; with a single
shot, its rotations and flips form the bank and the shot itself is held out), the memory bank is
built from the other shots' views, and the candidate scores:

- negatives: the held-out shot and mild defect-free variants of it (small shift/scale/brightness);
- positives: the held-out shot with synthetic defects pasted in (:mod:`.synthetic`).

The pseudo-validation score is the image AUROC of all folds' negatives against all folds'
positives, pooled: a setting whose scores of *different* good parts drift apart (a noisy global
statistic, say) is penalised, as it would be on a real line; within one fold that drift would
cancel out. Ties are broken by the share of positives above every negative, then by cost
(candidates are listed cheapest first). No test image is ever seen. The whole record (every candidate's score, the choice) goes into the bundle
manifest and the ``eval`` JSON.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.profiles import EncoderSpec, Profile

from .synthetic import KINDS, good_variants, synthesize

DEFECTS_PER_FOLD = 10  # synthetic positives per held-out shot (kinds cycled)
GOOD_VARIANTS = 3  # defect-free variants per held-out shot (negatives beside the shot itself)
TIE = 0.005  # pseudo-AUROC differences below this are ties (then the cheaper candidate wins)


@dataclass(frozen=True)
class Candidate:
    """One setting the self-tuning may choose: the encoder's network/resolution/layers + fusion."""

    kind: str = "efficientnet_lite0"
    image_size: int = 224
    tiles: int = 1
    layers: tuple[int, ...] = (2, 4)
    aggregation: int = 3
    stats_weight: float = 0.0

    @property
    def name(self) -> str:
        tiles = f"x{self.tiles}t" if self.tiles > 1 else ""
        layers = ",".join(map(str, self.layers))
        return f"{self.kind.replace('efficientnet_', '')}@{self.image_size}{tiles} L{layers} k{self.aggregation} g{self.stats_weight:g}"

    @property
    def encoding_key(self) -> tuple:
        """Candidates with the same key share one backbone pass."""
        return (self.kind, self.image_size, self.tiles)

    def encoder_spec(self, base: EncoderSpec) -> EncoderSpec:
        return replace(base, kind=self.kind, image_size=self.image_size, tiles=self.tiles,
                       layers=tuple(self.layers), aggregation=self.aggregation)

    def apply(self, profile: Profile) -> Profile:
        """``profile`` with this candidate's encoder and statistics weight."""
        return replace(profile, encoder=self.encoder_spec(profile.encoder), stats_weight=self.stats_weight)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["name"] = self.name
        return d

    @classmethod
    def from_profile(cls, profile: Profile) -> Candidate:
        e = profile.encoder
        return cls(e.kind, e.image_size, e.tiles, tuple(e.layers) or (2, 4), e.aggregation, profile.stats_weight)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@dataclass
class Fold:
    """One held-out shot: bank shot indices, its negatives and positives (uint8, shot resolution)."""

    held_out: int
    bank: list[int]
    negatives: list[np.ndarray]
    positives: list[np.ndarray]
    kinds: list[str]


def make_folds(shots: list[np.ndarray], seed: int) -> list[Fold]:
    """Leave-one-shot-out folds with synthetic defects; deterministic in ``seed``."""
    rng = np.random.default_rng(seed + 7919)
    folds = []
    for i, shot in enumerate(shots):
        others = [j for j in range(len(shots)) if j != i]
        donors = [shots[j] for j in others] or [shot]
        negatives = [shot] + good_variants(shot, rng, GOOD_VARIANTS)
        kinds = [KINDS[(n + i) % len(KINDS)] for n in range(DEFECTS_PER_FOLD)]
        positives = []
        for n, kind in enumerate(kinds):
            base = negatives[n % len(negatives)]
            donor = donors[int(rng.integers(0, len(donors)))] if rng.random() < 0.5 else None
            positives.append(synthesize(base, kind, rng, donor))
        folds.append(Fold(i, others, negatives, positives, kinds))
    return folds


def group_by_encoding(candidates: list[Candidate]) -> dict[tuple, list[Candidate]]:
    """Candidates that share a backbone pass (network, resolution, tiling), so it runs once each."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.encoding_key, []).append(c)
    return groups


def pseudo_validate(
    shots: list[np.ndarray],
    candidates: list[Candidate],
    profile: Profile,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Score every candidate on the shots alone; return the record with the chosen one.

    ``shots``: the k good images at their own resolution (uint8 RGB). ``profile`` gives the
    scoring constants that are not tuned (top-k, smoothing, global weight).
    """
    from o2n_edge.scoring import ScoringConfig, augment_views, build_reference, score

    from .features import encode_trunk

    assert candidates, "no candidate to choose from"
    t0 = time.perf_counter()
    folds = make_folds(shots, seed)
    results: list[dict] = []
    for key, group in group_by_encoding(candidates).items():
        spec = group[0].encoder_spec(profile.encoder)
        side = spec.input_size
        views = [augment_views(im) for im in resize_uint8(shots, side)]
        fold_imgs = [im for f in folds for im in f.negatives + f.positives]
        flat = [v for vs in views for v in vs] + list(resize_uint8(fold_imgs, side))
        trunk = encode_trunk(spec, flat, progress=f"self-tune {group[0].name.split(' ')[0]}" if progress else None)
        n_views = len(views[0])
        offset = len(shots) * n_views
        for cand in group:
            feats = trunk.compose(cand.layers, cand.aggregation)
            shot_feats = [{k: v[i * n_views:(i + 1) * n_views] for k, v in feats.items()} for i in range(len(shots))]
            config = replace(ScoringConfig.from_profile(cand.apply(profile), ("pool",)), image_size=side)
            aurocs, negs, poss, pos_kinds = [], [], [], []
            pos_at = offset
            for f in folds:
                n_neg, n_pos = len(f.negatives), len(f.positives)
                if len(shots) > 1:
                    bank = [shot_feats[j] for j in f.bank]
                else:  # one shot: its rotations/flips are the bank, the shot itself is held out
                    bank = [{k: v[1:] for k, v in shot_feats[0].items()}]
                ref = build_reference(bank, config)
                idx = slice(pos_at, pos_at + n_neg + n_pos)
                s = score({k: v[idx] for k, v in feats.items()}, ref, config).scores
                pos_at += n_neg + n_pos
                neg, pos = s[:n_neg], s[n_neg:]
                aurocs.append(_auroc(neg, pos))
                negs.append(neg)
                poss.append(pos)
                pos_kinds += f.kinds
            neg, pos, kinds = np.concatenate(negs), np.concatenate(poss), np.array(pos_kinds)
            results.append({
                "candidate": cand.to_dict(),
                "pseudo_auroc": _auroc(neg, pos),
                "pseudo_auroc_within_fold": float(np.mean(aurocs)),
                "pseudo_tpr_at_0fpr": float((pos > neg.max()).mean()),
                "per_kind": {k: _auroc(neg, pos[kinds == k]) for k in KINDS if (kinds == k).any()},
            })
    order = {c.name: i for i, c in enumerate(candidates)}
    best = max(r["pseudo_auroc"] for r in results)
    near = [r for r in results if r["pseudo_auroc"] >= best - TIE]
    chosen = max(near, key=lambda r: (round(r["pseudo_tpr_at_0fpr"], 3), -order[r["candidate"]["name"]]))
    results.sort(key=lambda r: order[r["candidate"]["name"]])
    return {
        "method": "leave-one-shot-out on the shots + synthetic defects (" + ", ".join(KINDS) + ")",
        "folds": len(folds),
        "negatives_per_fold": 1 + GOOD_VARIANTS,
        "positives_per_fold": DEFECTS_PER_FOLD,
        "seed": seed,
        "chosen": chosen["candidate"],
        "pseudo_auroc": chosen["pseudo_auroc"],
        "candidates": results,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def candidate_from_record(record: dict) -> Candidate:
    c = dict(record["chosen"] if "chosen" in record else record)
    c.pop("name", None)
    c["layers"] = tuple(c["layers"])
    return Candidate(**c)
