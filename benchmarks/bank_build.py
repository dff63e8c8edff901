"""Bank build (features -> coreset -> bank): time, peak memory, and what the new coreset selects.

Two parts, both written into ``results/bank_build.{json,md}`` (each run keeps the other part):

* ``--part timing``: each case in its own process, so ``ru_maxrss`` is that case's peak memory,
  with the encoder as ``eval`` and ``export`` run it (its traced graph on onnxruntime;
  ``O2N_ENCODE_BACKEND=torch`` for torch): 4 shots of tire at 448 px (exact greedy), 200 textile good images at 448 px (per-image coresets
  then one greedy, streamed: no more than one image's features are held besides the kept rows),
  and the removed torch coreset on the 4-shot bank, stopped after ``--old-limit`` s (a lower bound,
  extrapolated from the iterations it managed).
* ``--part selection``: the rows the new numpy coreset keeps against the removed torch one (run to
  the end) on the banks ``eval`` builds (lite, seed 0) for hazelnut, tire and textile at 1 and 4
  shots at 224 px; at 448 px (tire, 4 shots) the torch run of the timing part is stopped early, so
  its picks are compared with the new greedy's first picks in order. The numpy coreset draws the
  projection and first row from torch's seeded stream, so the kept rows should be the same ones:
  same rows, same scores, no accuracy to re-measure.

Usage: python -m benchmarks.bank_build [--part timing|selection|all] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_result
from o2n_edge.runtime.coreset import StreamingCoreset, coreset_size, greedy_coreset, greedy_on, projected, selection_start

NAME = "bank_build"
SETS = {"hazelnut": ("hazelnut_toy", "hazelnut"), "tire": ("mvtec3d_rgb", "tire"), "textile": (None, "textile")}
SELECTION_CASES = [(s, 224, k) for s in ("hazelnut", "tire", "textile") for k in (1, 4)] + [("tire", 448, 4)]


def torch_coreset(bank: np.ndarray, ratio: float, seed: int, limit_s: float) -> dict:
    """The removed implementation verbatim (torch.cdist once per kept row), stopped at ``limit_s``."""
    import torch

    n = bank.shape[0]
    k = coreset_size(n, ratio)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    if x.shape[1] > 128:
        x = x @ (torch.randn(x.shape[1], 128, generator=g) / 128**0.5)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    mind = torch.cdist(x, x[chosen[-1]][None]).squeeze(1)
    for _ in range(k - 1):
        if time.perf_counter() - t0 > limit_s:
            break
        nxt = int(mind.argmax())
        chosen.append(nxt)
        mind = torch.minimum(mind, torch.cdist(x, x[nxt][None]).squeeze(1))
    dt = time.perf_counter() - t0
    return {"coreset_s": round(dt, 1), "kept": len(chosen), "target": k, "finished": len(chosen) == k,
            "extrapolated_s": round(dt * k / len(chosen), 0), "picks": chosen}


def same_prefix(bank: np.ndarray, torch_picks: np.ndarray, k: int) -> float:
    """Share of the torch run's picks (in order) that the new greedy picks at the same step."""
    proj, first = selection_start(bank.shape[0], bank.shape[1], 0)
    new = greedy_on(projected(bank, proj), k, first)[: len(torch_picks)]
    return float((new == torch_picks).mean())


def _views_features(encoder, path: Path, size: int) -> dict[str, np.ndarray]:
    from o2n_edge.data import load_image
    from o2n_edge.encoders import encode_images
    from o2n_edge.reference import augment_views

    return encode_images(encoder, augment_views(load_image(path, size, True)))


def _shot_paths(data: Path, name: str, n: int) -> list[Path]:
    from o2n_edge.data import load_dataset, sample_shots

    if name == "textile200":  # the 100 training goods + 100 nominal images the split never uses
        from conformal_clip_data import nominal_dir

        from o2n_edge.data.layouts import list_images

        nominal = list_images(Path(nominal_dir()))
        return (nominal[:100] + nominal[300:])[:n]
    root, cat = SETS["tire"]
    return sample_shots(load_dataset(data / root, None, cat).train_good, n, 0)


def run_case(case: str, data: Path, size: int, old_limit: float) -> dict:
    """One timing case in this process; returns times (s) and peak RSS (MiB)."""
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import get_profile, with_options

    set_threads(1)
    profile = with_options(get_profile("lite"), image_size=size)
    encoder = build_encoder(profile.encoder)
    n = 200 if case == "textile200" else 4
    paths = _shot_paths(data, case, n)
    t0 = time.perf_counter()
    enc_s = core_s = 0.0
    out: dict = {"case": case, "images": n, "image_size": size}
    if case == "textile200":
        stream = StreamingCoreset(n, profile.coreset_ratio, profile.bank_max_rows, seed=0)
        for p in paths:
            t = time.perf_counter()
            patch = _views_features(encoder, p, size)["patch"]
            enc_s += time.perf_counter() - t
            t = time.perf_counter()
            stream.add(patch.reshape(-1, patch.shape[-1]))
            core_s += time.perf_counter() - t
        t = time.perf_counter()
        bank = stream.rows()
        core_s += time.perf_counter() - t
        out.update(rows_before=stream.rows_seen, rows=int(bank.shape[0]), method="streaming")
    else:
        t = time.perf_counter()
        feats = [_views_features(encoder, p, size)["patch"] for p in paths]
        bank = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]).astype(np.float32)
        enc_s = time.perf_counter() - t
        out["rows_before"] = int(bank.shape[0])
        t = time.perf_counter()
        if case == "tire4_old":
            old = torch_coreset(bank, profile.coreset_ratio, 0, old_limit)
            picks = np.array(old.pop("picks"))
            out["same_picks_in_order"] = same_prefix(bank, picks, old["target"])
            out.update(old, rows=old["kept"], method="torch (removed)")
            core_s = old["coreset_s"]
        else:
            idx = greedy_coreset(bank, profile.coreset_ratio, seed=0, max_rows=profile.bank_max_rows)
            core_s = time.perf_counter() - t
            out.update(rows=len(idx), method="exact")
    from o2n_edge.encoders.onnx_runner import onnx_runner_for

    out["encoder"] = "onnxruntime" if onnx_runner_for(encoder) is not None else "torch"
    out["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.update(encode_s=round(enc_s, 1), coreset_s=round(core_s, 1), total_s=round(time.perf_counter() - t0, 1),
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0))
    return out


