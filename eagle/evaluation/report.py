"""The evaluation as one self-contained HTML page, plus ``metrics.json``.

Inline images only (plots as PNG, photos as JPEG data URIs), no scripts, no external styles. Order: the verdict
as the first line (net errors the MLLM fixed and introduced, accuracy and F1 before → after, its cost per
image); a loud warning when the MLLM's parse rate is low, with its raw replies; coverage (what was and was not
scored) and the provenance of every run evaluated (routing, MLLM and family, guidance, expert, config hash);
contents; a summary that answers "did the MLLM help, where, at what cost" (key figures per product, the expert
vs final 2×2 as small multiples, confusion matrices, changes by confidence band and guidance, recall per
defect type);
runs side by side when several were evaluated; then one collapsible section per product: plots, tables,
example cards, and the full metric table last.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np

from eagle.config import StorageConfig
from eagle.evaluation.cards import gallery, introduced_gallery
from eagle.evaluation.figures import change_grid_figure, histogram_figure, roc_figure
from eagle.evaluation.markup import (
    COMPARISON_ROWS,
    MLLM_COLUMNS,
    MLLM_NOTE,
    change_matrix,
    change_splits_table,
    confusion_matrix,
    defect_table,
    esc,
    format_value,
    key_figures_table,
    metrics_table,
    provenance_table,
    routing_table,
    slug,
    wide_table,
)
from eagle.evaluation.scorecard import Evaluation, ProductResult
from eagle.io import storage

TrainScores = dict[str, tuple[list[float], str] | None]  # product -> (scores, source meta.json URI)
POOLED = "all products (pooled)"
POOLED_NOTE = ("Pooled: the images (and pixels) of every product ranked together, though each product's expert "
               "scores on its own scale, so a pooled AUROC can lie below every product's. The mean over products "
               "is the figure MVTec AD papers report.")
CARD_NOTE = ("Left: the image with the expert's boxes (red) and the ground-truth outline (green). Right: the anomaly "
             "map, coloured from 0 to twice the threshold, with the expert's mask outline (white) and the ground "
             "truth (green). Click a card's pictures for a full-resolution crop around the strongest region.")

CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1.5em 2em; color: #222; max-width: 1280px;
       line-height: 1.4; }
h1 { margin-top: 0; }
nav.toc { background: #f6f7f9; border: 1px solid #ddd; padding: 0.4em 1.2em; margin: 1em 0; }
nav.toc ol ol { columns: 5 160px; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
caption { font-weight: 600; text-align: left; padding: 2px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th:first-child { text-align: left; }
thead th { background: #f0f2f5; text-align: center; vertical-align: bottom; }
tr.pooled th, tr.pooled td { background: #f7f7f7; font-style: italic; }
td.good { background: #e3f4e3; color: #1e6b1e; font-weight: 600; }
td.bad { background: #fde8e8; color: #b71c1c; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
.row { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
figure { display: table; margin: 0.5em 0; }  /* as wide as its image; the caption wraps below it */
figure img { max-width: 100%; height: auto; }
figcaption { display: table-caption; caption-side: bottom; }
figcaption, .note, .muted { color: #666; font-size: 0.85em; max-width: 60em; }
.lead { font-size: 1.05em; max-width: 60em; }
h1.verdict { font-size: 1.35em; margin: 0 0 0.3em; padding: 0.4em 0.6em; border-left: 6px solid #888;
             background: #f6f7f9; }
h1.verdict.good { border-color: #2e7d32; background: #eef7ee; }
h1.verdict.bad { border-color: #c62828; background: #fdeeee; }
.kicker { color: #666; margin: 0 0 0.6em; font-size: 0.9em; overflow-wrap: anywhere; }
.alarm { border: 2px solid #c62828; background: #fdeeee; color: #7f1010; padding: 0.5em 0.9em; margin: 0.6em 0;
         font-weight: 600; }
.alarm q { font-weight: normal; font-style: italic; overflow-wrap: anywhere; }
.alarm ul { margin: 0.3em 0; }
.coverage { margin: 0.4em 0; }
table.provenance td.text { text-align: left; overflow-wrap: break-word; max-width: 22em; }
th .key { font-weight: 700; }
.count { color: #666; font-weight: normal; font-size: 0.85em; }
details > summary { cursor: pointer; }
details.product { border: 1px solid #ccc; border-radius: 4px; margin: 0.6em 0; padding: 0 1em; }
details.product > summary { padding: 0.5em 0; }
details.product > summary h2 { display: inline; font-size: 1.25em; margin-right: 0.6em; }
details.product[open] > summary { border-bottom: 1px solid #ddd; margin-bottom: 0.5em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(376px, 100%), 1fr)); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 6px; font-size: 0.82em; min-width: 0;
        overflow-wrap: anywhere; word-break: break-word; break-inside: avoid; page-break-inside: avoid; }
.card .zoom { display: flex; gap: 4px; }
.card .zoom img, .card .nomap { width: calc(50% - 2px); max-width: 200px; height: auto; display: block; }
.card .nomap { background: #eee; color: #666; padding: 2em 0.5em; text-align: center; }
.card .path { font-weight: 600; margin: 0.3em 0; }
.card dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 0 0.6em; margin: 0.3em 0; }
.card dt { color: #666; }
.card dd { margin: 0; }
.card p { margin: 0.3em 0; }
.tag { display: inline-block; padding: 0 0.4em; border-radius: 3px; }
.tag.ok { background: #e3f4e3; color: #1e6b1e; }
.tag.bad { background: #fde8e8; color: #b71c1c; }
.lightbox { display: none; }
.lightbox:target { display: flex; flex-direction: column; align-items: center; justify-content: center;
                   position: fixed; inset: 0; z-index: 10; background: rgba(0, 0, 0, 0.94); color: #eee; padding: 1em; }
.lightbox img { height: 86vh; max-width: 96vw; object-fit: contain; image-rendering: pixelated; }  /* magnified */
.lightbox .close { color: #fff; align-self: flex-end; font-size: 1.2em; }
@media (max-width: 900px) {  /* 800 px: the key figures' first columns (fixed, introduced, ms) stay in view */
  body { padding: 0.8em 0.6em; }
  table.wide { font-size: 0.78em; }
  th, td { padding: 2px 4px; }
  table.wide thead th { max-width: 6.5em; }
}
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav.toc, .lightbox, .lightbox:target { display: none; }
  details.product { border: none; padding: 0; break-before: page; }
  details::details-content { content-visibility: visible; display: block; }
  .card, figure, table { break-inside: avoid; }
  .gallery { grid-template-columns: repeat(2, minmax(0, 1fr)); }
}
"""


