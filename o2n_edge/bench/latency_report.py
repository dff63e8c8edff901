"""Latency results -> JSON + markdown table + PNG bar chart.

Why all three: the JSON is the record (every percentile, the machine stamp), the markdown is
what documentation quotes, and the chart shows at a glance which stage dominates. Files are
written atomically so an interrupted benchmark never leaves half a result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from o2n_edge.atomic import atomic_write_text
from o2n_edge.bench.env import load_average

NOT_PLOTTED = ("total", "model_ms", "decode_jpeg", "encode_answer")  # sums or I/O, not pipeline stages


def write_text(path: Path, text: str) -> Path:
    """Atomic text write: an interrupted benchmark leaves the previous file, never half a new one."""
    return atomic_write_text(path, text)


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Atomic JSON write; the load average at the end is added to the stamp."""
    if "machine" in doc:
        doc["machine"]["load_average_end"] = load_average()
    return write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


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
    return "—" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _result_markdown(res: dict[str, Any]) -> list[str]:
    lines = [f"## {res.get('profile', res.get('title', ''))} — {res.get('category', '')}", ""]
    if res.get("kind") == "bundle_latency":
        lines += [f"Bundle `{res['bundle']}`: scoring image {res['image_size']} px, diffusion "
                  f"{res.get('diffusion_image_size')} px, {res.get('steps_run')} UNet steps, branches "
                  f"{', '.join(res['branches'])}; input {res['source_image_side']} px.", ""]
    lines += ["| backend | batch | iters | per image p50 ms | e2e p50 | p90 | p99 | images/s | model ms p50 "
              "| non-model share (incl. JPEG decode + answer) | peak RSS MiB "
              f"| max \\|Δscore\\| vs {res.get('reference')} |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    measured = [r for r in res["rows"] if r.get("status") == "measured"]
    for r in res["rows"]:
        if r.get("status") != "measured":
            lines.append(f"| {r['backend']} | — | — | {r.get('status')}: {r.get('reason')} | | | | | | | | |")
            continue
        e, share = r["end_to_end_ms"], r.get("non_model_fraction")
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['iters']} | {_fmt(r['per_image_ms_p50'])} | {_fmt(e['p50'])} | "
            f"{_fmt(e['p90'])} | {_fmt(e['p99'])} | {_fmt(r['throughput_img_s'])} | {_fmt(r.get('model_ms_p50'))} | "
            f"{'—' if share is None else f'{100 * share:.1f}%'} | {_fmt(r.get('memory', {}).get('peak_rss_mb'), 0)} | "
            f"{_fmt(r.get('max_abs_score_diff_vs_ref'), 6)} |")
    if measured:
        stage_names = list(dict.fromkeys(k for r in measured for k in r["stages_ms"]))
        lines += ["", "Per-stage p50 ms (p90 in brackets):", "",
                  "| stage | " + " | ".join(f"{r['backend']} b{r['batch']}" for r in measured) + " |",
                  "|---|" + "---|" * len(measured)]
        for s in stage_names:
            cells = [(lambda st: "—" if not st else f"{_fmt(st['p50'])} ({_fmt(st['p90'])})")(r["stages_ms"].get(s))
                     for r in measured]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if res.get("speedups"):
        lines += ["", f"Speed-up over {res.get('reference')} (per image, p50): "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in res["speedups"].items())]
    return lines + [""]


def latency_markdown(doc: dict[str, Any]) -> str:
    """Per-stage table (p50 ms) plus the summary table of one or more bundle results, then the targets."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), ""]
    lines += [doc["note"], ""] if doc.get("note") else []
    for res in doc["results"]:
        lines += _result_markdown(res)
    if doc.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in doc["targets"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def latency_plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Stacked bars of stage p50 per image (UNet steps summed) per (profile, backend, batch); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars: list[tuple[str, dict[str, float]]] = []
    for res in doc["results"]:
        for r in (r for r in res["rows"] if r.get("status") == "measured"):
            grouped: dict[str, float] = {}
            for name, st in r["stages_ms"].items():
                if name not in NOT_PLOTTED and "p50" in st:
                    key = "unet" if name.startswith("unet_step") else name
                    grouped[key] = grouped.get(key, 0.0) + float(st["p50"]) / r["batch"]
            bars.append((f"{res.get('profile', res.get('title', ''))}\n{r['backend']} b{r['batch']}", grouped))
    if not bars:
        return None
    stages = list(dict.fromkeys(s for _, b in bars for s in b))  # rows are already in pipeline order
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_latency(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """JSON + markdown + PNG of a latency document; returns the paths written."""
    name = doc["name"]
    paths = {"json": str(write_json(out_dir / f"{name}.json", doc)),
             "md": str(write_text(out_dir / f"{name}.md", latency_markdown(doc)))}
    png = latency_plot(doc, out_dir / f"{name}.png")
    if png:
        paths["png"] = str(png)
    return paths
