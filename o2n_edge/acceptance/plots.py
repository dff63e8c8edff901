"""The report's plots (matplotlib, Agg backend), each returned as PNG bytes for a data URI.

Every plot marks the two thresholds the page talks about, the bundle's (solid) and the one for
the target false-reject rate (dashed), so a reader sees where the line will operate on each curve.
"""

from __future__ import annotations

import io

import numpy as np

# Figure size in inches and resolution: ~900 px wide at 150 dpi, sharp in a 2-column page.
FIGSIZE = (6.0, 4.2)
WIDE_FIGSIZE = (12.0, 4.2)  # histogram and per-type bars span both columns of the page
DPI = 150
GOOD_COLOUR = "#1b8a3a"
BAD_COLOUR = "#c62828"
BUNDLE_STYLE = {"color": "black", "linestyle": "-", "linewidth": 1.4}
TARGET_STYLE = {"color": "#555555", "linestyle": "--", "linewidth": 1.2}
HIST_BINS = 30


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _figure(size: tuple[float, float] = FIGSIZE, ncols: int = 1):
    """A figure on the Agg backend (no display on a line-side box)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def _unit_square_png(fig, ax, xlabel: str, ylabel: str, title: str, legend_loc: str) -> bytes:
    """Finish a curve on rates in [0, 1] (ROC, PR) the same way for both, and encode it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=7, loc=legend_loc)
    return _png(fig)


def roc_plot(labels: np.ndarray, scores: np.ndarray, defects: list[str], doc: dict) -> bytes:
    """ROC of all defects and of each type vs every good image, with both operating points."""
    from sklearn.metrics import roc_curve

    fig, ax = _figure()
    d = np.asarray(defects)
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, color="black", linewidth=2, label=f"all defects (AUROC {doc['metrics']['image_auroc']:.3f})")
    for row in doc["per_type"]:
        idx = (d == row["defect"]) | (labels == 0)
        f, t, _ = roc_curve(labels[idx], scores[idx])
        ax.plot(f, t, linewidth=1, alpha=0.8, label=f"{row['defect']} ({row['image_auroc']:.3f})")
    for key, style, name in (("at_bundle_threshold", BUNDLE_STYLE, "bundle threshold"),
                             ("at_target_frr", TARGET_STYLE, f"{100 * doc['target_frr']:g}% FRR threshold")):
        op = doc[key]
        x, yv = op["false_reject"]["rate"], 1.0 - op["escape"]["rate"]
        ax.plot([x], [yv], marker="o" if key == "at_bundle_threshold" else "s", markersize=7,
                markerfacecolor="white", markeredgecolor=style["color"], linestyle="none", label=name)
    ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
    return _unit_square_png(fig, ax, "false-reject rate (good parts rejected)",
                            "detection rate (1 - escape rate)", "ROC", "lower right")


def pr_plot(labels: np.ndarray, scores: np.ndarray, doc: dict) -> bytes:
    """Precision-recall of "defective" with both operating points."""
    from sklearn.metrics import precision_recall_curve

    fig, ax = _figure()
    precision, recall, _ = precision_recall_curve(labels, scores)
    ax.plot(recall, precision, color="black", linewidth=2, label=f"AP {doc['metrics']['image_ap']:.3f}")
    n_bad = doc["n_defective"]
    for key, style, marker, name in (("at_bundle_threshold", BUNDLE_STYLE, "o", "bundle threshold"),
                                     ("at_target_frr", TARGET_STYLE, "s", f"{100 * doc['target_frr']:g}% FRR threshold")):
        op = doc[key]
        caught = n_bad - op["escape"]["count"]
        flagged = caught + op["false_reject"]["count"]
        if flagged:
            ax.plot([caught / n_bad], [caught / flagged], marker=marker, markersize=7, markerfacecolor="white",
                    markeredgecolor=style["color"], linestyle="none", label=name)
    ax.axhline(n_bad / doc["n_test"], color="#bbbbbb", linewidth=0.8)
    return _unit_square_png(fig, ax, "recall (defects caught)", "precision (rejects that are defects)",
                            "Precision-recall", "lower left")


