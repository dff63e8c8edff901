"""``o2n-edge learn``: a verified parent bundle + vetted kept images -> a NEW verified bundle; and rollback.

Why a new bundle and never an edit: every change to what the line accepts must be reviewable and
undoable. The parent is only read; the child is staged beside ``out`` and renamed in whole by
:class:`~o2n_edge.runtime.bundle_writer.BundleWriter` (torch-free), so a run killed midway leaves
the parent as it was and no half-written child. The child's manifest names its ``lineage``
(:class:`~o2n_edge.runtime.manifest.Lineage`): the parent's hash and path, every image added and
the rule that let it in, the held-out calibration images, the skipped images and why. Rollback
reads that lineage back and hands out the parent, after checking it still verifies.

Runs with the base install + onnxruntime: no torch anywhere on this path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.runtime.bundle import load_bundle, verify_bundle
from o2n_edge.runtime.learn_bank import MAX_BANK_ROWS, calibrate, encode_views, extend_reference, score_images
from o2n_edge.runtime.learn_vetting import KeptImage, LearnError, vet
from o2n_edge.runtime.manifest import BundleManifest, Lineage, Threshold, load_manifest, need
from o2n_edge.runtime.scoring import scoring_manifest

MIN_CALIBRATION_IMAGES = 8  # fewer held-out good images: the parent's threshold is kept (and the run says so)
REPLACED = ("memory_bank.npy", "global_bank.npy", "stats_bank.npy", "stats_scale.npy")
BUILT_KEYS = ("files", "manifest_sha256", "schema_version", "versions")  # BundleWriter writes these


@dataclass
class LearnOptions:
    """What ``o2n-edge learn`` was asked to do (the CLI's options)."""

    bundle: Path
    log: Path
    images: Path
    out: Path
    auto_good: float | None = None
    holdout: float = 0.3
    seed: int = 0
    max_rows: int | None = None
    skip_conflicts: bool = False
    force: bool = False
    constants: str = "pooled"  # learn_bank.CONSTANT_RULES; anything but "pooled" is for studies


@dataclass
class LearnSummary:
    """What the run did, for the user and the tests."""

    out: Path
    added: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    threshold: dict[str, Any]
    coreset: dict[str, Any]
    auto_good: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def verified_manifest(path: Path) -> BundleManifest:
    """The manifest of a bundle that verifies; :class:`LearnError` listing why not."""
    problems = verify_bundle(path)
    if problems:
        raise LearnError(f"{path} does not verify:\n  " + "\n  ".join(problems))
    return load_manifest(path)


def parent_image_count(md: BundleManifest) -> int:
    """How many good images the parent's constants stand on: its shots plus every image its lineage added.

    The pooling weight of the parent's constants (learn_bank): a 4-shot export weighs 4, its child
    after 3 added images 7, and so on.
    """
    shots = md.shots
    k = (shots.k if shots and shots.k else len(shots.images or []) if shots else 0) or 1
    old = md.lineage
    return int(k + (len(old.earlier or []) + len(old.added or []) if old else 0))


def _decode(pipe: Any, items: list[KeptImage], skipped: list[dict[str, Any]]) -> tuple[list[KeptImage], list[np.ndarray]]:
    """Decode kept images the way the line did; an undecodable one is skipped, not fatal."""
    ok, arrays = [], []
    for k in items:
        try:
            arrays.append(pipe.decode(k.data, k.path.name))
            ok.append(k)
        except ValueError as exc:
            skipped.append({"sha256": k.sha256, "rule": k.rule, "reason": f"cannot decode: {exc}"})
    return ok, arrays


def learn(opts: LearnOptions, say: Callable[[str], None] = lambda _m: None) -> LearnSummary:
    """Vet, encode, grow the bank, re-measure its constants, recalibrate, write the child bundle."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    parent_dir = opts.bundle.resolve()
    if opts.out.resolve() == parent_dir:
        raise LearnError("--out must be a new directory, not the parent bundle")
    if opts.out.exists() and not opts.force:
        raise LearnError(f"{opts.out} exists; pass --force to replace it")
    md = verified_manifest(parent_dir)
    branches = md.branches
    if "pool" not in branches:
        raise LearnError(f"{parent_dir} scores with {', '.join(branches) or 'no branch'}: learning adds to the "
                         "pool branch's memory bank, which this bundle does not have")
    vetted = vet(md, opts.log, opts.images, auto_good=opts.auto_good, holdout=opts.holdout, seed=opts.seed,
                 skip_conflicts=opts.skip_conflicts)
    if vetted.auto_good:
        say(f"auto-good: cutoff {vetted.auto_good['cutoff']:.4f} ({vetted.auto_good['from']})")
    pipe = OrtPipeline(load_bundle(parent_dir), SessionOptions(bank_search="numpy"))
    bank_items, bank_imgs = _decode(pipe, vetted.bank, vetted.skipped)
    cal_items, cal_imgs = _decode(pipe, vetted.calibration, vetted.skipped)
    for s in vetted.skipped:
        say(f"skipped {s.get('sha256', '?')[:16]}…: {s['reason']}")
    if not bank_items:
        raise LearnError("nothing vetted to add to the bank (no usable good verdict"
                         + (" or auto-good image" if opts.auto_good is not None else "")
                         + f"; {len(vetted.skipped)} skipped, {len(cal_items)} held out for calibration): "
                         "no bundle written")
    say(f"encoding {len(bank_items)} images (augmented views) with the bundle's image encoder")
    coreset = (md.memory_bank.coreset or {}) if md.memory_bank else {}
    ratio = float(coreset.get("ratio", 1.0))
    # the row budget the bundle was exported with (its profile's), so a learned bank costs the line
    # what the parent's did; --max-rows can only lower it
    budget = int(coreset.get("max_rows") or MAX_BANK_ROWS)
    max_rows = min(opts.max_rows or budget, budget)
    reference, cinfo = extend_reference(pipe.scorer.reference, pipe.params, encode_views(pipe, bank_imgs),
                                        ratio=ratio, max_rows=max_rows, seed=opts.seed, constants=opts.constants,
                                        parent_images=parent_image_count(md))
    say(f"memory bank: {cinfo['rows_parent']} + {cinfo['rows_added']} rows -> {cinfo['rows_after']}")
    parent_t = need(md.threshold, "threshold")
    quantile = float(parent_t.quantile if parent_t.quantile is not None else 0.99)
    cal_scores = score_images(pipe, pipe.params, reference, cal_imgs) if cal_imgs else np.zeros(0)
    trec = calibrate(cal_scores, quantile, float(parent_t.value), MIN_CALIBRATION_IMAGES, say)
    manifest = _child_manifest(md, parent_dir, reference, pipe.params, cinfo, trec, cal_scores,
                               bank_items, cal_items, vetted.skipped)
    written = write_child(parent_dir, opts.out, md, reference, manifest, force=opts.force)
    say(f"wrote {opts.out} (lineage: parent {md.manifest_sha256[:16]}…, {len(bank_items)} images added)")
    return LearnSummary(out=opts.out, added=[k.record() for k in bank_items],
                        calibration=[{**k.record(), "score": float(s)} for k, s in zip(cal_items, cal_scores)],
                        skipped=vetted.skipped, threshold=trec, coreset=cinfo, auto_good=vetted.auto_good,
                        manifest=written)


def _child_manifest(md: BundleManifest, parent_dir: Path, reference: Any, config: Any, cinfo: dict[str, Any],
                    trec: dict[str, Any], cal_scores: np.ndarray, added: list[KeptImage],
                    calibration: list[KeptImage], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """The parent's manifest with the new bank, constants, threshold and lineage (the writer adds files/hash)."""
    out = {k: v for k, v in md.to_dict().items() if k not in BUILT_KEYS}
    out["scoring"] = scoring_manifest(config, reference)
    fusion = dict(out.get("fusion") or {})
    fusion["norm"] = {k: list(v) for k, v in reference.norm.items()}
    out["fusion"] = fusion
    bank = reference.memory_bank
    mb = dict(out.get("memory_bank") or {})
    mb.update(rows=int(bank.shape[0]), dim=int(bank.shape[1]), coreset=cinfo)
    out["memory_bank"] = mb
    parent_t = need(md.threshold, "threshold")
    if trec["recalibrated"]:
        out["threshold"] = Threshold(value=trec["value"], method="quantile of held-out operator-good images' scores "
                                     "(o2n-edge learn)", quantile=trec["quantile"], n_images=len(calibration),
                                     images=[k.path.name for k in calibration],
                                     scores=[float(s) for s in cal_scores]).to_dict()
    else:
        out["threshold"] = parent_t.to_dict()
    old = md.lineage
    earlier = (list(old.earlier or []) + [a["sha256"] for a in old.added or []]) if old else []
    out["lineage"] = Lineage(
        parent_hash=md.manifest_sha256, parent_path=str(parent_dir),
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        added=[k.record() for k in added], earlier=earlier,
        calibration=[{**k.record(), "score": float(s)} for k, s in zip(calibration, cal_scores)],
        skipped=skipped, threshold=trec, constants=cinfo.get("constants")).to_dict()
    return out


def write_child(parent_dir: Path, out: Path, md: BundleManifest, reference: Any, manifest: dict[str, Any],
                force: bool = False) -> dict[str, Any]:
    """Stage the parent's other files, the new arrays and the manifest; rename in whole (or nothing)."""
    from o2n_edge.runtime.bundle_writer import BundleWriter

    with BundleWriter(out, force=force) as w:
        for name in md.files:
            if name not in REPLACED:
                shutil.copy2(parent_dir / name, w.path(name))
        w.add_array("memory_bank", reference.memory_bank.astype(np.float32))
        w.add_array("global_bank", reference.global_bank.astype(np.float32))
        if reference.stats_bank is not None and "stats_bank.npy" in md.files:
            w.add_array("stats_bank", reference.stats_bank.astype(np.float32))
            w.add_array("stats_scale", reference.stats_scale.astype(np.float32))
        return w.write_manifest(manifest)


@dataclass
class RollbackResult:
    """The parent a learned bundle came from, verified; ``copied_to`` when it was restored."""

    bundle: Path
    parent: Path
    parent_hash: str
    copied_to: Path | None = None


def rollback(bundle: Path, out: Path | None = None, parent: Path | None = None, force: bool = False) -> RollbackResult:
    """The verified parent of ``bundle`` (its lineage's path, or ``parent``), copied to ``out`` when given.

    The parent must still exist and its manifest hash must be the one the lineage names: a
    directory that now holds another bundle is refused, not handed out.
    """
    md = load_manifest(bundle)
    if md.lineage is None:
        raise LearnError(f"{bundle} has no lineage: it was exported, not learned, so it has no parent to roll back to")
    where = parent or Path(need(md.lineage.parent_path, "lineage.parent_path"))
    if not (where / "manifest.json").is_file():
        raise LearnError(f"the parent {where} (hash {md.lineage.parent_hash[:16]}…) no longer exists: "
                         "pass --parent DIR where a copy of it is")
    pmd = verified_manifest(where)
    if pmd.manifest_sha256 != md.lineage.parent_hash:
        raise LearnError(f"{where} holds bundle {pmd.manifest_sha256[:16]}…, not the parent "
                         f"{md.lineage.parent_hash[:16]}… named in {bundle}'s lineage")
    result = RollbackResult(bundle=bundle, parent=where, parent_hash=pmd.manifest_sha256)
    if out is not None:
        from o2n_edge.atomic import AtomicDir

        if out.exists() and not force:
            raise LearnError(f"{out} exists; pass --force to replace it")
        with AtomicDir(out, replace=force) as tmp:  # a copy that does not verify is never renamed in
            shutil.copytree(where, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("engines"))
            problems = verify_bundle(tmp)
            if problems:
                raise LearnError("the copy of the parent does not verify:\n  " + "\n  ".join(problems))
        result.copied_to = out
    return result
