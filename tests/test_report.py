"""The report as people get it: a 15-product sample (eagle.testing.report_sample) with three runs compared stays
under 5 MB with at most 12 cards a product, its first line is the verdict, provenance and coverage sit at the top,
the errors the MLLM introduced have a gallery, every gallery says how many it shows, a low parse rate is a loud
warning with the raw replies, its cards wrap long text, histograms keep outliers off the axis, and headless
Chromium (skipped where /usr/bin/chromium is absent) loads it at 1280 and 800 px without console errors, text
overflowing a card, or the key columns behind a scroll."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from eagle.evaluation import cards
from eagle.evaluation.figures import histogram_range
from eagle.evaluation.ground_truth import Truth
from eagle.evaluation.report import CSS, write_outputs
from eagle.evaluation.scorecard import evaluate
from eagle.testing import browser
from eagle.testing.report_sample import MVTEC_PRODUCTS, RUNS, Run, build_sample

MAX_BYTES = 5_000_000
CARDS_PER_PRODUCT = 12


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    data, audit = build_sample(str(out), MVTEC_PRODUCTS, size=512)
    result = evaluate(audit, data, RUNS[0].run_id, compare=[r.run_id for r in RUNS[1:]])
    write_outputs(result, str(out / "eval"), {})
    return out / "eval" / "report.html"


def test_fifteen_products_with_twelve_jpeg_cards_each_stay_under_5_mb(report):
    html = report.read_text()
    assert len(MVTEC_PRODUCTS) == 15
    shown = [(int(n), int(m)) for n, m in re.findall(r'<span class="count">\((\d+) of (\d+) shown\)</span>', html)]
    assert len(shown) == 15 * len(cards.QUOTAS) + 1  # every gallery says how many it shows (+ the summary's)
    assert all(n <= m for n, m in shown) and any(n < m for n, m in shown)
    assert html.count('<article class="card"') == sum(n for n, _ in shown) <= 15 * CARDS_PER_PRODUCT + 4
    articles = re.findall(r'<article class="card".*?</article>', html, re.S)
    pictures = [src for card in articles for src in re.findall(r'src="(data:image/[a-z]+);', card)]
    assert pictures and set(pictures) == {"data:image/jpeg"}
    assert report.stat().st_size < MAX_BYTES, f"{report.stat().st_size / 1e6:.2f} MB"


def test_sections_come_in_reading_order(report):
    html = report.read_text()
    order = [html.index(f'id="{ident}"') for ident in ("verdict", "coverage", "provenance", "contents", "summary",
                                                       "key-figures", "introduced", "changes-overall", "comparison",
                                                       "product-bottle", "product-zipper")]
    assert order == sorted(order)
    assert html.count('<details class="product"') == 15 and "<script" not in html
    assert "all products (pooled)" in html and "mean over products" in html


def test_the_first_line_is_the_verdict_and_provenance_and_coverage_follow(report):
    html = report.read_text()
    first = re.search(r'<body><h1 class="verdict (?:good|bad|)" id="verdict">(.*?)</h1>', html)[1]
    metrics = json.loads((report.parent / "metrics.json").read_text())
    o = metrics["overall"]
    fixed, introduced = o["verdict_change"]["fixed"], o["verdict_change"]["introduced"]
    assert f"net {fixed - introduced:+d} errors (fixed {fixed}, introduced {introduced})" in first
    acc, f1 = (f"{o['expert'][k]:.3f} → {o['final'][k]:.3f}" for k in ("accuracy", "f1"))
    assert f"accuracy {acc}" in first and f"F1 {f1}" in first and " ms" in first and "calls" in first
    coverage = re.search(r'id="coverage">(.*?)</p>', html)[1]
    assert "2 rows without ground truth" in coverage and "1 test image without a row" in coverage
    assert o["n_unmatched"] == 2 and o["n_missing"] == 1
    provenance = re.search(r'id="provenance">(.*?)</div>', html, re.S)[1]
    for run in RUNS:  # every run evaluated: routing, MLLM, guidance, config hash
        row = re.search(rf"<tr><th>{run.run_id}[^<]*</th>(.*?)</tr>", provenance)[1]
        assert f">{run.policy}<" in row and "sample-mllm" in row and f'>{"on" if run.guided else "off"}<' in row
        assert f"cfg-{run.run_id}" in row and ">qwen2_5_vl<" in row and ">run manifest<" in row
    assert metrics["provenance"][RUNS[0].run_id]["routing"] == "uncertain"


def test_the_introduced_errors_have_a_gallery_with_the_mllms_words(report):
    html = report.read_text()
    block = html[html.index('id="introduced"'):html.index('id="changes-overall"')]
    assert re.search(r"Errors the MLLM introduced <span class=\"count\">\(\d+ of \d+ shown\)", block)
    cards_there = re.findall(r'<article class="card".*?</article>', block, re.S)
    assert cards_there and all("expert right" in c and "final wrong" in c and "MLLM reply:" in c
                               for c in cards_there)


def test_a_low_parse_rate_is_a_loud_warning_with_raw_replies(tmp_path):
    garbled = Run("garbled", "all", False, 0.8, 0.9)
    data, audit = build_sample(str(tmp_path), MVTEC_PRODUCTS[:2], size=96, n_good=6, n_defect=2, runs=(garbled,))
    result = evaluate(audit, data, "garbled")
    _, report_uri = write_outputs(result, str(tmp_path / "eval"), {})
    html = Path(report_uri).read_text()
    alarm = re.search(r'<div class="alarm" id="parse-alarm">(.*?)</div>', html, re.S)[1]
    assert "low parse rate" in alarm and "<q>" in alarm and "did not say yes or no" in alarm
    assert html.index('id="parse-alarm"') < html.index('id="coverage"')
    assert "MLLM raw reply:" in html  # on the cards of unparsed replies
    _, clean_uri = write_outputs(evaluate(*build_sample(str(tmp_path / "ok"), MVTEC_PRODUCTS[:1], size=96, n_good=6,
                                                        n_defect=2, runs=RUNS[:1])[::-1], "uncertain-guided"),
                                 str(tmp_path / "ok-eval"), {})
    assert 'id="parse-alarm"' not in Path(clean_uri).read_text()


def css_block(selector: str) -> str:
    return re.search(re.escape(selector) + r"\s*\{([^}]*)\}", CSS)[1]


def test_cards_wrap_long_words_and_print_whole():
    card = css_block(".card")
    for rule in ("overflow-wrap: anywhere", "word-break: break-word", "min-width: 0", "break-inside: avoid"):
        assert rule in card, rule
    assert "minmax(0, 1fr)" in css_block(".card dl")  # the value column may shrink below its longest word
    print_rules = CSS[CSS.index("@media print"):]
    assert ".lightbox" in print_rules and "break-inside: avoid" in print_rules


def test_histogram_range_clips_far_outliers_only():
    values = np.arange(1.0, 10.0)
    # 100 lies above both the 99th percentile (91.81) and Q3 + 3·IQR (7.75 + 13.5): the axis ends at 9.
    assert histogram_range(np.append(values, 100.0), [5.5]) == (1.0, 9.0)
    # ... but never before a mark (threshold, score_max): 50 stays visible, and the axis still halves.
    assert histogram_range(np.append(values, 100.0), [50.0]) == (1.0, 50.0)
    # 13 is within the fence: nothing is clipped; a mark beyond the values extends the axis.
    assert histogram_range(np.append(values, 13.0), [5.5]) == (1.0, 13.0)
    assert histogram_range(values, [12.0, 0.5]) == (0.5, 12.0)
    assert histogram_range(np.array([0.3]), [0.3]) == pytest.approx((-0.2, 0.8))  # one value: a unit-wide axis


chromium = pytest.mark.skipif(not browser.available(), reason=f"{browser.CHROMIUM} absent (apt-get install chromium)")


@chromium
@pytest.mark.parametrize("width", [1280, 800])
def test_report_in_chromium_answers_first_without_errors_overflow_or_hidden_key_columns(report, width):
    html = report.read_text()
    result = browser.check_page(html, width)
    assert result["width"] == width
    assert result["cards"] == html.count('<article class="card"')
    assert result["errors"] == [] and result["broken"] == []
    assert result["overflow"] == []
    assert result["pageOverflow"] <= 0
    assert result["firstLine"].startswith("Verdict: ") and "accuracy" in result["firstLine"]
    top = result["top"]
    assert top["verdict"] < top["coverage"] < top["provenance"] < top["key-figures"] < top["introduced"]
    assert top["provenance"] < 800  # on the first screen
    assert [k["label"] for k in result["keyColumns"]] == ["fixed", "introduced", "MLLM ms / image"]
    assert all(k["visible"] for k in result["keyColumns"]), result["keyColumns"]


@chromium
def test_the_overflow_check_catches_unwrapped_text(report):
    unwrapped = report.read_text().replace("overflow-wrap: anywhere; word-break: break-word;", "")
    found = browser.check_page(unwrapped)["overflow"]
    assert any("plant_a_historian" in f for f in found)  # the sample's long unbroken words


def test_a_card_of_pure_noise_stays_within_its_byte_budget(tmp_path):
    """Busy textures cost JPEG the most; the budget holds even for noise at 1024 px."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    mask = np.zeros((1024, 1024), np.uint8)
    mask[400:600, 500:520] = 255
    cv2.imwrite(str(tmp_path / "000.png"), noise)
    cv2.imwrite(str(tmp_path / "000_mask.png"), mask)
    heat = cv2.GaussianBlur(rng.random((256, 256)).astype(np.float32), (0, 0), 4)
    row = dict(image_uri=str(tmp_path / "000.png"), width=1024, height=1024, expert_score=0.9, threshold=0.5,
               confidence="confident_anomalous", expert_verdict="anomalous", verdict="anomalous", mllm_ran=True,
               guided=True, answer="yes", explanation="A scratch.", boxes=[dict(x1=490, y1=390, x2=530, y2=610)],
               anomaly_map_png=cv2.imencode(".png", (heat / heat.max() * 255).astype(np.uint8))[1].tobytes(),
               map_max=0.9, mask_png=cv2.imencode(".png", cv2.resize(mask, (256, 256)))[1].tobytes())
    html = cards.card(row, Truth("p/test/scratch/000.png", "p", "scratch", str(tmp_path / "000_mask.png")), "x", 1.0)
    sources = re.findall(r'src="data:image/jpeg;base64,([^"]*)"', html)
    sizes = [len(base64.b64decode(s)) for s in sources]
    assert len(sizes) == 3 and sizes[0] <= cards.IMAGE_BYTES and sizes[1] <= cards.MAP_BYTES
    assert sizes[2] <= cards.CROP_BYTES
    budget = 4 / 3 * (cards.IMAGE_BYTES + cards.MAP_BYTES + cards.CROP_BYTES)
    assert len(html) < budget + 2_000
    assert 15 * CARDS_PER_PRODUCT * (budget + 2_000) < MAX_BYTES - 500_000  # room for the plots and tables