LOW_PARSE_RATE = 0.5  # below this share of clear yes/no replies the MLLM barely acts: a loud warning
REPLY_EXAMPLES = 3


def _net(change: dict[str, Any]) -> int:
    return change["fixed"] - change["introduced"]


def verdict(m: dict[str, Any]) -> tuple[str, str]:
    """The report's first line and its tone (good, bad or ''): net errors (fixed / introduced), accuracy and F1
    before → after, and what the MLLM cost per image."""
    mllm, change, n = m["mllm"], m["verdict_change"], m["n_images"]
    if not mllm["calls"]:
        return (f"The MLLM was not asked about any of the {n} images: the final verdict is the expert's "
                f"(accuracy {format_value(m['expert']['accuracy'])}, F1 {format_value(m['expert']['f1'])})."), ""
    net, f1_before, f1_after = _net(change), m["expert"]["f1"], m["final"]["f1"]
    df1 = f1_after - f1_before if f1_before is not None and f1_after is not None else 0.0
    if net > 0 and df1 < 0 or net < 0 and df1 > 0:  # accuracy and F1 disagree: say so, no colour
        said, tone = f"mixed, accuracy {'rose' if net > 0 else 'fell'} but F1 {'fell' if df1 < 0 else 'rose'}", ""
    else:
        said = ("the MLLM helped" if net > 0 else "the MLLM made it worse" if net < 0
                else "the MLLM changed nothing on balance")
        tone = "good" if net > 0 else "bad" if net < 0 else ""
    return (f"Verdict: {said}: net {net:+d} errors (fixed {change['fixed']}, introduced {change['introduced']}) · "
            f"accuracy {format_value(m['expert']['accuracy'])} → {format_value(m['final']['accuracy'])} · "
            f"F1 {format_value(m['expert']['f1'])} → {format_value(m['final']['f1'])} · MLLM cost per image: "
            f"{format_value(mllm['calls_per_image'])} calls, {format_value(mllm['ms_per_image'])} ms"), tone


