"""What more good images buy: image/pixel AUROC, bank rows and scoring time vs shots.

Why: with a row budget (``Profile.bank_max_rows``) a user can give every good image they have
(``eval --shots all``) without the per-image search growing; this measures whether the extra
images still help once the bank is capped, and what building that bank costs.

Per (set, shots): one ``evaluate`` run (lite, pool branch, seed 0) at ``--image-size`` (224 by
default: 448 px over 5 shot counts x 3 sets does not fit a shared 2-core CPU). Scoring time is
the eval's own scoring per test image (batches of 16, 1 thread, the profile's bank search), without the encoder, which
does not depend on the shots. Shot counts above a set's training goods are skipped.

Usage: python -m benchmarks.many_shots [--image-size 224] [--shots 1,4,16,64,all] [--data ../shared/data]
       [--name many_shots_448]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_result

NAME = "many_shots"
SETS = {"hazelnut": ("hazelnut_toy", "hazelnut"), "tire": ("mvtec3d_rgb", "tire"), "textile": (None, "textile")}


def _timed_scorer(evaluation, spent: list[float]):
    """The eval's Scorer, with the time of every ``score`` call added to ``spent``."""
    base = evaluation.Scorer

    class TimedScorer(base):  # type: ignore[misc, valid-type]
        def score(self, *args, **kwargs):
            t = time.perf_counter()
            out = super().score(*args, **kwargs)
            spent.append(time.perf_counter() - t)
            return out

    return TimedScorer


def _eval(evaluation, ds, profile, k: int, encoder, exact: bool) -> tuple[dict, list[float], int]:
    """One run (seed 0); ``exact`` forces one greedy over the whole bank instead of the streamed stage."""
    spent: list[float] = []
    original, limit = evaluation.Scorer, evaluation.EXACT_MAX_ROWS
    evaluation.Scorer = _timed_scorer(evaluation, spent)
    if exact:
        evaluation.EXACT_MAX_ROWS = 10**12
    try:
        doc = evaluation.evaluate(ds, profile, [k], [0], ("pool",), progress=False, encoder=encoder,
                                  coreset=profile.coreset_ratio)
    finally:
        evaluation.Scorer, evaluation.EXACT_MAX_ROWS = original, limit
    return doc["runs"][0], spent, doc["num_test"]


def run(data: Path, size: int, shots: list[str], sets: list[str], compare_exact: bool,
        on_row=None) -> list[dict]:
    import o2n_edge.evaluation as evaluation
    from o2n_edge.data import load_dataset
    from o2n_edge.data.sampling import ALL_SHOTS
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import get_profile, with_options

    set_threads(1)
    profile = with_options(get_profile("lite"), image_size=size)
    encoder = build_encoder(profile.encoder)
    rows = []
    for name in sets:
        root, cat = SETS[name]
        ds = load_dataset(None if root is None else data / root, "textile" if root is None else None, cat)
        ks = [ALL_SHOTS if s == "all" else int(s) for s in shots]
        ks = [k for k in ks if k == ALL_SHOTS or k < len(ds.train_good)]
        for k in ks:
            r, spent, num_test = _eval(evaluation, ds, profile, k, encoder, exact=False)
            row = {"set": name, "image_size": size, "shots": r["shots"], "requested": "all" if k == ALL_SHOTS else k,
                   "image_auroc": r["image_auroc"], "pixel_auroc": r.get("pixel_auroc"),
                   "bank_rows": r["bank_rows"], "bank_rows_before": r["bank_rows_before"],
                   "bank_method": r["bank_method"], "coreset_s": r["coreset_s"],
                   "score_ms_per_image": round(1000 * sum(spent) / num_test, 1), "run_s": r["wall_s"]}
            if compare_exact and r["bank_method"] == "streaming":
                e, _, _ = _eval(evaluation, ds, profile, k, encoder, exact=True)
                row["exact"] = {key: e.get(key) for key in ("image_auroc", "pixel_auroc", "coreset_s")}
            rows.append(row)
            print(row, flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def _exact(r: dict) -> str:
    e = r.get("exact")
    if not e:
        return "-"
    pix = f"{e['pixel_auroc']:.4f}" if e.get("pixel_auroc") is not None else "-"
    return f"{e['image_auroc']:.4f} / {pix}, {e['coreset_s']}"


def markdown(doc: dict) -> str:
    lines = [f"# Many shots: accuracy and cost vs good images (lite, pool branch, seed 0, {doc['image_size']} px)", "",
             *stamp_lines(doc["machine"]), "",
             f"Bank budget {doc['bank_max_rows']} rows after the 10% coreset; 'exact' = one greedy over the whole bank, "
             "'streaming' = per-image coresets then one greedy. Scoring ms = the eval's scoring per test image "
             f"(no encoder), the bank searched in {doc.get('search_precision', 'float32')}.", "",
             "| set | shots | image AUROC | pixel AUROC | bank rows (of) | method | coreset s | scoring ms/image | run s | exact greedy instead: image / pixel AUROC, coreset s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        pix = f"{r['pixel_auroc']:.4f}" if r.get("pixel_auroc") is not None else "-"
        shots = f"{r['shots']} (all)" if r["requested"] == "all" else str(r["shots"])
        lines.append(f"| {r['set']} | {shots} | {r['image_auroc']:.4f} | {pix} | {r['bank_rows']} ({r['bank_rows_before']}) | "
                     f"{r['bank_method']} | {r['coreset_s']} | {r['score_ms_per_image']} | {r['run_s']:.0f} | {_exact(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shots", default="1,4,16,64,all")
    ap.add_argument("--sets", default="hazelnut,tire,textile")
    ap.add_argument("--compare-exact", action="store_true",
                    help="where the bank was streamed, also run the exact greedy over the whole bank")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=NAME, help="result file name (e.g. many_shots_448 for --image-size 448)")
    a = ap.parse_args()
    from o2n_edge.profiles import get_profile

    lite = get_profile("lite")
    doc = {"machine": machine_stamp(1), "image_size": a.image_size, "bank_max_rows": lite.bank_max_rows,
           "search_precision": lite.search_precision}

    def save(rows: list[dict]) -> None:  # after every row: a long run keeps what it measured
        doc["rows"] = rows
        write_result(a.out, a.name, doc, markdown(doc))

    run(a.data, a.image_size, [s.strip() for s in a.shots.split(",")], a.sets.split(","), a.compare_exact, save)
    print(a.out / f"{a.name}.md")


if __name__ == "__main__":
    main()
