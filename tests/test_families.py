"""Per-family image-token layouts against the processors themselves: tiles show the parts of the image the
layout says, and the runner's attention share follows attention mass on each family's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eagle.config import load_config
from eagle.findings import Box
from eagle.mllm import guidance as g
from eagle.mllm.families import FAMILIES, family_for, layout_coverage
from eagle.mllm.runner import MLLMRequest, MLLMRunner
from eagle.testing import tiny_mllm as tiny

TINY = ["mllm.dtype=float32", "mllm.min_pixels=3136", "mllm.max_pixels=50176"]


def test_every_tiny_family_has_a_layout_and_unknown_ones_are_refused() -> None:
    assert set(tiny.FAMILIES) <= set(FAMILIES)
    with pytest.raises(ValueError, match="not supported"):
        family_for("llama")


def test_internvl_tiles_show_the_parts_of_the_image_the_layout_says(tiny_mllm) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_mllm("internvl"))
    assert not processor.image_processor.crop_to_patches  # off here, on by the processor's default kwargs
    image = np.zeros((200, 90, 3), np.uint8)
    image[:50] = 255  # the top quarter is white
    batch = processor(text=["<IMG_CONTEXT>"], images=[image], return_tensors="pt")
    layout = FAMILIES["internvl"].layouts(processor, batch, [(200, 90)])[0]
    tiles = batch["pixel_values"]  # (tiles, 3, h, w), normalised
    assert len(tiles) == len(layout) == 3  # two tiles (top, bottom) and the thumbnail
    ip = processor.image_processor
    pixels = tiles * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    white = (pixels.mean(dim=1) > 0.5).float().mean(dim=(1, 2))
    region = (image[..., 0] > 0).astype(np.float32)
    expected = [float(np.mean(layout_coverage(region, [piece]))) for piece in layout]
    np.testing.assert_allclose(expected, [0.5, 0.0, 0.25], atol=0.02)
    np.testing.assert_allclose(white.numpy(), expected, atol=0.05)


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def runner(request: pytest.FixtureRequest, tiny_mllm) -> MLLMRunner:
    cfg = load_config(overrides=[*TINY, f"mllm.model={tiny_mllm(request.param)}"])
    return MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance)


def test_attention_share_follows_the_mass_on_each_familys_layout(runner: MLLMRunner) -> None:
    rng = np.random.default_rng(3)
    req = MLLMRequest(rng.integers(0, 255, (112, 140, 3), dtype=np.uint8), "bolt", "anomalous", "uncertain",
                      [Box(10, 10, 60, 70, 1.0)])
    enc = runner.encode([runner.prompt(req)])
    start, end = enc.image_spans[0]
    cover = g.region_coverage((112, 140), enc.layouts[0], req.boxes)
    assert cover is not None and cover.size == end - start
    placed = ~np.isnan(cover)
    inside, outside = np.flatnonzero(placed & (cover > 0.5)), np.flatnonzero(placed & (cover == 0))
    assert inside.size and outside.size

    def share(hot: np.ndarray) -> float:
        attention = torch.full((1, 2, enc.inputs["input_ids"].shape[1]), 1e-3)  # (batch, heads, kv)
        attention[0, :, start + torch.from_numpy(hot)] = 1.0
        ctx = g.GuidanceContext(layers=frozenset(), column_bias=None, records={0: [attention]})
        return runner.attention_shares(enc, ctx, [req])[0]

    # the hot tokens are each more than half inside the box, or not at all
    assert 0.5 < share(inside) <= 1.0 and 0.0 <= share(outside) < 0.1
