"""The report as people get it: a 15-product sample (eagle.testing.report_sample) with three runs compared stays
under 5 MB with 12 cards a product, its cards wrap long text, histograms keep outliers off the axis, and headless
Chromium (skipped where /usr/bin/chromium is absent) loads it without console errors or text overflowing a card."""

from __future__ import annotations

import base64
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
from eagle.testing.report_sample import MVTEC_PRODUCTS, RUNS, build_sample

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
    assert html.count('<article class="card"') == 15 * CARDS_PER_PRODUCT
    cards = re.findall(r'<article class="card".*?</article>', html, re.S)
    pictures = [src for card in cards for src in re.findall(r'src="(data:image/[a-z]+);', card)]
    assert pictures and set(pictures) == {"data:image/jpeg"}
    assert report.stat().st_size < MAX_BYTES, f"{report.stat().st_size / 1e6:.2f} MB"


def test_sections_come_in_reading_order(report):
    html = report.read_text()
    order = [html.index(f'id="{ident}"') for ident in ("contents", "summary", "key-figures", "changes-overall",
                                                       "comparison", "product-bottle", "product-zipper")]
    assert order == sorted(order)
    assert html.count('<details class="product"') == 15 and "<script" not in html
    assert "all products (pooled)" in html and "mean over products" in html


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
def test_report_in_chromium_has_no_console_errors_and_no_card_overflow(report):
    result = browser.check_page(report.read_text())
    assert result["cards"] == 15 * CARDS_PER_PRODUCT
    assert result["errors"] == [] and result["broken"] == []
    assert result["overflow"] == []
    assert result["pageOverflow"] <= 0


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
