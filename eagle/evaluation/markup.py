"""HTML building blocks of the report: value formatting, element ids, and the metric tables.

Tables read nested metrics dicts through dotted paths (``final.f1``), so the same row lists serve products,
pooled figures and compared runs.
"""

from __future__ import annotations

import html
import re
from typing import Any

from eagle.evaluation.decisions import BANDS, GUIDANCE

Rows = list[tuple[str, str]]  # (path into a metrics dict, label)

# The summary's key figures, one column each, a product (or the pool) per row: what the MLLM changed and cost
# first, so that a narrow window (800 px) shows them without scrolling; then accuracy and F1 before → after.
KEY_COLUMNS: Rows = [
    ("n_images", "images"), ("verdict_change.fixed", "fixed"), ("verdict_change.introduced", "introduced"),
    ("mllm.ms_per_image", "MLLM ms / image"), ("expert.accuracy", "expert accuracy"),
    ("final.accuracy", "final accuracy"), ("expert.f1", "expert F1"), ("final.f1", "final F1"),
    ("mllm.calls_per_image", "MLLM calls / image"), ("mllm.parse_rate", "parse rate"),
    ("mllm.accuracy", "MLLM accuracy"), ("mllm.expert_accuracy_on_answered", "expert accuracy, same images"),
    ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
]
KEY_VISIBLE = ("verdict_change.fixed", "verdict_change.introduced", "mllm.ms_per_image")  # seen at 800 px

# Every metric of a group, for the collapsed full tables.
ALL_ROWS: Rows = [
    ("n_images", "images scored"), ("n_normal", "normal"), ("n_defective", "defective"),
    ("n_errors", "error rows (excluded)"), ("n_unmatched", "rows outside the test set"),
    ("n_missing", "test images without a row"),
    ("image_auroc", "image AUROC (expert score)"), ("fpr_at_threshold", "FPR at threshold (normal images)"),
    ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR ≤ 0.3)"), ("n_pixel_images", "images with map"),
    *[(f"{who}.{k}", f"{who} {k}") for who in ("expert", "final") for k in ("precision", "recall", "f1", "accuracy")],
    ("verdict_change.fixed", "errors fixed by the MLLM"), ("verdict_change.introduced", "errors introduced"),
    ("verdict_change.both_wrong", "both wrong"), ("verdict_change.both_right", "both right"),
]

# The MLLM's answers and cost, one column each.
MLLM_COLUMNS: Rows = [
    ("mllm.calls", "calls"), ("mllm.calls_per_image", "per image"), ("mllm.yes", "yes"), ("mllm.no", "no"),
    ("mllm.unparsed", "unparsed"), ("mllm.parse_rate", "parse rate"), ("mllm.correct", "right"),
    ("mllm.wrong", "wrong"), ("mllm.accuracy", "MLLM accuracy"),
    ("mllm.expert_accuracy_on_answered", "expert accuracy, same images"),
    ("mllm.failed", "failed"), ("mllm.guided_share", "guided"), ("mllm.ms_per_image", "ms / image"),
    ("mllm.ms_per_call", "ms / call"), ("mllm.attention_share.correct", "attention, right"),
    ("mllm.attention_share.wrong", "attention, wrong"),
]
MLLM_NOTE = ("Per product: MLLM calls, per scored image; answers yes (defect), no, unparsed; parse rate = yes/no "
             "answers per call; right and wrong yes/no answers; MLLM accuracy = right per yes/no answer; expert "
             "accuracy on exactly the images the MLLM answered yes or no; calls that failed (the expert's verdict "
             "kept); guided share of calls; MLLM milliseconds per scored image and per call; mean share of image "
             "attention inside the expert's region for right and for wrong answers.")

# Routing efficiency: one row per policy (eagle.evaluation.routing_efficiency), judged on the same scores.
ROUTING_COLUMNS: Rows = [
    ("routed_share", "share routed"), ("routed", "images routed"), ("errors_routed_share", "expert errors inside"),
    ("errors_routed", "errors routed"), ("errors", "errors"), ("false_alarms_routed", "false alarms routed"),
    ("false_alarms", "false alarms"), ("missed_defects_routed", "missed defects routed"),
    ("missed_defects", "missed defects"), ("missed_defects_routed_share", "missed defects inside"),
]
ROUTING_NOTE = ("Each policy on this run's scores: the share of images it would send to the MLLM and how many of "
                "the expert's errors (false alarms, missed defects) are among them. routed = what this run sent; "
                "band = this run's unsure band (routing.policy borderline: its band); not-confident-normal and "
                "uncertain use EAGLE's band (threshold <= score < score_max); near-threshold = score/threshold in "
                "[0.9, 1.1); best band = the most errors any one score band as large as the routed set could hold "
                "(found with the labels: an upper bound for every band policy).")