def headline(m: dict[str, Any]) -> str:
    """The answer in two sentences: what the MLLM was asked and said, and what that did to the verdicts."""
    mllm, change, n = m["mllm"], m["verdict_change"], m["n_images"]
    if not mllm["calls"]:
        return (f"The MLLM was not asked about any of the {n} images: the final verdict is the expert's "
                f"(F1 {format_value(m['expert']['f1'])}).")
    return (f"The MLLM was asked about {mllm['calls']} of {n} images; {mllm['yes'] + mllm['no']} answers were a "
            f"clear yes/no (parse rate {format_value(mllm['parse_rate'])}), {mllm['correct']} of them right (MLLM "
            f"accuracy {format_value(mllm['accuracy'])}; the expert's on exactly those images "
            f"{format_value(mllm['expert_accuracy_on_answered'])}). It fixed {change['fixed']} expert errors and "
            f"introduced {change['introduced']} (net {_net(change):+d}): accuracy "
            f"{format_value(m['expert']['accuracy'])} → {format_value(m['final']['accuracy'])}, F1 "
            f"{format_value(m['expert']['f1'])} → {format_value(m['final']['f1'])}, at "
            f"{format_value(mllm['ms_per_image'])} ms of MLLM time per image.")


def raw_replies(evaluation: Evaluation, k: int = REPLY_EXAMPLES) -> list[tuple[str, str]]:
    """Up to `k` (image, raw reply) of calls without a clear yes/no: ``mllm_reply``, else the explanation."""
    found = []
    for result in evaluation.products.values():
        for row, truth in zip(result.rows, result.truths):
            if row["mllm_ran"] and row["answer"] not in ("yes", "no"):
                found.append((truth.path, row.get("mllm_reply") or row["explanation"] or "(empty reply)"))
    return sorted(found)[:k]


def parse_alarm(evaluation: Evaluation) -> str:
    """A loud warning when few MLLM replies were a clear yes/no: the MLLM then barely changed anything, which
    'fixed 0, introduced 0' alone would hide; with examples of the raw replies."""
    mllm = evaluation.overall["mllm"]
    rate = mllm["parse_rate"]
    if not mllm["calls"] or rate is None or rate >= LOW_PARSE_RATE:
        return ""
    examples = "".join(f"<li>{esc(path)}: <q>{esc(reply[:300])}</q></li>" for path, reply in raw_replies(evaluation))
    return (f'<div class="alarm" id="parse-alarm">Warning: low parse rate {format_value(rate)}: only '
            f"{mllm['yes'] + mllm['no']} of {mllm['calls']} MLLM replies said yes or no, so the MLLM had almost no "
            f"effect on the verdicts (the rest keep the expert's). Check the prompt, mllm.max_new_tokens and the "
            f"model. Raw replies:<ul>{examples}</ul></div>")


def coverage(o: dict[str, Any]) -> str:
    """What was scored and what was not: rows without ground truth, test images without a row, error rows."""
    return (f'<p class="coverage" id="coverage"><b>Coverage:</b> {o["n_images"]} of {o["n_test_images"]} test '
            f"images scored · {_n(o['n_unmatched'], 'row')} without ground truth (outside the test set, not "
            f"scored) · {_n(o['n_missing'], 'test image')} without a row · {_n(o['n_errors'], 'error row')} (not "
            f"scored)</p>")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def one_line(m: dict[str, Any]) -> str:
    change = m["verdict_change"]
    return (f"{m['n_images']} images · MLLM fixed {change['fixed']}, introduced {change['introduced']} · accuracy "
            f"{format_value(m['expert']['accuracy'])} → {format_value(m['final']['accuracy'])} · F1 "
            f"{format_value(m['expert']['f1'])} → {format_value(m['final']['f1'])}")


