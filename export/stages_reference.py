"""Export stages that make the scoring constants: the reference, its coreset, the threshold.

Why here, with the torch encoder: the reference (memory bank, text features, standardization)
and the threshold are computed once on the workstation and shipped as arrays, and the threshold
is calibrated with the same numpy scoring the runtime uses (``o2n_edge.runtime.scoring``), so
the runtime only has to reproduce the encoder's features for a score to match.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from o2n_edge.data import load_image
from o2n_edge.export.export_state import ExportState, say

def build_reference(state: ExportState) -> None:
    """Encode the shots (augmented views), the pool and the personalized normals; build the reference.

    For the personalized branch this also fixes ``state.normal_of`` (image -> its one-to-normal
    transform at the encoder's size), which the threshold calibration reuses.
    """
    from o2n_edge.data.preprocess import resize_uint8
    from o2n_edge.encoders import encode_images
    from o2n_edge.evaluation import text_features_for
    from o2n_edge.reference import augment_views
    from o2n_edge.reference import build_reference as make_reference

    say(state.opts.progress, "building the reference (memory bank, text features, constants)")
    encoder, size, branches = state.encoder, state.size, state.plan.branches
    levels = state.brightness_range
    shot_feats = [encode_images(encoder, augment_views(im), brightness_range=levels) for im in state.shot_imgs]
    pool_feats = (encode_images(encoder, resize_uint8(state.pool_imgs, size), brightness_range=levels)
                  if state.pool_imgs is not None else None)
    text_features = text_features_for(encoder, state.dataset.category) if "text" in branches else None
    shot_normal = None
    if "personalized" in branches:
        from o2n_edge.diffusion import one_to_normal

        run, seed = state.run, state.opts.seed

        def normal_of(images: np.ndarray) -> np.ndarray:
            return resize_uint8(one_to_normal(run, images, seed=seed).normals, size)

        state.normal_of = normal_of
        shot_normal = encode_images(encoder, normal_of(np.stack(state.shot_imgs)), brightness_range=levels)
    state.reference = make_reference(shot_feats, state.plan.config, text_features, pool_feats, shot_normal)


def apply_coreset(state: ExportState) -> None:
    """Subsample the memory bank (greedy k-center) to the requested ratio, within the profile's row budget.

    Why: nearest-neighbour search cost grows with the bank; PatchCore's coreset keeps the bank's
    coverage at a fraction of its rows, and ``Profile.bank_max_rows`` bounds it however many
    shots there are. ``state.coreset`` records what was done for the manifest.
    """
    from o2n_edge.runtime.coreset import PROJECTION_DIM, coreset_size, greedy_coreset

    reference = state.require_reference()
    bank_rows = int(reference.memory_bank.shape[0])
    info: dict[str, Any] = {"ratio": 1.0, "rows_before": bank_rows, "rows_after": bank_rows}
    wanted = state.opts.coreset_ratio if state.opts.coreset_ratio is not None else state.plan.profile.coreset_ratio
    ratio = wanted if wanted is not None else 1.0
    max_rows = state.plan.profile.bank_max_rows
    info["max_rows"] = int(max_rows)  # the row budget `learn` keeps when it grows the bank
    if coreset_size(bank_rows, ratio, max_rows) < bank_rows:
        say(state.opts.progress, f"coreset: keeping {ratio:g} of {bank_rows} memory-bank rows (at most {max_rows})")
        idx = greedy_coreset(reference.memory_bank, ratio, seed=state.opts.seed, max_rows=max_rows)
        reference.memory_bank = reference.memory_bank[idx]
        info = {"ratio": float(ratio), "max_rows": int(max_rows), "rows_before": bank_rows, "rows_after": int(len(idx)),
                "method": f"greedy k-center (PatchCore), random projection to {PROJECTION_DIM} dims"}
    state.coreset = info


def calibrate_threshold(state: ExportState) -> None:
    """Score the held-out good images (torch encoder, the runtime's scoring); threshold = their quantile.

    The scores are kept: the parity check compares the runtime's scores on the same images.
    """
    from o2n_edge.encoders import encode_images
    from o2n_edge.runtime.scoring import score

    reference = state.require_reference()
    say(state.opts.progress, f"calibrating the threshold on {len(state.calib_paths)} held-out good images")
    encoder = state.encoder
    state.calib_imgs = [load_image(p, state.size, state.draft) for p in state.calib_paths]
    levels = state.brightness_range
    calib_feats = encode_images(encoder, state.calib_imgs, brightness_range=levels)
    normal_of = state.normal_of
    calib_normal = (encode_images(encoder, normal_of(np.stack(state.calib_imgs)), brightness_range=levels)
                    if normal_of else None)
    state.calib_scores = score(calib_feats, reference, state.plan.config, calib_normal).scores
    state.threshold = float(np.quantile(state.calib_scores, state.opts.threshold_quantile))
