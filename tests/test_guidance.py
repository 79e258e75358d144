"""Attention guidance on every tiny random family (Qwen2.5-VL, Qwen3-VL, InternVL3, LLaVA-OneVision): equal to stock sdpa at bias 0, the softmax algebra
of the bias in prefill and decode, per-sample spans under left padding, no state left behind; diagnostics."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from eagle.config import load_config
from eagle.findings import Box
from eagle.mllm import guidance as g
from eagle.mllm.families import Piece
from eagle.mllm.runner import Encoded, MLLMRequest, MLLMRunner
from eagle.testing.tiny_mllm import FAMILIES

TINY_OVERRIDES = ["mllm.dtype=float32", "mllm.min_pixels=3136", "mllm.max_pixels=50176", "mllm.max_new_tokens=4"]
DEVICE = os.environ.get("EAGLE_TEST_DEVICE", "cpu")  # "cuda" runs the same checks on a GPU machine


# ---------------------------------------------------------------------------------------------- pure helpers
def test_middle_band_scales_the_papers_layers_9_to_14_of_28() -> None:
    assert g.middle_band(28) == tuple(range(9, 15))
    assert g.middle_band(8) == (3, 4)
    assert g.middle_band(1) == (0,)
    assert g.resolve_layers(8, [5, 2, 5]) == (2, 5)
    with pytest.raises(ValueError, match="out of range"):
        g.resolve_layers(8, [8])


def test_token_runs_and_char_spans() -> None:
    assert g.token_runs([0, 7, 7, 1, 7, 2, 7, 7], 7) == [(1, 3), (4, 5), (6, 8)]
    offsets = [(0, 0), (0, 0), (0, 3), (3, 7), (7, 8), (8, 12)]  # two pad tokens first
    assert g.char_span_tokens(offsets, (3, 8)) == (3, 5)
    assert g.char_span_tokens(offsets, (20, 30)) is None


def test_image_attention_share_on_a_constructed_case() -> None:
    # 100x100 image, 4x4 token grid (25 px cells); the region is the top-left 2x2 cells.
    grid = [Piece(4, 4)]
    cover = g.region_coverage((100, 100), grid, boxes=[Box(0, 0, 50, 50, 1.0)])
    assert cover is not None and cover.reshape(4, 4)[:2, :2].min() == 1.0 and cover.sum() == 4.0
    mask = np.zeros((20, 20), bool)
    mask[:10, :10] = True  # the same region as a low-resolution mask
    np.testing.assert_allclose(g.region_coverage((100, 100), grid, mask=mask), cover)
    half = g.region_coverage((100, 100), grid, boxes=[Box(0, 0, 25, 12, 1.0)])
    assert half[0] == pytest.approx(12 / 25) and half.sum() == pytest.approx(12 / 25)
    assert g.region_coverage((100, 100), grid) is None

    # kv = 3 text tokens + 16 image tokens + 1 text token; 2 heads
    attention = torch.zeros(2, 20)
    attention[:, 0] = 0.4  # text attention never counts
    attention[0, 3 + 0] = 0.3  # cell (0, 0): inside
    attention[1, 3 + 5] = 0.1  # cell (1, 1): inside
    attention[0, 3 + 15] = 0.2  # cell (3, 3): outside
    share = g.region_share(attention, (3, 19), cover)
    assert share == pytest.approx((0.3 + 0.1) / (0.3 + 0.1 + 0.2))
    assert g.region_share(attention, (3, 19), half) == pytest.approx(0.3 * 12 / 25 / 0.6)
    with pytest.raises(ValueError, match="layout"):
        g.region_share(attention, (3, 18), cover)


def test_coverage_follows_tiles_thumbnails_and_newline_tokens() -> None:
    # InternVL3-style: the image cut into 1 row x 2 column tiles of 2x2 tokens, then a 2x2 thumbnail.
    tiles = [Piece(2, 2, (0, 0, 1, 0.5)), Piece(2, 2, (0, 0.5, 1, 1)), Piece(2, 2)]
    cover = g.region_coverage((40, 80), tiles, boxes=[Box(40, 0, 80, 20, 1.0)])  # top half of the right tile
    np.testing.assert_allclose(cover, [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0])
    attention = torch.zeros(12)
    attention[[4, 5]] = 0.3  # the mass sits in the region in the right tile...
    attention[[0, 11]] = 0.1  # ...and a little outside it (left tile, thumbnail)
    assert g.region_share(attention, (0, 12), cover) == pytest.approx(0.6 / 0.8)

    # LLaVA-OneVision-style: a 2x2 base grid, then a 2x3 grid with a newline token after each row.
    layout = [Piece(2, 2), Piece(2, 3, newline=True)]
    cover = g.region_coverage((60, 90), layout, boxes=[Box(0, 0, 30, 30, 1.0)])  # top-left 30x30
    assert sum(p.tokens for p in layout) == cover.size == 12
    np.testing.assert_allclose(cover[:4], [30 * 30 / (30 * 45), 0, 0, 0])
    np.testing.assert_allclose(cover[4:], [1, 0, 0, np.nan, 0, 0, 0, np.nan])
    attention = torch.zeros(12)
    attention[[7, 11]] = 5.0  # newline tokens: neither inside nor in the total
    attention[4], attention[5] = 0.2, 0.2
    assert g.region_share(attention, (0, 12), cover) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- tiny models
@dataclass
class Bundle:
    runner: MLLMRunner
    stock: torch.nn.Module  # same weights, transformers' own sdpa
    eager: torch.nn.Module  # same weights, eager attention (returns attention weights)
    enc: Encoded
    num_layers: int


def _requests() -> list[MLLMRequest]:
    rng = np.random.default_rng(1)
    shapes = [(112, 140), (200, 90), (84, 84)]  # different token counts: different spans and left padding
    return [MLLMRequest(rng.integers(0, 255, (*s, 3), dtype=np.uint8), "bolt", "anomalous", "uncertain",
                        [Box(5, 5, 40, 40, 1.0)]) for s in shapes]


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request: pytest.FixtureRequest, tiny_mllm) -> Bundle:
    from transformers import AutoModelForImageTextToText

    path = tiny_mllm(request.param)
    cfg = load_config(overrides=[*TINY_OVERRIDES, f"mllm.model={path}"])
    runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=DEVICE)
    stock, eager = (AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
                    .to(DEVICE).eval() for impl in ("sdpa", "eager"))
    enc = runner.encode([runner.prompt(r) for r in _requests()])
    assert enc.inputs["attention_mask"].min() == 0  # the batch really is left-padded
    return Bundle(runner, stock, eager, enc, runner.model.config.get_text_config().num_hidden_layers)


def _context(b: Bundle, layers, biases, rows="last", record_decode=False, prior=0.0) -> g.GuidanceContext:
    length = b.enc.inputs["input_ids"].shape[1]
    bias = g.column_bias(length, b.enc.image_spans, b.enc.prior_spans, biases, [prior] * len(biases))
    return g.GuidanceContext(layers=frozenset(layers), column_bias=bias, rows=rows,
                             record_layers=frozenset(range(b.num_layers)), record_decode=record_decode)


@torch.inference_mode()
def _logits(model, b: Bundle) -> torch.Tensor:
    """Logits at the real (non-padding) positions; padding rows attend to nothing and carry no meaning."""
    return model(**b.enc.inputs).logits[b.enc.inputs["attention_mask"].bool()]


@pytest.mark.parametrize("rows", ["last", "all"])
def test_bias_zero_equals_stock_attention_and_the_recorded_rows_equal_eager_weights(bundle: Bundle, rows) -> None:
    stock = _logits(bundle.stock, bundle)
    assert g.active() is None
    torch.testing.assert_close(_logits(bundle.runner.model, bundle), stock, atol=1e-5, rtol=0)
    ctx = _context(bundle, range(bundle.num_layers), [0.0, 0.0, 0.0], rows=rows, prior=-0.0)
    with g.guidance(ctx):
        guided = _logits(bundle.runner.model, bundle)
    torch.testing.assert_close(guided, stock, atol=1e-5, rtol=0)
    assert sorted(ctx.records) == list(range(bundle.num_layers))  # the augmented path ran in every layer

    eager = bundle.eager(**bundle.enc.inputs, output_attentions=True).attentions
    for layer, probs in ctx.prefill_attention().items():
        torch.testing.assert_close(probs, eager[layer][:, :, -1, :].float().cpu(), atol=1e-5, rtol=0)


def _mass(probs: torch.Tensor, spans) -> torch.Tensor:
    """(B, heads) attention mass on each sample's query-image span."""
    return torch.stack([probs[i, :, s:e].sum(dim=-1) for i, (s, e) in enumerate(spans)])