def _figure(ident: str, uri: str, caption: str) -> str:
    return (f'<figure id="{ident}"><img alt="{esc(caption)}" src="{uri}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _labels_scores(result: ProductResult) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([t.anomalous for t in result.truths], bool),
            np.array([r["expert_score"] for r in result.rows], float))


def score_histogram(result: ProductResult, train: tuple[list[float], str] | None) -> str:
    """Training, normal-test and defective-test scores with the threshold and score_max (the paper's figure)."""
    anomalous, scores = _labels_scores(result)
    series = [("training", np.asarray(train[0] if train else [], float), "tab:gray"),
              ("test normal", scores[~anomalous], "tab:blue"), ("test defective", scores[anomalous], "tab:orange")]
    marks = [(name, value, style) for key, style, name in (("threshold", "--", "threshold"),
                                                          ("score_max", ":", "score_max"))
             for value in sorted({r[key] for r in result.rows if r[key] is not None})]
    return histogram_figure(f"{result.product}: expert scores", series, marks)


def verdict_tables(m: dict[str, Any], scope: str) -> str:
    """Confusion matrices, the expert vs final 2×2 and its splits, recall per defect type."""
    return (f'<div class="row">{confusion_matrix(m["expert"], f"expert verdict, {scope}")}'
            f'{confusion_matrix(m["final"], f"final verdict, {scope}")}'
            f'{change_matrix(m["verdict_change"], f"expert vs final verdict, {scope}")}</div>'
            f'<div class="row"><div><h3>Recall per defect type</h3>{defect_table(m["per_defect"])}</div>'
            f"<div><h3>Where the MLLM changed the outcome</h3>{change_splits_table(m['verdict_change'])}</div></div>")


def mllm_table(groups: dict[str, dict[str, Any]]) -> str:
    """The MLLM's answers and cost, a row per group."""
    return (f'<h3>MLLM answers and cost</h3><div class="scroll">{wide_table(groups, MLLM_COLUMNS, "product")}</div>'
            f'<p class="note">{esc(MLLM_NOTE)}</p>')


def contents(evaluation: Evaluation) -> str:
    items = ['<li><a href="#summary">Summary</a></li>']
    if evaluation.comparison:
        items.append('<li><a href="#comparison">Runs side by side</a></li>')
    products = "".join(f'<li><a href="#product-{slug(p)}">{esc(p)}</a></li>' for p in sorted(evaluation.products))
    items.append(f"<li>Products<ol>{products}</ol></li>")
    return f'<nav class="toc" id="contents"><h2>Contents</h2><ol>{"".join(items)}</ol></nav>'


def summary_section(evaluation: Evaluation, cfg: StorageConfig | None = None) -> str:
    products = dict(sorted(evaluation.products.items()))
    o = evaluation.overall
    changes = {p: r.metrics["verdict_change"] for p, r in products.items()} | {"all products": o["verdict_change"]}
    curves = {p: _labels_scores(r) for p, r in products.items()}
    columns = {p: r.metrics for p, r in products.items()} | {POOLED: o}
    return (f'<section id="summary"><h2>Summary</h2><p class="lead">{esc(headline(o))}</p>'
            f'<div class="scroll" id="key-figures">{key_figures_table({p: r.metrics for p, r in products.items()}, o)}'
            f'</div><p class="note">{esc(POOLED_NOTE)}</p>'
            + introduced_gallery(list(products.values()), cfg=cfg)
            + _figure("changes-overall", change_grid_figure(changes),
                      "Expert verdict vs final verdict, each right or wrong against the ground truth: green = expert "
                      "errors the MLLM fixed, red = errors it introduced; darker = a larger share of the images.")
            + verdict_tables(o, POOLED)
            + mllm_table({p: r.metrics for p, r in products.items()} | {POOLED: o})
            + routing_table(o["routing"], f"Routing: the expert's errors in front of the MLLM, {POOLED}")
            + _figure("roc-overall", roc_figure(curves, "Image ROC per product"), "Image ROC of the expert score")
            + f'<details id="metrics-overall"><summary>All metrics, every product</summary><div class="scroll">'
              f"{metrics_table(columns)}</div></details></section>")


