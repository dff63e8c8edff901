"""Accuracy cost of fp16, int8 and coreset banks, through the runtime on real test sets.

Usage:
  python -m benchmarks.variants --set hazelnut:../shared/data/hazelnut_toy:bundles/study/hazelnut \\
      [--set tire:../shared/data/mvtec3d_rgb:bundles/study/tire] [--set textile:textile:bundles/study/textile]

Each --set is CATEGORY:DATA:PREFIX, DATA a data root or ``textile`` (the built-in set). The
variants are PREFIX-fp32 (the reference), PREFIX-fp32 with its UNet and image encoder quantized
to int8 dynamically, and statically (QDQ, calibrated on the held-out good images the export
calibrated its threshold on: never the test set) for the UNet alone and for UNet + encoder, and
every other PREFIX-* bundle that exists (e.g. PREFIX-fp16, PREFIX-coreset10), all
exported from the same personalized run (``o2n-edge export --run RUN [--precision fp16]
[--coreset 0.1] --out PREFIX-...``). Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from o2n_edge.bench.env import load_average, machine_stamp, set_threads
from o2n_edge.bench.quantize import CACHE_DIR, quantized_overrides
from o2n_edge.bench.report import write_json, write_text
from o2n_edge.bench.variants import Variant, variants_markdown, variants_study

RESULTS = Path(__file__).resolve().parent / "results"


def variants_of(prefix: Path, data: Path | None, dataset: str | None, category: str) -> list[Variant]:
    """fp32 first (the reference), then int8 on top of it, then the other exported variants."""
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.export.build import calibration_images
    from o2n_edge.export.int8_static import static_int8_overrides
    from o2n_edge.runtime.bundle import load_bundle

    ref = Path(f"{prefix}-fp32")
    if not (ref / "manifest.json").is_file():
        raise SystemExit(f"{ref}: no bundle (export the fp32 reference first)")
    ds = load_dataset(data, dataset, category)
    shots = set(load_bundle(ref).manifest["shots"]["images"])
    calib = [load_image(p) for p in calibration_images(ds, [p for p in ds.train_good if p.name in shots])]
    static = static_int8_overrides(ref, calib, CACHE_DIR, "minmax")
    out = [Variant("fp32", ref), Variant("int8 (dynamic)", ref, quantized_overrides(ref)),
           Variant(f"int8 static UNet ({len(calib)} calibration images)", ref, {"unet": static["unet"]}),
           Variant("int8 static UNet + encoder", ref, static)]
    for other in sorted(prefix.parent.glob(prefix.name + "-*")):
        suffix = other.name[len(prefix.name) + 1:]
        if other != ref and (other / "manifest.json").is_file():
            out.append(Variant(suffix, other))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True, help="CATEGORY:DATA:PREFIX")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="variants_lite")
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    set_threads(a.threads)
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "note": a.note, "results": []}
    for s in a.set:
        parts = s.split(":")
        if len(parts) != 3 or not all(parts):
            p.error(f"--set {s!r}: expected CATEGORY:DATA:PREFIX")
        category, data, prefix = parts
        builtin = data == "textile"
        root, layout = (None, "textile") if builtin else (Path(data), None)
        doc["results"].append(variants_study(variants_of(Path(prefix), root, layout, category), root, layout,
                                             category, a.threads))
        print(f"{category}: done", flush=True)
    doc["machine"]["load_average_end"] = load_average()
    write_json(a.out / f"{a.name}.json", doc)
    write_text(a.out / f"{a.name}.md", variants_markdown(doc))
    print(variants_markdown(doc))


if __name__ == "__main__":
    main()
