"""sd15 at real size on the CPU, seeded random weights in the hub layout, offline (slow: ~1 h on 1 thread).

Usage: python -m benchmarks.sd15_dry_run [--work .bench_cache/sd15_dry_run] [--size 256] [--threads 1]
       [--stages seed_hub,personalize,...] [--redo]
Stages (each in its own process, resumable; see benchmarks.sd15_stages): seed_hub, personalize,
merge_lcm_lora, export_fp32, export_fp16, runtime_fp32, runtime_fp16, taesd.
Writes benchmarks/results/sd15_dry_run.{json,md}. Needs ~15 GB of free memory at the export stages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.sd15_stages import DEFAULT_STAGES, STAGES, run_stage, stage_env

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 1 << 30
TAESD_NAME = "madebyollin/taesd"


def _table(doc: dict) -> str:
    lines = [
        "# sd15 dry run at real size (CPU, seeded random weights, offline hub cache)",
        "",
        "Commands (in this order, one work folder): " + ", ".join(f"`{c}`" for c in doc["commands"]) + f". Diffusion size {doc['size']} px, scoring size 240 px (ViT-B-16-plus-240), "
        f"{doc['threads']} thread(s); machine: {doc['machine']['cpu']} ({doc['machine']['cores']} usable cores, "
        f"shared with other work: load average when these results were written {doc['machine']['load_average_start']}). "
        "Random weights: scores are meaningless, "
        "time, memory and bytes are not.",
        "",
        "| stage | wall s | peak RSS GiB | bytes written | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for name in STAGES:
        s = doc["stages"].get(name)
        if s is None:
            lines.append(f"| {name} | — | — | — | not run |")
            continue
        if "error" in s:
            lines.append(f"| {name} | {s.get('wall_s', '—')} | — | — | FAILED: {s['error'][:120]} |")
            continue
        info = s["info"]
        note = ""
        if name == "seed_hub":
            note = ", ".join(f"{k} {v / 1e6:.0f}M params" for k, v in info["params"].items())
        elif name.startswith("export"):
            big = {k: v for k, v in info["files"].items() if v > 5e6}
            note = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in big.items())
            note += f"; runtime vs torch max |diff| {info['parity']['max_abs']:.2e}"
        elif name.startswith("runtime"):
            t = info["timings_ms_median"]
            note = (f"{info['per_image_s']} s/image (scoring {info['scoring_size']} px, diffusion "
                    f"{info['diffusion_size']} px): VAE encode {t.get('vae_encode', 0):.0f} ms, UNet step "
                    f"{t.get('unet_step_0', 0):.0f} ms, VAE decode {t.get('vae_decode', 0):.0f} ms; "
                    f"`o2n-edge inspect` rc {info['inspect_cli_rc']}")
            if "max_abs_vs_fp32" in info:
                note += f"; max |score - fp32 bundle's| {info['max_abs_vs_fp32']:.3g}"
        elif name == "taesd_latency":
            note = "; ".join(f"{k} {v['median_ms']:.0f} ms ({v['bytes'] / 1e6:.0f} MB)" for k, v in info["latency"].items())
        elif name == "lcm_lora_keys":
            note = (f"{info['converted_unet_modules']} of {info['file_modules']} modules of the kohya-style file "
                    f"({info['file_bytes'] / 1e6:.0f} MB, rank {info['rank']}) mapped onto the UNet by diffusers")
        elif name == "merge_lcm_lora":
            note = f"{info['method']} ({info['lcm_lora']}, rank {info['lcm_lora_rank']}, kohya-style keys)"
        elif name == "personalize":
            note = (f"{info['steps']} LoRA steps, rank {info['lora_rank']}, "
                    f"{info.get('aug_per_shot', '?')} augmented views per shot (the profile: 32)")
        lines.append(f"| {name} | {s['wall_s']:.1f} | {s['peak_rss_bytes'] / GIB:.2f} | "
                     f"{s['output_bytes'] / 1e6:.0f} MB | {note} |")
    lines += _vae_table(doc) + _taesd_table(doc)
    return "\n".join(lines) + "\n"


def _taesd_table(doc: dict) -> list[str]:
    s = doc["stages"].get("taesd_latency")
    if not s or "info" not in s:
        return []
    lat = s["info"]["latency"]
    rows = [f"| {label} | {lat[f'{k}_encoder']['median_ms']:.0f} | {lat[f'{k}_decoder']['median_ms']:.0f} | "
            f"{(lat[f'{k}_encoder']['bytes'] + lat[f'{k}_decoder']['bytes']) / 1e6:.1f} MB |"
            for k, label in (("full", "SD-1.5 AutoencoderKL (the fp32 bundle's graphs)"),
                             ("taesd", f"TAESD ({TAESD_NAME}, exported by the project's specs)"))]
    return ["", f"VAE graphs alone, batch 1, {s['info']['size']} px, ORT CPU {s['info']['threads']} thread, median of "
            f"{s['info']['repeats']} runs after a warm-up (stage taesd_latency):", "",
            "| VAE | encode ms | decode ms | graphs |", "|---|---:|---:|---:|", *rows]


def _vae_table(doc: dict) -> list[str]:
    """TAESD next to the full SD VAE: the same runtime, the same images, medians of the stage timings."""
    rows = []
    for name, label in (("fp32", "SD-1.5 AutoencoderKL (full VAE)"), ("taesd", "TAESD (AutoencoderTiny)")):
        rt, ex = doc["stages"].get(f"runtime_{name}"), doc["stages"].get(f"export_{name}")
        if not rt or "info" not in rt or not ex or "info" not in ex:
            continue
        t, files = rt["info"]["timings_ms_median"], ex["info"]["files"]
        vae_bytes = sum(v for k, v in files.items() if k.startswith("vae_"))
        params = (ex["info"].get("vae") or {}).get("params", 0)
        rows.append(f"| {label} | {params / 1e6:.1f} | {t.get('vae_encode', 0):.0f} | {t.get('vae_decode', 0):.0f} | "
                    f"{vae_bytes / 1e6:.0f} MB | {t.get('total', 0) / 1000:.1f} |")
    if not rows:
        return []
    size = doc["size"]
    return ["", f"VAE of the transform, fp32 graphs on ORT CPU ({doc['threads']} thread), {size} px, median over "
            "the scored images (runtime stages above):", "",
            "| VAE | params M | encode ms | decode ms | graphs | whole image s |", "|---|---:|---:|---:|---:|---:|",
            *rows]


def collect(work: Path, command: str, size: int, threads: int) -> dict:
    from benchmarks.harness import machine_stamp

    stages = {}
    for name in STAGES:
        f = work / "stages" / f"{name}.json"
        err = work / "stages" / f"{name}.error"
        if f.is_file():
            stages[name] = json.loads(f.read_text())
        elif err.is_file():
            stages[name] = json.loads(err.read_text())
    log = work / "commands.txt"
    commands = log.read_text().splitlines() if log.is_file() else [command]
    return {"command": command, "commands": commands, "size": size, "threads": threads, "machine": machine_stamp(threads), "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / ".bench_cache" / "sd15_dry_run")
    p.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "hazelnut_toy")
    p.add_argument("--size", type=int, default=256, help="diffusion image size (pixels); scoring is at 240")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma list from {', '.join(STAGES)}")
    p.add_argument("--redo", action="store_true", help="rerun stages that already finished")
    p.add_argument("--report", action="store_true", help="only rewrite the results from the finished stages")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    work = a.work.resolve()
    opts = {"size": a.size, "threads": a.threads, "data": str(a.data.resolve())}
    if a.stage:
        run_stage(a.stage, work, opts)
        return
    command = " ".join(["python -m benchmarks.sd15_dry_run", *sys.argv[1:]])
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not a.report:
        with open(work / "commands.txt", "a") as log:
            log.write(command + "\n")
    for name in [] if a.report else [s.strip() for s in a.stages.split(",") if s.strip()]:
        if name not in STAGES:
            sys.exit(f"unknown stage {name!r}: choose from {', '.join(STAGES)}")
        done = work / "stages" / f"{name}.json"
        if done.is_file() and not a.redo:
            print(f"[dry-run] {name}: done before, skipped", flush=True)
            continue
        print(f"[dry-run] {name}: running (log {work / 'logs' / f'{name}.log'})", flush=True)
        t = time.perf_counter()
        with open(work / "logs" / f"{name}.log", "w") as log:
            rc = subprocess.run([sys.executable, "-m", "benchmarks.sd15_dry_run", "--stage", name, "--work", str(work),
                                 "--size", str(a.size), "--threads", str(a.threads), "--data", str(a.data)],
                                cwd=ROOT, env=stage_env(work, a.threads), stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
        err = work / "stages" / f"{name}.error"
        if rc != 0:
            tail = (work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
            err.parent.mkdir(parents=True, exist_ok=True)
            err.write_text(json.dumps({"stage": name, "wall_s": round(time.perf_counter() - t, 1), "rc": rc,
                                       "error": " ".join(tail) or f"exit {rc}"}))
            print(f"[dry-run] {name}: FAILED (rc {rc}), see the log", flush=True)
            break
        err.unlink(missing_ok=True)
        print(f"[dry-run] {name}: {time.perf_counter() - t:.0f} s", flush=True)
    doc = collect(work, command, a.size, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=2) + "\n"), ("md", _table(doc))):
        tmp = a.out / f".sd15_dry_run.{suffix}.tmp"
        tmp.write_text(text)
        os.replace(tmp, a.out / f"sd15_dry_run.{suffix}")
    print(f"wrote {a.out / 'sd15_dry_run.md'}")


if __name__ == "__main__":
    main()