def comparison_section(comparison: dict[str, Any]) -> str:
    baseline, runs = comparison["baseline"], comparison["runs"]
    columns = {f"{run} (baseline)" if run == baseline else run: m | comparison["paired_with_baseline"].get(run, {})
               for run, m in runs.items()}
    scored = ", ".join(f"{run} {n}" for run, n in comparison["n_scored"].items())
    return (f'<section id="comparison"><h2>Runs side by side</h2><p>On the {comparison["n_common_images"]} test '
            f"images every run scored (images scored per run: {esc(scored)}). The last two rows pair each run "
            f"with the baseline image by image, on the final verdict.</p>"
            f'<div class="scroll">{metrics_table(columns, COMPARISON_ROWS)}</div>'
            + _figure("changes-runs", change_grid_figure({r: m["verdict_change"] for r, m in runs.items()}),
                      "Expert vs final verdict per run, on the common images.")
            + "</section>")


def product_section(result: ProductResult, train: tuple[list[float], str] | None,
                    cfg: StorageConfig | None = None) -> str:
    m, pid = result.metrics, slug(result.product)
    source = (f"training scores: {len(train[0])} from {train[1]}" if train
              else "training scores: not available (no --model-store, or no artifact with scores)")
    return (f'<details class="product" id="product-{pid}"><summary><h2>{esc(result.product)}</h2>'
            f'<span class="muted">{one_line(m)}</span></summary><p>{esc(headline(m))}</p><div class="row">'
            + _figure(f"hist-{pid}", score_histogram(result, train),
                      f"Score histograms (density); axis clipped at outliers, which are marked ▶ and counted; {source}")
            + _figure(f"roc-{pid}", roc_figure({result.product: _labels_scores(result)}, f"{result.product}: ROC"),
                      "Image ROC of the expert score")
            + f"</div>{verdict_tables(m, result.product)}{mllm_table({result.product: m})}"
              f"{routing_table(m['routing'], f'Routing: the expert errors in front of the MLLM, {result.product}')}"
              f'<div id="gallery-{pid}"><h3>Examples</h3><p class="note">{esc(CARD_NOTE)}</p>{gallery(result, cfg)}'
              f'</div><details id="metrics-{pid}"><summary>All metrics</summary>'
              f"{metrics_table({result.product: m})}</details></details>")


def _chosen(how: str) -> str:
    return "" if how == "given" else f" ({esc(how)})"


def render(evaluation: Evaluation, train: TrainScores, cfg: StorageConfig | None = None) -> str:
    """The whole report page."""
    line, tone = verdict(evaluation.overall)
    header = (f'<h1 class="verdict {tone}" id="verdict">{esc(line)}</h1><p class="kicker">EAGLE audit evaluation · '
              f"run <b>{esc(evaluation.run_id)}</b>{_chosen(evaluation.chosen_as)} · output "
              f"{esc(evaluation.output_uri)} · data {esc(evaluation.data_root)} · generated "
              f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC</p>{parse_alarm(evaluation)}{coverage(evaluation.overall)}"
              f'<div class="scroll" id="provenance">'
              f"{provenance_table(evaluation.provenance, evaluation.run_id, evaluation.chosen_as)}</div>")
    sections = [summary_section(evaluation, cfg)]
    if evaluation.comparison:
        sections.append(comparison_section(evaluation.comparison))
    sections += [product_section(r, train.get(p), cfg) for p, r in sorted(evaluation.products.items())]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>EAGLE evaluation {esc(evaluation.run_id)}</title>'
            f"<style>{CSS}</style></head><body>{header}{contents(evaluation)}{''.join(sections)}</body></html>")


def write_outputs(evaluation: Evaluation, out: str, train: TrainScores,
                  cfg: StorageConfig | None = None) -> tuple[str, str]:
    """Write ``metrics.json`` and ``report.html`` under `out` (local or s3://); returns their URIs."""
    metrics_uri, report_uri = storage.join(out, "metrics.json"), storage.join(out, "report.html")
    storage.write_bytes(metrics_uri, json.dumps(evaluation.to_json(), indent=2, allow_nan=False).encode(), cfg)
    storage.write_bytes(report_uri, render(evaluation, train, cfg).encode(), cfg)
    return metrics_uri, report_uri
