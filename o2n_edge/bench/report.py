"""Benchmark results -> JSON + markdown table + PNG bar chart under benchmarks/results/.

Why all three: the JSON is the record (every percentile, the machine stamp), the markdown is
what README and issues quote, and the chart shows at a glance which stage dominates. Files are
written atomically so an interrupted benchmark never leaves half a result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from o2n_edge.bench.env import load_average

STAGE_PLOT_ORDER = ("preprocess", "transform_preprocess", "vae_encode", "unet", "vae_decode", "image_encoder",
                    "scoring", "postprocess")
PLOT_DPI = 110


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Atomic JSON write; the load average at the end is added to the stamp."""
    if "machine" in doc:
        doc["machine"]["load_average_end"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomic text write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def stamp_lines(machine: dict[str, Any]) -> list[str]:
    """The machine/settings paragraph every markdown result starts with."""
    v = machine.get("versions", {})
    return [
        f"Machine: {machine.get('cpu')} ({machine.get('cores')} usable cores), {machine.get('platform')}; "
        f"threads {machine.get('threads')} (torch intra-op and ORT intra-op); load average at start "
        f"{machine.get('load_average_start')}, at end {machine.get('load_average_end', load_average())}.",
        f"Versions: torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, diffusers {v.get('diffusers')}, "
        f"numpy {v.get('numpy')}, python {v.get('python')}. Measured {machine.get('time_utc')}.",
    ]


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def grouped_stages(stages: dict[str, dict[str, float]], key: str = "p50") -> dict[str, float]:
    """Stage p50s with the UNet steps summed into one ``unet`` entry (for charts)."""
    out: dict[str, float] = {}
    for name, st in stages.items():
        if name in ("total", "model_ms", "decode_jpeg", "encode_answer") or key not in st:
            continue
        group = "unet" if name.startswith("unet_step") else name
        out[group] = out.get(group, 0.0) + float(st[key])
    return out


def latency_markdown(doc: dict[str, Any]) -> str:
    """Per-stage table (p50 ms) plus the summary table of one or more bundle results."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), ""]
    lines += [doc.get("note", ""), ""] if doc.get("note") else []
    for res in doc["results"]:
        lines += [f"## {res.get('profile', res.get('title', ''))} — {res.get('category', '')}",
                  ""]
        if res.get("kind") == "bundle_latency":
            lines.append(f"Bundle `{res['bundle']}`: scoring image {res['image_size']} px, diffusion "
                         f"{res.get('diffusion_image_size')} px, {res.get('steps_run')} UNet steps, branches "
                         f"{', '.join(res['branches'])}; input {res['source_image_side']} px.")
            lines.append("")
        measured = [r for r in res["rows"] if r.get("status") == "measured"]
        lines += ["| backend | batch | iters | per image p50 ms | e2e p50 | p90 | p99 | images/s | model ms p50 "
                  "| non-model share (incl. JPEG decode + answer) | peak RSS MiB | max \\|Δscore\\| vs torch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r.get("status") != "measured":
                lines.append(f"| {r['backend']} | — | — | {r.get('status')}: {r.get('reason')} |"
                             " | | | | | | | |")
                continue
            e = r["end_to_end_ms"]
            mem = r.get("memory", {})
            share = r.get("non_model_fraction")
            lines.append(
                f"| {r['backend']} | {r['batch']} | {r['iters']} | {_fmt(r['per_image_ms_p50'])} | {_fmt(e['p50'])} | "
                f"{_fmt(e['p90'])} | {_fmt(e['p99'])} | {_fmt(r['throughput_img_s'])} | {_fmt(r.get('model_ms_p50'))} | "
                f"{'—' if share is None else f'{100 * share:.1f}%'} | {_fmt(mem.get('peak_rss_mb'), 0)} | "
                f"{_fmt(r.get('max_abs_score_diff_vs_torch'), 6)} |")
        if measured:
            stage_names: list[str] = []
            for r in measured:
                for k in r["stages_ms"]:
                    if k not in stage_names:
                        stage_names.append(k)
            lines += ["", "Per-stage p50 ms (p90 in brackets):", "",
                      "| stage | " + " | ".join(f"{r['backend']} b{r['batch']}" for r in measured) + " |",
                      "|---|" + "---|" * len(measured)]
            for s in stage_names:
                cells = []
                for r in measured:
                    st = r["stages_ms"].get(s)
                    cells.append("—" if not st else f"{_fmt(st['p50'])} ({_fmt(st['p90'])})")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
        if res.get("speedups"):
            lines += ["", "Speed-up over torch eager (per image, p50): " +
                      ", ".join(f"{k} {v:.2f}x" for k, v in res["speedups"].items())]
        lines.append("")
    if doc.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def latency_plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Stacked bars of stage p50 per (profile, backend, batch); None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars: list[tuple[str, dict[str, float]]] = []
    for res in doc["results"]:
        for r in res["rows"]:
            if r.get("status") == "measured":
                label = f"{res.get('profile', res.get('title', ''))}\n{r['backend']} b{r['batch']}"
                bars.append((label, {k: v / r["batch"] for k, v in grouped_stages(r["stages_ms"]).items()}))
    if not bars:
        return None
    stages = [s for s in STAGE_PLOT_ORDER if any(s in b for _, b in bars)]
    stages += sorted({s for _, b in bars for s in b} - set(stages))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(bars)), 4.5))
    bottom = [0.0] * len(bars)
    for s in stages:
        vals = [b.get(s, 0.0) for _, b in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, label=s)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_xticks(range(len(bars)), [lbl for lbl, _ in bars], fontsize=8)
    ax.set_ylabel("ms per image (stage p50)")
    ax.set_title(doc["name"])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def write_latency(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """JSON + markdown + PNG of a latency document; returns the paths written."""
    name = doc["name"]
    paths = {"json": str(write_json(out_dir / f"{name}.json", doc))}
    paths["md"] = str(write_text(out_dir / f"{name}.md", latency_markdown(doc)))
    png = latency_plot(doc, out_dir / f"{name}.png")
    if png:
        paths["png"] = str(png)
    return paths
