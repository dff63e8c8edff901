"""Result tables: the same figures as a rich table (terminal) and a markdown table (files).

These are the offline evaluation's tables (``o2n-edge eval``). The acceptance report of one
bundle on a test set (``o2n-edge report``: rates at its threshold, plots, misses) is
:mod:`o2n_edge.acceptance`.
"""

from __future__ import annotations

from o2n_edge.evaluation import METRIC_KEYS

HEADERS = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_pro": "PRO (0.3)",
}


def fmt(cell: dict | None) -> str:
    """'mean ± std' in percent, or '—' where the metric does not exist (no masks)."""
    if cell is None:
        return "—"
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def rows(result: dict) -> list[list[str]]:
    """One row per shot count: dataset, category, shots, seeds, metrics, wall time."""
    out = []
    for s in result["summary"]:
        out.append([
            result["dataset"], result["category"], result["profile"], "+".join(result["branches"]),
            str(s["shots"]), ",".join(str(x) for x in s["seeds"]),
            *[fmt(s[k]) for k in METRIC_KEYS], f"{s['wall_s']:.0f}",
        ])
    return out


def columns() -> list[str]:
    return ["dataset", "category", "profile", "branches", "shots", "seeds", *[HEADERS[k] for k in METRIC_KEYS], "wall s"]


def markdown_table(results: list[dict]) -> str:
    """A markdown table of several result documents (percent, mean ± std over seeds)."""
    lines = ["| " + " | ".join(columns()) + " |", "|" + "---|" * len(columns())]
    for r in results:
        for row in rows(r):
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def print_table(results: list[dict]) -> None:
    """Rich table on stdout, one per result; the fixed settings go in the title to keep it narrow."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in results:
        title = (f"{r['dataset']}/{r['category']} · {r['profile']} · {'+'.join(r['branches'])} · "
                 f"{r['num_test']} test images ({r['num_anomalous']} anomalous) · percent, mean ± std over seeds")
        table = Table(title=title)
        for c in ["shots", "seeds", *[HEADERS[k] for k in METRIC_KEYS], "wall s"]:
            table.add_column(c, justify="right")
        for row in rows(r):
            table.add_row(*row[4:])
        console.print(table)