@pytest.mark.parametrize("rows", ["last", "all"])
def test_bias_raises_image_attention_as_the_softmax_algebra_predicts(bundle: Bundle, rows) -> None:
    layer, bias = bundle.num_layers // 2, 1.5
    biases = [bias, 0.0, bias]  # the middle sample is not guided
    forced = bundle.runner.processor.tokenizer(" the")["input_ids"][0]

    def run(ctx: g.GuidanceContext) -> g.GuidanceContext:
        with g.guidance(ctx), torch.inference_mode():  # force the same tokens so decode steps see equal inputs
            bundle.runner.model.generate(**bundle.enc.inputs, max_new_tokens=3, do_sample=False,
                                         prefix_allowed_tokens_fn=lambda *_: [forced])
        return ctx

    base = run(_context(bundle, [layer], [0.0, 0.0, 0.0], rows=rows, record_decode=True))
    guided = run(_context(bundle, [layer], biases, rows=rows, record_decode=True))
    spans = bundle.enc.image_spans
    assert len(guided.records[layer]) == 3  # prefill and two decode steps with the KV cache
    for step in range(3):
        for earlier in range(layer):  # layers before the guided one see identical inputs
            torch.testing.assert_close(guided.records[earlier][step], base.records[earlier][step], atol=1e-6, rtol=0)
        m, m_new = _mass(base.records[layer][step], spans), _mass(guided.records[layer][step], spans)
        e = torch.tensor([math.exp(x) for x in biases])[:, None]
        expected = m * e / (m * e + 1 - m)
        torch.testing.assert_close(m_new, expected, atol=1e-5, rtol=0)
        assert (m_new[[0, 2]] > m[[0, 2]] + 1e-4).all()
        # sdpa got the bias: the guided samples' next layer changes, the unguided sample's does not
        after_new, after = guided.records[layer + 1][step], base.records[layer + 1][step]
        assert (after_new[[0, 2]] - after[[0, 2]]).abs().max() > 1e-5
        torch.testing.assert_close(after_new[1], after[1], atol=1e-6, rtol=0)