# Several runs side by side.
COMPARISON_ROWS: Rows = [
    ("n_images", "images (common to all runs)"), ("expert.accuracy", "expert accuracy"),
    ("final.accuracy", "final accuracy"), ("expert.f1", "expert F1"), ("final.precision", "final precision"),
    ("final.recall", "final recall"), ("final.f1", "final F1"),
    ("mllm.calls_per_image", "MLLM calls / image"), ("mllm.guided_share", "guided share of calls"),
    ("mllm.parse_rate", "parse rate"), ("mllm.accuracy", "MLLM accuracy"),
    ("verdict_change.fixed", "errors fixed by the MLLM"), ("verdict_change.introduced", "errors introduced"),
    ("mllm.ms_per_image", "MLLM ms / image"), ("better", "right where the baseline is wrong"),
    ("worse", "wrong where the baseline is right"),
]

CHANGE_COLUMNS = (("both_right", "both right"), ("fixed", "fixed by MLLM"), ("introduced", "introduced by MLLM"),
                  ("both_wrong", "both wrong"))


def lookup(metrics: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, ``None`` where any step is missing."""
    for key in path.split("."):
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics


def format_value(value: Any) -> str:
    """A metric for people: 3 decimals (1 from 10 on, none from 100 on), 'n/a' when undefined."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def slug(name: str) -> str:
    """A string safe in an element id and a URL fragment."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def esc(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any, css: str = "") -> str:
    return f'<td class="{css}">{format_value(value)}</td>' if css else f"<td>{format_value(value)}</td>"


def _table(head: list[str], body: list[str], caption: str = "", css: str = "") -> str:
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    cls = f' class="{css}"' if css else ""
    return (f"<table{cls}>{cap}<thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def metrics_table(columns: dict[str, dict[str, Any]], rows: Rows = ALL_ROWS) -> str:
    """One column per metrics dict (a product, the pool, a run) and one row per metric."""
    body = [f"<tr><th>{esc(label)}</th>" + "".join(_cell(lookup(m, path)) for m in columns.values()) + "</tr>"
            for path, label in rows]
    return _table(["metric", *(esc(name) for name in columns)], body)


def _wide_row(name: str, m: dict[str, Any], columns: Rows, css: str = "", only: set[str] | None = None) -> str:
    cells = "".join(_cell(lookup(m, path), _change_class(path, lookup(m, path)))
                    if only is None or path in only else "<td></td>" for path, _ in columns)
    return f'<tr class="{css}"><th>{name}</th>{cells}</tr>' if css else f"<tr><th>{name}</th>{cells}</tr>"


def wide_table(groups: dict[str, dict[str, Any]], columns: Rows, first: str = "") -> str:
    """One row per metrics dict (a product, the pool), one column per metric."""
    body = [_wide_row(esc(name), m, columns) for name, m in groups.items()]
    return _table([esc(first), *(esc(label) for _, label in columns)], body, css="wide")


def routing_table(routing: dict[str, dict[str, Any]], caption: str) -> str:
    """The routing-efficiency table of one group: a policy per row."""
    return (f'<h3>{esc(caption)}</h3><div class="scroll">{wide_table(routing, ROUTING_COLUMNS, "policy")}</div>'
            f'<p class="note">{esc(ROUTING_NOTE)}</p>')


def key_figures_table(products: dict[str, dict[str, Any]], pooled: dict[str, Any]) -> str:
    """A product per row (linked to its section), then all products pooled and the mean over products (blank
    where no mean is taken)."""
    body = [_wide_row(f'<a href="#product-{slug(p)}">{esc(p)}</a>', m, KEY_COLUMNS) for p, m in products.items()]
    body.append(_wide_row("all products (pooled)", pooled, KEY_COLUMNS, "pooled"))
    body.append(_wide_row("mean over products", pooled["product_mean"], KEY_COLUMNS, "pooled",
                          set(pooled["product_mean"])))
    head = ["product", *(f'<span class="key">{esc(label)}</span>' if path in KEY_VISIBLE else esc(label)
                         for path, label in KEY_COLUMNS)]
    return _table(head, body, css="wide")


PROVENANCE_COLUMNS = (("routing", "routing"), ("mllm_model", "MLLM"), ("mllm_family", "family"),
                      ("guidance", "guidance"), ("expert", "expert"), ("config_hash", "config hash"),
                      ("mode", "mode"), ("status", "status"), ("source", "from"))


def provenance_table(provenance: dict[str, dict[str, Any]], evaluated: str, chosen_as: str) -> str:
    """Every evaluated run (the first is the one the report is about), a row each: what produced its rows."""
    def value(key: str, v: Any) -> str:
        if key == "guidance":
            return "on" if v else "off"
        return esc(v if v not in (None, "") else ("none" if key == "mllm_model" else "n/a"))

    body = [f"<tr><th>{esc(run)}{' (evaluated)' if run == evaluated else ''}</th>"
            + "".join(f'<td class="text">{value(k, p.get(k))}</td>' for k, _ in PROVENANCE_COLUMNS) + "</tr>"
            for run, p in provenance.items()]
    return _table(["run", *(esc(label) for _, label in PROVENANCE_COLUMNS)], body, css="wide provenance")


def _change_class(path: str, value: Any) -> str:
    if not value:
        return ""
    return {"verdict_change.fixed": "good", "verdict_change.introduced": "bad"}.get(path, "")


def confusion_matrix(stats: dict[str, Any], caption: str) -> str:
    """A 2×2 of truth (rows) against verdict (columns) from ``binary_stats`` counts."""
    body = [f"<tr><th>truly normal</th>{_cell(stats['tn'])}{_cell(stats['fp'], 'bad')}</tr>",
            f"<tr><th>truly defective</th>{_cell(stats['fn'], 'bad')}{_cell(stats['tp'])}</tr>"]
    return _table(["", "said normal", "said anomalous"], body, caption, "matrix")


def change_matrix(change: dict[str, Any], caption: str) -> str:
    """The 2×2 of expert verdict against final verdict, each right or wrong against the truth."""
    body = [f"<tr><th>expert right</th>{_cell(change['both_right'])}{_cell(change['introduced'], 'bad')}</tr>",
            f"<tr><th>expert wrong</th>{_cell(change['fixed'], 'good')}{_cell(change['both_wrong'])}</tr>"]
    return _table(["", "final right", "final wrong"], body, caption, "matrix")


def change_splits_table(change: dict[str, Any]) -> str:
    """Verdict changes by the expert's confidence band and by guidance."""
    groups = [(f"band: {b.replace('_', ' ')}", change["by_confidence"][b])
              for b in (*BANDS, *sorted(set(change["by_confidence"]) - set(BANDS)))]
    groups += [(f"MLLM: {g}", change["by_guidance"][g]) for g in GUIDANCE]
    body = []
    for label, c in groups:
        cells = "".join(_cell(c[k], _change_class(f"verdict_change.{k}", c[k])) for k, _ in CHANGE_COLUMNS)
        body.append(f"<tr><th>{esc(label)}</th>{_cell(sum(c.values()))}{cells}"
                    f"{_cell(c['fixed'] - c['introduced'])}</tr>")
    return _table(["", "images", *(h for _, h in CHANGE_COLUMNS), "net fixed"], body)


def defect_table(per_defect: dict[str, dict[str, Any]]) -> str:
    """Recall of expert and final verdict per defect type."""
    if not per_defect:
        return '<p class="muted">No defective test images scored.</p>'
    body = [f"<tr><th>{esc(d)}</th>{_cell(m['n'])}{_cell(m['expert_recall'])}{_cell(m['final_recall'])}"
            f"{_cell(m['fixed'], _change_class('verdict_change.fixed', m['fixed']))}"
            f"{_cell(m['introduced'], _change_class('verdict_change.introduced', m['introduced']))}</tr>"
            for d, m in per_defect.items()]
    return _table(["defect type", "images", "expert recall", "final recall", "misses fixed", "misses introduced"],
                  body)