TIMING_CASES = ("tire4", "textile200", "tire4_old")


def timing(data: Path, old_limit: float, cases: list[str], previous: list[dict]) -> list[dict]:
    """Run ``cases`` (each in its own process); the other cases keep their ``previous`` rows."""
    rows = [r for r in previous if r["case"] not in cases]
    for case in cases:
        size = 448
        cmd = [sys.executable, "-m", "benchmarks.bank_build", "--case", case, "--image-size", str(size),
               "--data", str(data), "--old-limit", str(old_limit)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return sorted(rows, key=lambda r: TIMING_CASES.index(r["case"]))


def selection(data: Path) -> list[dict]:
    from o2n_edge.data import load_dataset, sample_shots
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import get_profile, with_options

    set_threads(1)
    rows = []
    profile = with_options(get_profile("lite"), image_size=224)
    encoder = build_encoder(profile.encoder)
    for name, size, k in SELECTION_CASES:
        if size != 224:
            continue  # 448 px: compared in the timing part (the torch run is stopped there)
        root, cat = SETS[name]
        ds = load_dataset(None if root is None else data / root, "textile" if root is None else None, cat)
        feats = [_views_features(encoder, p, size)["patch"] for p in sample_shots(ds.train_good, k, 0)]
        bank = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]).astype(np.float32)
        old = torch_coreset(bank, profile.coreset_ratio, 0, float("inf"))
        t = time.perf_counter()
        new = greedy_coreset(bank, profile.coreset_ratio, seed=0, max_rows=profile.bank_max_rows)
        new_s = time.perf_counter() - t
        kept = np.sort(np.array(old["picks"]))
        row = {"set": name, "image_size": size, "shots": k, "rows_before": int(bank.shape[0]), "rows": len(new),
               "same_rows": float(np.isin(kept, new).mean()), "identical": bool(np.array_equal(kept, new)),
               "old_s": old["coreset_s"], "new_s": round(new_s, 2)}
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(doc: dict) -> str:
    lines = ["# Bank build: features -> coreset -> bank", "", *stamp_lines(doc["machine"]), ""]
    if doc.get("timing"):
        lines += ["## Time and peak memory (lite, 448 px, 1 thread, each case its own process)", "",
                  "| case | images | rows before | rows kept | method | encoder | encode s | coreset s | total s | peak RSS MiB "
                  "| measured |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["timing"]:
            core = (f"{r['coreset_s']}" if r.get("finished", True)
                    else f"> {r['coreset_s']} (stopped at {r['kept']}/{r['target']} rows; ~{r['extrapolated_s']:.0f} extrapolated)")
            lines.append(f"| {r['case']} | {r['images']} | {r['rows_before']} | {r['rows']} | {r['method']} | "
                         f"{r.get('encoder', 'torch')} | {r['encode_s']} | {core} | {r['total_s']} | "
                         f"{r['peak_rss_mib']:.0f} | {r.get('measured', 'before the onnxruntime encoder')} |")
        old = [r for r in doc["timing"] if "same_picks_in_order" in r]
        lines += ["", "Targets: 4 shots <= 15 s; 200 good images <= 180 s and <= 4 GiB peak."]
        if old:
            lines.append(f"tire4_old: {old[0]['same_picks_in_order']:.4f} of the torch run's picks are the numpy greedy's "
                         "picks at the same step.")
        lines.append("")
    if doc.get("selection"):
        lines += ["## Same rows as the removed torch coreset (lite banks, seed 0, 224 px)", "",
                  "| set | shots | bank rows | kept | share of torch's rows kept | identical | torch s | numpy s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["selection"]:
            lines.append(f"| {r['set']} | {r['shots']} | {r['rows_before']} | {r['rows']} | {r['same_rows']:.4f} | "
                         f"{'yes' if r['identical'] else 'no'} | {r['old_s']} | {r['new_s']} |")
        lines += ["", "At 448 px (tire, 4 shots) see `same_picks_in_order` of the `tire4_old` timing case: the share of "
                  "the stopped torch run's picks that the numpy greedy makes at the same step."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("timing", "selection", "all"), default="all")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--old-limit", type=float, default=300.0, help="stop the removed torch coreset after this many s")
    ap.add_argument("--cases", default=",".join(TIMING_CASES), help="timing cases to (re)run; the others are kept")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=448, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.data, a.image_size, a.old_limit)))
        return
    path = a.out / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["machine"] = machine_stamp(1)
    if a.part in ("timing", "all"):
        doc["timing"] = timing(a.data, a.old_limit, a.cases.split(","), doc.get("timing", []))
    if a.part in ("selection", "all"):
        doc["selection"] = selection(a.data)
    print(write_result(a.out, NAME, doc, markdown(doc)))


if __name__ == "__main__":
    main()
