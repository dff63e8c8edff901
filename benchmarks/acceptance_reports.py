"""Acceptance reports of shipped bundles, each with a headless-Chromium screenshot, plus a summary table.

Usage:
  python -m benchmarks.acceptance_reports --name hazelnut_lite --bundle bundles/hazelnut-lite \\
      --data ../shared/data/hazelnut_toy [--category hazelnut] [--dataset textile] \\
      [--note "bundle from commit abc123: o2n-edge export ..."]
Writes benchmarks/results/reports/<name>/{report.html, report.json, screenshot.png} (the report is
what `o2n-edge report` writes) and rebuilds benchmarks/results/reports/summary.{json,md} from every
report there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import set_threads
from benchmarks.harness import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results" / "reports"
SCREENSHOT = "screenshot.png"


def _pct_ci(r: dict) -> str:
    return f"{r['count']}/{r['n']} = {100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def summary_markdown(rows: list[dict]) -> str:
    """One row per report; the per-type escapes in the last column."""
    head = ["report", "data set", "bundle", "test images (good / defective)", "threshold",
            "false rejects at the bundle's threshold (95% CI)", "escapes at the bundle's threshold (95% CI)",
            "1% FRR threshold", "false rejects there", "escapes there", "image AUROC", "pixel AUROC", "PRO (0.3)",
            "escapes per type (bundle's threshold)", "wall s"]
    lines = ["# Acceptance reports (`o2n-edge report`)", "",
             ("Rates in percent with Clopper-Pearson 95% intervals; an image is rejected when its score is above "
              "the threshold. The 1% FRR threshold is chosen on the test set itself (optimistic). "
              "Each report's page, JSON and screenshot are in its folder."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in rows:
        b, op, opt = d["bundle"], d["at_bundle_threshold"], d["at_target_frr"]
        per_type = ", ".join(f"{r['defect']} {r['escape']['count']}/{r['n']}" for r in d["per_type"])
        lines.append("| " + " | ".join([
            d["name"], f"{d['dataset']['name']}/{d['dataset']['category']}",
            f"{b['profile']}, {'+'.join(b['branches'])}, {b['shots']} shots",
            f"{d['n_good']} / {d['n_defective']}", f"{op['threshold']:.4g}",
            _pct_ci(op["false_reject"]), _pct_ci(op["escape"]), f"{opt['threshold']:.4g}",
            _pct_ci(opt["false_reject"]), _pct_ci(opt["escape"]), _num(d["metrics"]["image_auroc"]),
            _num(d["metrics"]["pixel_auroc"]), _num(d["metrics"]["pixel_pro"]), per_type, f"{d['wall_s']:.0f}",
        ]) + " |")
    notes = [f"- {d['name']}: " + "; ".join(f"{k}: {v}" for k, v in d.get("provenance", {}).items())
             for d in rows if d.get("provenance")]
    return "\n".join(lines + [""] + notes) + "\n"


def rebuild_summary(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("*/report.json")):
        d = json.loads(path.read_text())
        d["name"] = path.parent.name
        rows.append(d)
    slim = [{k: d[k] for k in ("name", "bundle", "dataset", "provenance", "n_test", "n_good", "n_defective",
                               "confidence", "target_frr", "metrics", "at_bundle_threshold", "at_target_frr",
                               "per_type", "wall_s") if k in d} for d in rows]
    write_json(out / "summary.json", {"reports": slim})
    write_text(out / "summary.md", summary_markdown(rows))
    return rows


def main() -> None:
    from o2n_edge.acceptance import build_report
    from benchmarks.harness import screenshot_page
    from o2n_edge.data import load_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="folder name under benchmarks/results/reports/")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--dataset", default=None, help="textile for the built-in set; default: detect")
    p.add_argument("--category", default=None, help="default: the bundle's")
    p.add_argument("--target-frr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", action="append", default=[], help="KEY=VALUE provenance shown on the page (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    set_threads(a.threads)
    provenance = {}
    for item in a.note:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--note {item!r}: expected KEY=VALUE")
        provenance[key] = value
    manifest = json.loads((a.bundle / "manifest.json").read_text())
    ds = load_dataset(a.data, a.dataset, a.category or manifest["category"])
    target = a.out / a.name
    summary = build_report(a.bundle, ds, target, threads=a.threads, target_frr=a.target_frr, provenance=provenance)
    shot = screenshot_page(summary.html, target / SCREENSHOT)
    if shot["images_loaded"] != shot["images"]:
        raise SystemExit(f"{shot['images'] - shot['images_loaded']} image(s) of the page did not decode")
    rows = rebuild_summary(a.out)
    print(summary_markdown(rows))


if __name__ == "__main__":
    main()
