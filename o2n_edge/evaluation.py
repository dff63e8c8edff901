"""Few-shot evaluation: shots x seeds on one category, metrics per run and mean ± std per shot count.

The test set is encoded once and reused for every (shots, seed) pair: the encoder is fixed, only
the reference built from the shots changes (with brightness matching, the images outside the
shots' range are encoded again, brought into it). Personalized runs (one per shots/seed) plug in via
:class:`NormalProvider`, so the diffusion-free baseline and the full method share this loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from o2n_edge.data import Dataset, load_image, load_mask, sample_shots
from o2n_edge.data.photometric import BrightnessRange, gains_for_levels, image_levels, shots_range
from o2n_edge.data.sampling import ALL_SHOTS, shot_count
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.detection_metrics import compute_metrics, mean_std
from o2n_edge.profiles import Profile
from o2n_edge.progress import progress_iter
from o2n_edge.reference import augment_views, build_reference
from o2n_edge.runtime.coreset import EXACT_MAX_ROWS, StreamingCoreset, coreset_size, greedy_coreset
from o2n_edge.runtime.scoring import Reference, Scorer, ScoringConfig

# With more shots than this, the standardization constants and the statistics bank come from
# the first LOO_SHOTS shots (they are nested across shot counts): the leave-one-shot-out search
# grows with shots squared, while constants from 8 good images already describe a good image.
LOO_SHOTS = 8
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_pro")
SCORE_BATCH = 16


class NormalProvider(Protocol):
    """Per (shots, seed): the generated pool and the normal versions of shots and test images."""

    def __call__(self, shot_paths: list, shots: int, seed: int) -> "PersonalizedViews":
        ...


@dataclass
class PersonalizedViews:
    """Images a personalized run contributes (uint8 arrays at any size; they are re-encoded)."""

    pool: np.ndarray | None = None  # (N,H,W,3) generated anomaly-free images
    normal_of: Callable[[np.ndarray], np.ndarray] | None = None  # batch of queries -> normal versions
    info: dict = field(default_factory=dict)  # wall times etc., copied into the run record


def text_features_for(encoder, category: str) -> np.ndarray:
    """(2, G) normalized mean embeddings of the normal and anomalous prompt ensembles."""
    from o2n_edge.prompts import prompt_ensemble

    rows = []
    for anomalous in (False, True):
        t = encoder.encode_text(prompt_ensemble(category, anomalous)).detach().double().mean(0)
        rows.append((t / t.norm()).float().numpy())
    return np.stack(rows)


def _encode(encoder, images: Sequence[np.ndarray], progress: str | None = None,
            brightness_range: BrightnessRange | None = None) -> dict[str, np.ndarray]:
    from o2n_edge.encoders import encode_images

    return encode_images(encoder, list(images), SCORE_BATCH, progress, brightness_range)


class _FixedFeatures:
    """The profile's one encoder: the test set loaded and encoded once."""

    def __init__(self, encoder, dataset: Dataset, draft: bool, progress: bool) -> None:
        self.encoder = encoder
        self.dataset, self.draft, self.progress = dataset, draft, progress
        self.size = encoder.input_size
        samples = dataset.test
        self.images = [load_image(s.path, self.size, draft) for s in progress_iter(samples, "load test images", progress)]
        self.masks = (np.stack([load_mask(s.mask_path, (self.size, self.size)) for s in samples])
                      if dataset.has_masks else None)
        self.test_feats = _encode(encoder, self.images, "encode test images" if progress else None)
        self.levels: np.ndarray | None = None  # the test images' mean grey levels (brightness matching)

    def test(self, brightness_range: BrightnessRange | None = None) -> dict[str, np.ndarray]:
        """The test set's features under a brightness range: encoded once, and only the images
        the range changes (gain != 1) encoded again, so matching costs an eval little time."""
        if brightness_range is None:
            return self.test_feats
        if self.levels is None:  # measured once: every run's range is applied to the same levels
            self.levels = np.array([image_levels(im[None])[0] for im in self.images])
        gains = gains_for_levels(self.levels, brightness_range)
        changed = np.flatnonzero(gains != 1.0)
        if not changed.size:
            return self.test_feats
        again = _encode(self.encoder, [self.images[i] for i in changed], None, brightness_range)
        out = {k: v.copy() for k, v in self.test_feats.items()}
        for k, v in again.items():
            out[k][changed] = v
        return out

    def encode(self, images: Sequence[np.ndarray], brightness_range: BrightnessRange | None = None) -> dict[str, np.ndarray]:
        return _encode(self.encoder, resize_uint8(list(images), self.size), None, brightness_range)