def test_prior_bias_lowers_attention_on_the_text_prior(bundle: Bundle) -> None:
    layer = bundle.num_layers // 2
    spans = bundle.enc.prior_spans
    assert all(s is not None and s[1] - s[0] >= 3 for s in spans)
    base = _context(bundle, [layer], [0.0] * 3)
    lowered = _context(bundle, [layer], [0.0] * 3, prior=-2.0)
    for ctx in (base, lowered):
        with g.guidance(ctx):
            _logits(bundle.runner.model, bundle)
    m, m_new = _mass(base.records[layer][0], spans), _mass(lowered.records[layer][0], spans)
    e = math.exp(-2.0)
    torch.testing.assert_close(m_new, m * e / (m * e + 1 - m), atol=1e-5, rtol=0)


def test_guidance_stays_in_its_context_and_thread(bundle: Bundle) -> None:
    stock = _logits(bundle.stock, bundle)
    model = bundle.runner.model
    with g.guidance(_context(bundle, range(bundle.num_layers), [4.0] * 3, rows="all")):
        assert (_logits(model, bundle) - stock).abs().max() > 1e-3  # guidance is on here...
        with ThreadPoolExecutor(1) as pool:  # ...but not in another thread meanwhile
            other = pool.submit(lambda: _logits(model, bundle)).result()
        torch.testing.assert_close(other, stock, atol=1e-5, rtol=0)
    assert g.active() is None
    torch.testing.assert_close(_logits(model, bundle), stock, atol=1e-5, rtol=0)