def test_the_verdict_says_when_accuracy_and_f1_disagree():
    from eagle.evaluation.report import verdict

    def m(fixed, introduced, acc, f1):
        return {"n_images": 10, "verdict_change": {"fixed": fixed, "introduced": introduced},
                "expert": {"accuracy": acc[0], "f1": f1[0]}, "final": {"accuracy": acc[1], "f1": f1[1]},
                "mllm": {"calls": 4, "calls_per_image": 0.4, "ms_per_image": 300.0}}

    line, tone = verdict(m(4, 6, (0.594, 0.531), (0.519, 0.571)))  # the run: F1 up, accuracy down
    assert line.startswith("Verdict: mixed, accuracy fell but F1 rose: net -2 errors (fixed 4, introduced 6)")
    assert "accuracy 0.594 → 0.531 · F1 0.519 → 0.571 · MLLM cost per image: 0.400 calls, 300 ms" in line
    assert tone == ""
    assert verdict(m(3, 1, (0.5, 0.7), (0.5, 0.6))) == (verdict(m(3, 1, (0.5, 0.7), (0.5, 0.6)))[0], "good")
    assert verdict(m(1, 3, (0.7, 0.5), (0.6, 0.5)))[0].startswith("Verdict: the MLLM made it worse: net -2")
    assert verdict(m(0, 0, (0.7, 0.7), (0.6, 0.6)) | {"mllm": {"calls": 0}})[0].startswith(
        "The MLLM was not asked")