def evaluate(
    dataset: Dataset,
    profile: Profile,
    shots_list: Sequence[int],  # ALL_SHOTS = every training good
    seeds: Sequence[int],
    branches: Sequence[str],
    normal_provider: NormalProvider | None = None,
    progress: bool = True,
    encoder=None,
    coreset: float | None = None,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Run the few-shot protocol and return the result document (JSON-ready).

    ``shots_list``: shot counts; ``ALL_SHOTS`` (0) = every training good image of the category.
    ``coreset``: keep this fraction of the memory bank (greedy k-center, as ``export`` does with
    the profile's ratio), so the scores are those of the bank a bundle ships; None = whole bank.
    Either way the bank holds at most ``profile.bank_max_rows`` rows, as an exported one does.
    ``on_run``: called with each finished run record (benchmarks write results incrementally).
    """
    from o2n_edge.encoders import build_encoder

    t_start = time.perf_counter()
    if "personalized" in branches and normal_provider is None:
        raise ValueError("the personalized branch needs a personalized run (--run or on-the-fly personalization)")
    draft = bool(profile.jpeg_draft)
    source = _FixedFeatures(encoder if encoder is not None else build_encoder(profile.encoder), dataset, draft, progress)
    samples = dataset.test
    labels = np.array([s.label for s in samples], dtype=np.int64)
    text_features = None

    runs = []
    for k in shots_list:
        for seed in seeds:
            t_run = time.perf_counter()
            shot_paths = sample_shots(dataset.train_good, shot_count(k, len(dataset.train_good)), seed)
            config = ScoringConfig.from_profile(profile, tuple(branches))
            size = source.size
            if "text" in config.branches and text_features is None:
                text_features = text_features_for(source.encoder, dataset.category)
            shot_imgs = [load_image(p, size, draft) for p in shot_paths]
            levels = shots_range(shot_imgs, profile.brightness_tolerance)  # None when matching is off
            pool_feats = shot_normal = None
            normal_of = None
            info: dict = {}
            if normal_provider is not None:
                views = normal_provider(shot_paths, len(shot_paths), seed)
                info = dict(views.info)
                if views.pool is not None and "pool" in config.branches:
                    pool_feats = source.encode(resize_uint8(views.pool, size), levels)
                normal_of = views.normal_of
                if "personalized" in config.branches:
                    assert normal_of is not None, "the run gives no normal versions"
                    head_imgs = np.stack(shot_imgs[:LOO_SHOTS])
                    shot_normal = source.encode(resize_uint8(normal_of(head_imgs), size), levels)
            reference, bank_info = shot_reference(
                (source.encode(augment_views(im), levels) for im in shot_imgs), len(shot_imgs), config, text_features,
                pool_feats, shot_normal, ratio=coreset, max_rows=profile.bank_max_rows, seed=seed)
            info.update(bank_info)
            if levels is not None:
                info["brightness_range"] = list(levels)
            test_feats = source.test(levels)
            images = source.images
            scorer = Scorer(config, reference)
            scores, maps = [], []
            for start in progress_iter(range(0, len(samples), SCORE_BATCH), f"score k={len(shot_paths)} seed={seed}", progress):
                idx = slice(start, start + SCORE_BATCH)
                batch = {key: v[idx] for key, v in test_feats.items()}
                normal_feats = None
                if "personalized" in config.branches:
                    normals = normal_of(np.stack(images[idx]))
                    normal_feats = source.encode(resize_uint8(normals, size), levels)
                res = scorer.score(batch, normal_feats)
                scores.append(res.scores)
                if source.masks is not None:
                    maps.append(res.maps)
            all_scores = np.concatenate(scores)
            all_maps = np.concatenate(maps) if source.masks is not None else None
            metrics = compute_metrics(labels, all_scores, source.masks, all_maps)
            run = {
                "shots": len(shot_paths),
                **({"shots_requested": "all"} if k == ALL_SHOTS else {}),
                "seed": seed,
                "shot_images": [str(p.name) for p in shot_paths],
                **metrics,
                **info,
                "wall_s": round(time.perf_counter() - t_run, 3),
            }
            runs.append(run)
            if on_run is not None:
                on_run(run)
    return {
        "dataset": dataset.name,
        "category": dataset.category,
        "profile": profile.name,
        "branches": list(branches),
        "pool_size": int(runs[0].get("pool_size", 0)) if runs else 0,
        "num_test": len(samples),
        "num_anomalous": int(labels.sum()),
        "setting": fixed_setting(profile),
        "coreset": coreset,
        "runs": runs,
        "summary": summarize(runs),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }


def shot_reference(shot_feats: Iterator[dict[str, np.ndarray]], n_shots: int, config: ScoringConfig,
                   text_features: np.ndarray | None, pool_feats: dict[str, np.ndarray] | None,
                   shot_normal: dict[str, np.ndarray] | None, ratio: float | None, max_rows: int | None,
                   seed: int) -> tuple[Reference, dict]:
    """The reference of ``n_shots`` shots whose features arrive one shot at a time, with its bank info.

    Why streamed: at 448 px one shot's six views are 11 MB of patch features, so 200 shots would
    hold 2.3 GB. The first ``LOO_SHOTS`` shots are kept whole for the constants; every shot's
    patches feed the memory bank. A bank of at most ``EXACT_MAX_ROWS`` rows (every 1/2/4-shot bank
    at 448 px) takes the exact greedy coreset over all its rows; a bigger one a per-image
    coreset first (:class:`~o2n_edge.runtime.coreset.StreamingCoreset`).
    """
    from o2n_edge.reference import build_reference

    ratio = 1.0 if ratio is None else ratio
    head: list[dict[str, np.ndarray]] = []
    tail_globals: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    stream: StreamingCoreset | None = None
    coreset_s = 0.0
    for i, f in enumerate(shot_feats):
        patch = f["patch"].reshape(-1, f["patch"].shape[-1])
        if i == 0:
            pool_rows = 0 if pool_feats is None else int(np.prod(pool_feats["patch"].shape[:-1]))
            total = patch.shape[0] * n_shots + pool_rows
            if total > EXACT_MAX_ROWS:
                stream = StreamingCoreset(n_shots + (pool_feats is not None), ratio, max_rows, seed)
        if i < LOO_SHOTS:
            head.append(f)
        else:
            tail_globals.append(f["global"])
        if stream is not None:
            t0 = time.perf_counter()
            stream.add(patch)
            coreset_s += time.perf_counter() - t0
        elif i >= LOO_SHOTS:
            blocks.append(patch)
    reference = build_reference(head, config, text_features, pool_feats,
                                None if shot_normal is None else {k: v[:len(head)] for k, v in shot_normal.items()})
    t0 = time.perf_counter()
    if tail_globals:
        reference.global_bank = np.concatenate([reference.global_bank, *tail_globals]).astype(np.float32)
    rows_before = int(reference.memory_bank.shape[0]) + sum(len(b) for b in blocks)
    if stream is not None:
        if pool_feats is not None:
            stream.add(pool_feats["patch"].reshape(-1, pool_feats["patch"].shape[-1]))
        rows_before = stream.rows_seen
        reference.memory_bank = stream.rows()
        method = "streaming"
    else:
        bank = np.concatenate([reference.memory_bank, *blocks]) if blocks else reference.memory_bank
        if coreset_size(len(bank), ratio, max_rows) < len(bank):
            bank = bank[greedy_coreset(bank, ratio, seed=seed, max_rows=max_rows)]
        reference.memory_bank = np.ascontiguousarray(bank, dtype=np.float32)
        method = "exact"
    return reference, {"bank_rows": int(reference.memory_bank.shape[0]), "bank_rows_before": rows_before,
                       "bank_method": method, "constants_shots": len(head),
                       "coreset_s": round(coreset_s + time.perf_counter() - t0, 3)}


def fixed_setting(profile: Profile) -> str:
    """One line naming what the profile scores with, as ``eval`` prints it."""
    e = profile.encoder
    if not e.kind.startswith("efficientnet_lite"):
        return f"{e.kind} {e.model_name} at {e.input_size} px"
    tiles = f"x{e.tiles}t" if e.tiles > 1 else ""
    layers = ",".join(map(str, tuple(e.layers) or (2, 4)))
    name = f"{e.kind.replace('efficientnet_', '')}@{e.image_size}{tiles} L{layers} k{e.aggregation} g{profile.stats_weight:g}"
    tol = profile.brightness_tolerance
    matching = "" if tol is None else f", brightness kept within the shots' range ±{100 * tol:g}%"
    matching += ", one shot's statistics scaled by its regions" if profile.stats_region_floor else ""
    matching += f", bank searched in {profile.search_dims} principal axes" if profile.search_dims else ""
    if profile.search_precision == "int8":
        from o2n_edge.runtime.bank_search import INT8_CANDIDATES

        matching += f", bank searched in int8 ({INT8_CANDIDATES} candidates re-ranked in float32)"
    return (f"{name}, border rings {profile.border_fraction:g}, global cosine weight {profile.global_weight:g}"
            f"{matching}")


def summarize(runs: list[dict]) -> list[dict]:
    """Mean ± std over seeds per shot count (population std; None where a metric is missing)."""
    out = []
    for k in sorted({r["shots"] for r in runs}):
        group = [r for r in runs if r["shots"] == k]
        row: dict = {"shots": k, "seeds": [r["seed"] for r in group]}
        for key in METRIC_KEYS:
            vals = [r[key] for r in group if r.get(key) is not None]
            if vals:
                m, s = mean_std(vals)
                row[key] = {"mean": m, "std": s}
            else:
                row[key] = None
        row["wall_s"] = round(sum(r["wall_s"] for r in group), 3)
        out.append(row)
    return out