def histogram_plot(labels: np.ndarray, scores: np.ndarray, doc: dict) -> bytes:
    """Score histograms of good vs defective images, thresholds drawn."""
    fig, ax = _figure(WIDE_FIGSIZE)  # the page shows it full width
    thresholds = (doc["at_bundle_threshold"]["threshold"], doc["at_target_frr"]["threshold"])
    lo = min(float(scores.min()), *thresholds)
    hi = max(float(scores.max()), *thresholds)
    bins = np.linspace(lo, hi, HIST_BINS + 1) if hi > lo else HIST_BINS
    ax.hist(scores[labels == 0], bins=bins, color=GOOD_COLOUR, alpha=0.6, label=f"good ({doc['n_good']})")
    ax.hist(scores[labels == 1], bins=bins, color=BAD_COLOUR, alpha=0.6, label=f"defective ({doc['n_defective']})")
    ax.axvline(thresholds[0], **BUNDLE_STYLE, label=f"bundle threshold {thresholds[0]:.3g}")
    ax.axvline(thresholds[1], **TARGET_STYLE, label=f"{100 * doc['target_frr']:g}% FRR threshold {thresholds[1]:.3g}")
    ax.set_xlabel("image score (rejected when > threshold)")
    ax.set_ylabel("images")
    ax.set_title("Scores: good vs defective")
    ax.legend(fontsize=7)
    return _png(fig)


def per_type_plot(doc: dict) -> bytes:
    """Per defect type: escape rate with its confidence interval at both thresholds, and AUROC."""
    rows = doc["per_type"]
    names = [r["defect"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = _figure(WIDE_FIGSIZE, ncols=2)  # the page shows it full width
    width = 0.38
    for offset, key, colour, name in ((-width / 2, "escape", "#444444", "bundle threshold"),
                                      (width / 2, "escape_at_target", "#aaaaaa", f"{100 * doc['target_frr']:g}% FRR threshold")):
        rate = np.array([r[key]["rate"] for r in rows])
        lo = np.array([r[key]["ci_low"] for r in rows])
        hi = np.array([r[key]["ci_high"] for r in rows])
        ax1.bar(x + offset, rate, width, color=colour, label=name,
                yerr=np.vstack([rate - lo, hi - rate]), capsize=3, ecolor="black", error_kw={"linewidth": 0.8})
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel(f"escape rate ({100 * doc['confidence']:g}% CI)")
    ax1.set_title("Escapes per defect type")
    ax1.legend(fontsize=7)
    keys = [("image_auroc", "image AUROC", "#1f4e79")]
    if any(r["pixel_auroc"] is not None for r in rows):
        keys += [("pixel_auroc", "pixel AUROC", "#4f81bd"), ("pixel_pro", "PRO (0.3)", "#9dc3e6")]
    w = 0.8 / len(keys)
    for i, (key, name, colour) in enumerate(keys):
        vals = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax2.bar(x - 0.4 + w / 2 + i * w, vals, w, color=colour, label=name)
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylim(0, 1.02)
    ax2.axhline(0.5, color="#bbbbbb", linewidth=0.8)
    ax2.set_title("Separation per defect type")
    ax2.legend(fontsize=7, loc="lower right")
    return _png(fig)


def all_plots(labels: np.ndarray, scores: np.ndarray, defects: list[str], doc: dict) -> dict[str, bytes]:
    """Every plot of the page, by name (the order the page shows them)."""
    return {
        "histogram": histogram_plot(labels, scores, doc),
        "roc": roc_plot(labels, scores, defects, doc),
        "pr": pr_plot(labels, scores, doc),
        "per_type": per_type_plot(doc),
    }
