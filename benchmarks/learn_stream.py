"""Does learning from the line help? A seeded stream through a 4-shot lite bundle, `learn` every N images.

Why this study: `o2n-edge learn` is only worth shipping if the bundles it writes detect better
than the one they came from, and the auto-good rule only if it does not smuggle defects into the
bank. Per category: export a 4-shot lite bundle at 224 px (the cheap setting; 448 is the
profile's default), then feed a seeded stream of the unused training goods and part of the test
images. Every image is scored by the current bundle, logged (results table, as serve does) and
kept; a simulated operator gives the true label for every rejected image and for a random
``--sample`` of passed ones; every ``--every`` images `learn` writes the next bundle. A fixed
later slice of the test set (never fed) measures each generation: false-reject and escape rates
at its threshold, and image AUROC. The same stream runs again with ``--auto-good``; the study
counts the defects that rule let into the bank.

    python -m benchmarks.learn_stream --categories hazelnut,tire,textile
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, write_result
from o2n_edge.bench.env import machine_stamp
from o2n_edge.bench.latency_report import stamp_lines

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOTS = {"hazelnut": (DATA / "hazelnut_toy", "auto"), "tire": (DATA / "mvtec3d_rgb", "auto"), "textile": (None, "textile")}


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC (ties count half), numpy only."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def _evaluate(bundle: Path, evals: list[tuple[bytes, int]]) -> dict[str, Any]:
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(bundle, SessionOptions(bank_search="numpy"))
    scores = np.array([pipe.inspect(pipe.decode(b)).score for b, _ in evals])
    labels = np.array([y for _, y in evals])
    good, bad = scores[labels == 0], scores[labels == 1]
    return {"threshold": pipe.threshold, "false_reject": float((good > pipe.threshold).mean()),
            "escape": float((bad <= pipe.threshold).mean()), "auroc": _auroc(scores, labels),
            "bank_rows": int(pipe.scorer.reference.memory_bank.shape[0])}


def run_stream(parent: Path, stream: list[tuple[bytes, int]], evals: list[tuple[bytes, int]], work: Path, *,
               every: int, sample: float, auto_good: float | None, seed: int,
               constants: str = "pooled") -> dict[str, Any]:
    """Feed ``stream`` through the bundle, learning every ``every`` images; one row per generation."""
    from o2n_edge.runtime.learn_bundle import LearnOptions, learn
    from o2n_edge.runtime.learn_vetting import LearnError
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
    from o2n_edge.runtime.results_log import ResultsLog

    rng = np.random.default_rng(seed)
    keep, db = work / "keep", work / "log.sqlite"
    keep.mkdir(parents=True)
    log = ResultsLog(db)
    truth: dict[str, int] = {}
    current, gen, n_req = parent, 0, 0
    pipe = OrtPipeline(current, SessionOptions(bank_search="numpy"))
    rows = [{"seen": 0, "generation": 0, **_evaluate(current, evals), "added": 0, "defects_in_bank": 0}]
    in_bank_defects = 0
    stream_counts = {"rejected_good": 0, "passed_defect": 0, "verdicts": 0}
    for i, (data, label) in enumerate(stream, 1):
        sha = hashlib.sha256(data).hexdigest()
        truth[sha] = label
        (keep / f"{sha}.img").write_bytes(data)
        score = float(pipe.inspect(pipe.decode(data)).score)
        rejected = score > pipe.threshold
        stream_counts["rejected_good"] += int(rejected and label == 0)
        stream_counts["passed_defect"] += int(not rejected and label == 1)
        log.append(image_sha256=sha, score=score, decision=rejected, threshold=pipe.threshold,
                   bundle_hash=pipe.bundle_hash)
        if rejected or rng.random() < sample:
            n_req += 1
            stream_counts["verdicts"] += 1
            with sqlite3.connect(db) as con:
                con.execute("INSERT INTO feedback VALUES (?,?,?,?,?,?,?,?)",
                            (f"r{n_req}", "defect" if label else "good", "", "sim", f"{n_req:08d}", score,
                             pipe.bundle_hash, sha))
        if i % every == 0 or i == len(stream):
            out = work / f"gen{gen + 1}"
            try:
                s = learn(LearnOptions(bundle=current, log=db, images=keep, out=out, auto_good=auto_good, seed=seed,
                                       constants=constants))
            except LearnError as exc:
                rows.append({"seen": i, "generation": gen, "learn": f"skipped: {exc}"[:200]})
                continue
            gen, current = gen + 1, out
            pipe = OrtPipeline(current, SessionOptions(bank_search="numpy"))
            in_bank_defects += sum(truth[a["sha256"]] for a in s.added)
            rows.append({"seen": i, "generation": gen, **_evaluate(current, evals), "added": len(s.added),
                         "auto_good_added": sum(a["rule"].startswith("auto-good") for a in s.added),
                         "defects_in_bank": in_bank_defects, "calibration": len(s.calibration),
                         "recalibrated": bool(s.threshold["recalibrated"])})
    log.close()
    return {"rows": rows, "stream": stream_counts}


def study(category: str, *, every: int, sample: float, auto_good: float, seed: int, work: Path,
          constants: str = "pooled", verdicts_only: bool = False) -> dict[str, Any]:
    """Export the 4-shot parent, draw the stream and the evaluation slice, run both streams."""
    from o2n_edge.data import load_dataset, sample_shots
    from o2n_edge.export.build import ExportOptions, export_bundle

    root, dataset = ROOTS[category]
    ds = load_dataset(root, dataset, category)
    parent = work / "parent"
    t0 = time.perf_counter()
    export_bundle(ExportOptions(category=category, out=parent, profile="lite", image_size=224, data=root,
                                dataset=dataset, shots=4, seed=seed, progress=False))
    export_s = time.perf_counter() - t0
    shots = set(sample_shots(ds.train_good, 4, seed))
    rng = np.random.default_rng(seed)
    test = [ds.test[i] for i in rng.permutation(len(ds.test))]
    n_eval = len(test) // 2
    evals = [(s.path.read_bytes(), int(s.label)) for s in test[:n_eval]]
    stream = [(p.read_bytes(), 0) for p in ds.train_good if p not in shots]
    stream += [(s.path.read_bytes(), int(s.label)) for s in test[n_eval:]]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    out: dict[str, Any] = {"category": category, "export_s": round(export_s, 1), "n_stream": len(stream),
                           "n_stream_defects": sum(y for _, y in stream), "n_eval": len(evals),
                           "n_eval_defects": sum(y for _, y in evals)}
    for name, ag in (("verdicts", None), (f"verdicts+auto-good {auto_good:g}", auto_good)):
        if verdicts_only and ag is not None:
            continue
        t0 = time.perf_counter()
        out[name] = run_stream(parent, stream, evals, work / name.replace(" ", "_"), every=every, sample=sample,
                               auto_good=ag, seed=seed, constants=constants)
        out[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Learning from the line: a seeded stream through a 4-shot lite bundle (224 px)", "",
             *stamp_lines(doc["machine"]), "",
             f"Stream: unused training goods + half the test set, seed {doc['seed']}; the simulated operator labels "
             f"every rejected image and {100 * doc['sample']:g}% of passed ones (true labels); `learn` every "
             f"{doc['every']} images (holdout 0.3). Measured on the other half of the test set (never fed): "
             "false-reject (FRR) and escape rates at each generation's threshold, and image AUROC. Bank constants: "
             f"`{doc.get('constants', 'remeasure')}` (learn_bank).", ""]
    for c in doc["categories"]:
        lines += [f"## {c['category']}", "",
                  f"stream {c['n_stream']} images ({c['n_stream_defects']} defects); evaluation slice {c['n_eval']} "
                  f"({c['n_eval_defects']} defects)", ""]
        for name in [k for k in c if k.startswith("verdicts")]:
            r = c[name]
            lines += [f"### {name} ({r['wall_s']:.0f} s; {r['stream']['verdicts']} verdicts)", "",
                      "| seen | gen | added | defects in bank | bank rows | threshold | FRR | escape | AUROC |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for row in r["rows"]:
                if "learn" in row:
                    lines.append(f"| {row['seen']} | {row['generation']} | {row['learn']} | | | | | | |")
                    continue
                lines.append(f"| {row['seen']} | {row['generation']} | {row['added']} | {row['defects_in_bank']} | "
                             f"{row['bank_rows']} | {row['threshold']:.3f} | {100 * row['false_reject']:.1f}% | "
                             f"{100 * row['escape']:.1f}% | {100 * row['auroc']:.1f} |")
            lines.append("")
    lines += [doc.get("verdict", ""), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--categories", default="hazelnut,tire,textile")
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--sample", type=float, default=0.1)
    ap.add_argument("--auto-good", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--constants", choices=("pooled", "keep", "remeasure"), default="pooled",
                    help="how learn sets the bank's standardization constants (pooled: the shipped rule)")
    ap.add_argument("--verdicts-only", action="store_true", help="skip the auto-good stream (quick comparisons)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    doc: dict[str, Any] = {"machine": machine_stamp(0), "seed": args.seed, "every": args.every,
                           "sample": args.sample, "auto_good": args.auto_good, "constants": args.constants,
                           "categories": []}
    work = Path(tempfile.mkdtemp(prefix="learn_stream-"))
    try:
        for cat in args.categories.split(","):
            doc["categories"].append(study(cat, every=args.every, sample=args.sample, auto_good=args.auto_good,
                                           seed=args.seed, work=work / cat, constants=args.constants,
                                           verdicts_only=args.verdicts_only))
            print(f"{cat}: done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_result(args.out, "learn_stream", doc, markdown(doc)))


if __name__ == "__main__":
    main()
