"""Prompts for the MLLM from the expert's result (EAGLE's prompt selection); templates live in PromptConfig.

User turn, in order: instruction (+ product notes), optional normal reference images, the text prior
("The query image is predicted as ...", or "... is borderline" for a normal verdict in the unsure band), the
query image, when anomalous or borderline a second copy with red boxes (the anomalous or the highest-scoring
regions) and a note saying so, then the question and the required answer format. In baseline mode
(`use_expert=False`) the prior and the boxed copy are left out, so the two modes differ only in the expert's guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from eagle.config import PromptConfig
from eagle.findings import Box, Confidence, Verdict

BOX_COLOR = (255, 0, 0)  # RGB red


@dataclass(frozen=True)
class Prompt:
    """A chat prompt with image placeholders, the images in order of appearance, and where the evidence is."""

    messages: list[dict[str, Any]]
    images: list[np.ndarray]
    query_index: int  # position of the query image in `images`
    prior: str | None  # the text-prior sentence as it appears in the prompt; None in baseline mode


def box_thickness(height: int, width: int) -> int:
    """Line width that stays visible after the vision encoder's resize (~1% of the shorter side)."""
    return max(2, round(min(height, width) / 100))


def draw_boxes(image: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """A copy of the RGB image with a red rectangle along the edges of each box (x2/y2 exclusive)."""
    out = np.ascontiguousarray(image.copy())
    thickness = box_thickness(*image.shape[:2])
    for b in boxes:
        cv2.rectangle(out, (int(b.x1), int(b.y1)), (int(b.x2) - 1, int(b.y2) - 1), BOX_COLOR, thickness)
    return out


def _text(parts: list[dict[str, Any]], text: str) -> None:
    """Append text, merging with a preceding text item (the chat templates concatenate items as they are)."""
    if not text:
        return
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] += "\n" + text
    else:
        parts.append({"type": "text", "text": text if not parts else "\n" + text})


def build_prompt(
    cfg: PromptConfig,
    image: np.ndarray,
    product: str,
    expert_verdict: Verdict,
    boxes: Sequence[Box] = (),
    references: Sequence[np.ndarray] = (),
    confidence: Confidence | None = None,
) -> Prompt:
    """The message for one query image; at most `cfg.few_shot` of `references` are shown."""
    parts: list[dict[str, Any]] = []
    images: list[np.ndarray] = []

    def add_image(img: np.ndarray) -> None:
        parts.append({"type": "image"})
        images.append(img)

    _text(parts, cfg.instruction.format(product=product))
    if product in cfg.notes:
        _text(parts, cfg.notes_line.format(product=product, notes=cfg.notes[product]))
    refs = list(references)[: cfg.few_shot]
    if refs:
        _text(parts, cfg.references_intro.format(product=product))
        for ref in refs:
            add_image(ref)
    prior = None
    borderline = expert_verdict == "normal" and confidence == "uncertain"
    if cfg.use_expert:
        prior = (cfg.prior_anomalous if expert_verdict == "anomalous" else
                 cfg.prior_borderline if borderline else cfg.prior_normal)
        _text(parts, prior)
    _text(parts, cfg.query_label)
    query_index = len(images)
    add_image(image)
    if cfg.use_expert and (expert_verdict == "anomalous" or borderline) and boxes:
        add_image(draw_boxes(image, boxes))
        _text(parts, cfg.boxes_note_borderline if borderline else cfg.boxes_note)
    _text(parts, f"{cfg.question} {cfg.answer_format}".strip())
    messages = [{"role": "system", "content": [{"type": "text", "text": cfg.system}]}] if cfg.system else []
    messages.append({"role": "user", "content": parts})
    return Prompt(messages=messages, images=images, query_index=query_index, prior=prior)
