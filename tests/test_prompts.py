"""Prompt building: expert prior, the boxed copy where the expert put the boxes, references, baseline mode."""

from __future__ import annotations

import numpy as np

from eagle.config import PromptConfig
from eagle.findings import Box
from eagle.mllm.prompts import box_thickness, build_prompt, draw_boxes


def _image(h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 200, (h, w, 3), dtype=np.uint8)  # never pure red by chance (R <= 199)


def _user_text(prompt) -> str:
    return "".join(p.get("text", "<img>") for p in prompt.messages[-1]["content"])


def _is_red(px: np.ndarray) -> bool:
    return tuple(int(v) for v in px) == (255, 0, 0)


def test_anomalous_prompt_has_query_and_boxed_copy_with_red_boxes_at_the_expert_boxes() -> None:
    image = _image()
    boxes = [Box(20, 30, 70, 90, 0.9), Box(100, 10, 150, 40, 0.5)]
    prompt = build_prompt(PromptConfig(), image, "bolt", "anomalous", boxes)

    assert len(prompt.images) == 2 and prompt.query_index == 0
    assert prompt.images[0] is image  # the query image itself, untouched
    text = _user_text(prompt)
    assert text.index("predicted as anomalous") < text.index("<img>")
    assert "red boxes" in text.split("<img>")[-1]
    assert text.rstrip().endswith(PromptConfig().answer_format)
    assert prompt.prior == PromptConfig().prior_anomalous

    boxed = prompt.images[1]
    changed = np.any(boxed != image, axis=2)
    assert all(_is_red(boxed[y, x]) for y, x in zip(*np.nonzero(changed), strict=True))
    t = box_thickness(*image.shape[:2])
    for b in boxes:  # every edge of every box is red, just inside the box
        assert _is_red(boxed[b.y1, (b.x1 + b.x2) // 2]) and _is_red(boxed[b.y2 - 1, (b.x1 + b.x2) // 2])
        assert _is_red(boxed[(b.y1 + b.y2) // 2, b.x1]) and _is_red(boxed[(b.y1 + b.y2) // 2, b.x2 - 1])
        assert not changed[(b.y1 + b.y2) // 2, (b.x1 + b.x2) // 2]  # the inside stays visible
    # nothing red outside the boxes' borders
    inside = np.zeros_like(changed)
    for b in boxes:
        inside[max(b.y1 - t, 0):b.y2 + t, max(b.x1 - t, 0):b.x2 + t] = True
    assert not (changed & ~inside).any()


def test_normal_prompt_has_one_image_and_the_normal_prior() -> None:
    prompt = build_prompt(PromptConfig(), _image(), "bolt", "normal", [Box(1, 1, 5, 5, 0.1)])
    assert len(prompt.images) == 1
    assert prompt.prior == PromptConfig().prior_normal and "predicted as normal" in _user_text(prompt)
    assert "red boxes" not in _user_text(prompt)


def test_a_borderline_normal_verdict_says_borderline_and_shows_the_highest_regions() -> None:
    image, boxes = _image(), [Box(5, 5, 30, 30, 0.4)]
    prompt = build_prompt(PromptConfig(), image, "bolt", "normal", boxes, confidence="uncertain")
    text = _user_text(prompt)
    assert prompt.prior == PromptConfig().prior_borderline and "borderline" in text and "predicted as normal" not in text
    assert len(prompt.images) == 2 and prompt.query_index == 0
    assert np.array_equal(prompt.images[1], draw_boxes(image, boxes))
    assert PromptConfig().boxes_note_borderline in text and PromptConfig().boxes_note not in text
    # a confident normal verdict keeps the plain prompt, and baseline mode shows neither prior nor boxes
    plain = build_prompt(PromptConfig(), image, "bolt", "normal", boxes, confidence="confident_normal")
    assert plain.prior == PromptConfig().prior_normal and len(plain.images) == 1
    baseline = build_prompt(PromptConfig(use_expert=False), image, "bolt", "normal", boxes, confidence="uncertain")
    assert baseline.prior is None and len(baseline.images) == 1


def test_baseline_mode_asks_the_same_question_with_the_plain_image() -> None:
    cfg = PromptConfig(use_expert=False)
    guided = build_prompt(PromptConfig(), _image(), "bolt", "anomalous", [Box(5, 5, 30, 30, 1.0)])
    plain = build_prompt(cfg, _image(), "bolt", "anomalous", [Box(5, 5, 30, 30, 1.0)])
    assert len(plain.images) == 1 and plain.prior is None
    assert "predicted" not in _user_text(plain)
    assert _user_text(plain).endswith(f"{cfg.question} {cfg.answer_format}")
    assert _user_text(guided).endswith(f"{cfg.question} {cfg.answer_format}")


def test_references_notes_and_templates_come_from_config() -> None:
    refs = [_image(60, 60), _image(64, 64), _image(70, 70)]
    cfg = PromptConfig(few_shot=2, notes={"bolt": "Thread damage matters most."},
                       instruction="Check this {product}.", system="")
    prompt = build_prompt(cfg, _image(), "bolt", "normal", [], refs)
    assert len(prompt.images) == 3 and prompt.query_index == 2
    assert prompt.images[:2] == refs[:2]
    text = _user_text(prompt)
    assert text.startswith("Check this bolt.\nNotes on this product: Thread damage matters most.")
    assert text.index("normal bolt samples") < text.index("<img>")
    assert [m["role"] for m in prompt.messages] == ["user"]  # an empty system prompt is left out
    other = build_prompt(cfg, _image(), "nut", "normal", [], refs)
    assert "Thread damage" not in _user_text(other)
