"""`o2n-edge learn`: grow a bundle's memory bank from vetted line images, or roll back to its parent.

Torch-free (base install + onnxruntime): it runs on the line device, where the kept images and the
operators' verdicts are. The work is in :mod:`o2n_edge.runtime.learn_bundle`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from o2n_edge.cli.common import USER_ERRORS, app, fail


@app.command("learn")
def learn_cmd(
    bundle: Optional[Path] = typer.Argument(None, help="The verified bundle to learn from (the parent)."),
    log: Optional[Path] = typer.Option(None, "--log", help="The results log (SQLite) holding the operators' verdicts."),
    images: Optional[Path] = typer.Option(None, "--images", help="The keep directory (serve --keep-images): <sha256>.<ext> files."),
    out: Optional[Path] = typer.Option(None, "--out", help="The NEW bundle to write (learn), or where to copy the parent (--rollback)."),
    auto_good: Optional[float] = typer.Option(None, "--auto-good", help="Also add images the parent scored below this quantile of its calibration scores that carry no verdict (off by default)."),
    holdout: float = typer.Option(0.3, "--holdout", help="Fraction of newly good-marked images held out of the bank to recalibrate the threshold."),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Row budget of the memory bank (default and upper bound: the bundle's own, as exported; lite 8,192); smaller keeps latency down."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration split and the coreset."),
    skip_conflicts: bool = typer.Option(False, "--skip-conflicts", help="Leave out images marked both good and defect instead of stopping."),
    rollback: Optional[Path] = typer.Option(None, "--rollback", help="A learned bundle: check its parent still verifies and print it (copy it to --out when given)."),
    parent: Optional[Path] = typer.Option(None, "--parent", help="With --rollback: where the parent is now, if it moved (its hash is checked)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Add good-marked kept images to a bundle's memory bank and recalibrate: writes a NEW bundle with its lineage."""
    from o2n_edge.runtime.learn_bundle import LearnOptions, learn, rollback as do_rollback

    try:
        if rollback is not None:
            if bundle is not None:
                fail("give either BUNDLE (learn) or --rollback NEW, not both")
            res = do_rollback(rollback, out=out, parent=parent, force=force)
            doc = {"bundle": str(res.bundle), "parent": str(res.parent), "parent_hash": res.parent_hash,
                   "copied_to": None if res.copied_to is None else str(res.copied_to)}
            if as_json:
                typer.echo(json.dumps(doc, indent=2))
            elif res.copied_to is not None:
                typer.echo(f"parent {res.parent_hash[:16]}… ({res.parent}) verifies; copied to {res.copied_to}")
            else:
                typer.echo(f"parent of {res.bundle}: {res.parent} (hash {res.parent_hash[:16]}…, verifies); "
                           f"serve it, or pass --out DIR for a copy")
            return
        if bundle is None or log is None or images is None or out is None:
            fail("learn needs BUNDLE, --log, --images and --out (or --rollback NEW)")
        say = (lambda m: None) if as_json else (lambda m: typer.echo(m, err=True))
        s = learn(LearnOptions(bundle=bundle, log=log, images=images, out=out, auto_good=auto_good, holdout=holdout,
                               seed=seed, max_rows=max_rows, skip_conflicts=skip_conflicts, force=force), say)
    except USER_ERRORS as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"out": str(s.out), "added": s.added, "calibration": s.calibration,
                               "skipped": s.skipped, "threshold": s.threshold, "coreset": s.coreset,
                               "auto_good": s.auto_good, "manifest_sha256": s.manifest.get("manifest_sha256")},
                              indent=2))
        return
    rules: dict[str, int] = {}
    for a in s.added:
        rules[a["rule"]] = rules.get(a["rule"], 0) + 1
    t = s.threshold
    typer.echo(f"wrote {s.out}: {len(s.added)} images added ({', '.join(f'{n} {r}' for r, n in rules.items())}), "
               f"{len(s.calibration)} held out for calibration, {len(s.skipped)} skipped; threshold "
               f"{t['parent']:.4f} -> {t['value']:.4f}" + ("" if t["recalibrated"] else f" (kept: {t['reason']})"))
