"""The report's plots as inline PNG data URIs: score histograms, ROC curves, and small multiples of the expert vs
final verdict 2×2.

Plots are palette PNGs (a plot has few colours), and legends sit outside the axes so they never hide data.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from sklearn.metrics import roc_curve

from eagle.evaluation.metrics import auroc

DPI = 90
CLIP_PERCENTILE = 99
CHANGE_COLOURS = {"both_right": "#4c72b0", "fixed": "#2ca02c", "introduced": "#d62728", "both_wrong": "#555555"}
CHANGE_LAYOUT = (("both_right", "introduced"), ("fixed", "both_wrong"))  # rows: expert right, wrong; columns: final


def figure_uri(fig: Figure) -> str:
    """The figure as a palette PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    out = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=64).save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def histogram_range(values: np.ndarray, marks: Sequence[float]) -> tuple[float, float]:
    """The x-axis range of a score histogram: every mark (threshold, score_max) and every value, except far
    outliers: values above both the 99th percentile and Tukey's far-out fence (Q3 + 3·IQR), when leaving them
    out shrinks the axis by more than a third. The right end is then the largest value kept (or a mark)."""
    values = np.asarray(values, float)
    lo, top = min(values.min(), *marks), max(values.max(), *marks)
    q1, q3, high = np.percentile(values, [25, 75, CLIP_PERCENTILE])
    kept = values[values <= max(high, q3 + 3 * (q3 - q1))]
    clip = max(kept.max(), *marks) if kept.size else top
    hi = clip if top - lo > 1.5 * (clip - lo) else top
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def histogram_figure(title: str, series: list[tuple[str, np.ndarray, str]],
                     marks: list[tuple[str, float, str]]) -> str:
    """Density histograms of (label, scores, colour) on a common axis (:func:`histogram_range`); values beyond
    its right end are marked with a triangle there and counted in the legend; (label, value, line style)
    vertical lines."""
    series = [s for s in series if s[1].size]
    fig = Figure(figsize=(5.2, 3.0))
    ax = fig.add_subplot()
    if series:
        lo, hi = histogram_range(np.concatenate([s[1] for s in series]), [m[1] for m in marks])
        edges = np.linspace(lo, hi, 31)
        for i, (label, values, colour) in enumerate(series):
            inside, beyond = values[values <= hi], values[values > hi]
            weights = np.full(inside.size, 1.0 / (values.size * (edges[1] - edges[0])))  # density of all values
            text = f"{label} (n={values.size})"
            if beyond.size:
                text = f"{label} (n={values.size}; {beyond.size} beyond axis, max {beyond.max():.3g})"
                ax.plot([1.0], [0.92 - 0.08 * i], marker=">", markersize=9, color=colour,
                        transform=ax.transAxes, clip_on=False)
            ax.hist(inside, bins=edges, weights=weights, alpha=0.5, color=colour, label=text)
        ax.set_xlim(lo, hi)
    for label, value, style in marks:
        ax.axvline(value, color="red", linestyle=style, label=f"{label} {value:.3g}")
    ax.set(xlabel="expert score", ylabel="density", title=title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return figure_uri(fig)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> str:
    """Image ROC curves of (labels, scores) per name; a name with one class only is listed as undefined."""
    fig = Figure(figsize=(4, 3.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
    undefined = []
    for name, (anomalous, scores) in curves.items():
        area = auroc(anomalous, scores)
        if area is None:
            undefined.append(name)
            continue
        fpr, tpr, _ = roc_curve(anomalous, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {area:.3f})")
    if undefined:
        ax.text(0.03, 0.97, "AUROC undefined (one class):\n" + ", ".join(undefined), ha="left", va="top",
                fontsize=7, wrap=True)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    if len(undefined) < len(curves):  # outside the axes: below for a few curves, to the right for many
        below = len(curves) <= 3
        ax.legend(fontsize=7, loc="upper center" if below else "upper left", frameon=False,
                  bbox_to_anchor=(0.5, -0.18) if below else (1.04, 1.0))
    return figure_uri(fig)


def change_grid_figure(groups: dict[str, dict[str, int]], columns: int = 5) -> str:
    """One small 2×2 per group (expert right/wrong × final right/wrong, counts written in), the shade of a
    cell growing with its share of the group's images."""
    n = len(groups)
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.7 * cols + 0.6, 1.6 * rows + 0.2))
    for i, (name, change) in enumerate(groups.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        total = sum(change[k] for k in CHANGE_COLOURS) or 1
        for r, keys in enumerate(CHANGE_LAYOUT):
            for c, key in enumerate(keys):
                share = change[key] / total
                face = 1 - (1 - np.array(to_rgb(CHANGE_COLOURS[key]))) * (0.12 + 0.88 * math.sqrt(share))
                ax.add_patch(Rectangle((c, 1 - r), 1, 1, facecolor=face, edgecolor="white", linewidth=2))
                ax.text(c + 0.5, 1.5 - r, str(change[key]), ha="center", va="center", fontsize=9,
                        color="white" if share > 0.3 else "black")
        ax.set(xlim=(0, 2), ylim=(0, 2))
        ax.set_xticks([0.5, 1.5], ["final right", "final wrong"] if i >= n - cols else ["", ""], fontsize=7)
        ax.set_yticks([1.5, 0.5], ["expert right", "expert wrong"] if i % cols == 0 else ["", ""], fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        net = change["fixed"] - change["introduced"]
        ax.set_title(f"{name[:22]}\nnet fixed {net:+d}", fontsize=8)
    fig.tight_layout()
    return figure_uri(fig)
