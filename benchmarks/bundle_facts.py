"""What a set of bundles holds, from their verified manifests: branches, graphs and their ONNX
validation errors, fusion weights, transform settings (personalized bundles), size.

Why from the manifests: they are what the device reads, so the table shows what was shipped, not
what a profile says. Only keys every current bundle writes are read; the weights come from the
``scoring`` section (the one the runtime scores with).

Usage: python -m benchmarks.bundle_facts --bundle bundles/a --bundle bundles/b --name bundle_facts_lite
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def facts(path: Path) -> dict[str, Any]:
    """One bundle's row (loading it verifies every file hash first)."""
    from o2n_edge.runtime.bundle import load_bundle

    b = load_bundle(path)  # verifies every hash
    m = b.manifest
    return {
        "bundle": path.name,
        "category": m["category"],
        "profile": m["profile"],
        "branches": m["scoring"]["branches"],
        "weights": m["scoring"]["weights"],
        "transform": m.get("transform"),
        "diffusion_image_size": m.get("diffusion_image_size"),
        "validation_max_abs": {k: max(v["validation"].values()) for k, v in m["models"].items() if v.get("validation")},
        "memory_bank_rows": m["memory_bank"]["rows"],
        "mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1),
    }


def main() -> None:
    """Write benchmarks/results/<name>.{json,md} for the bundles given."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", action="append", required=True, type=Path)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    rows = [facts(p) for p in args.bundle]
    graphs = ["image_encoder", "vae_encoder", "unet", "vae_decoder"]
    lines = ["| bundle | branches | weights | transform | MB | " + " | ".join(graphs) + " |",
             "|---|---|---|---|---|" + "---|" * len(graphs)]
    for r in rows:
        t = r["transform"]
        tr = f"strength {t.get('strength')}, {t.get('steps_run')} step" if t else "none"
        errs = [f"{r['validation_max_abs'][g]:.1e}" if g in r["validation_max_abs"] else "—" for g in graphs]
        lines.append(f"| {r['bundle']} ({r['category']}) | {', '.join(r['branches'])} | {r['weights']} | {tr} | "
                     f"{r['mb']} | " + " | ".join(errs) + " |")
    md = (f"# {args.name}\n\n`python -m benchmarks.bundle_facts {' '.join('--bundle ' + str(p) for p in args.bundle)} "
          f"--name {args.name}`. Per graph: max |ONNX - torch| over the export's validation cases (batches 2 and 3 "
          "and real inputs; tolerance 1e-3 x max(1, max |output|)).\n\n" + "\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
