"""Routing: which images the MLLM sees, and what rows say when it does not see them.

Policies: 'all' (the paper: every image), 'borderline' (the band around the threshold where the expert's errors
are, on both sides; `eagle.expert.ensemble.band_of`), 'uncertain' (only EAGLE's unsure band),
'not-confident-normal' (EAGLE's band and every anomalous verdict). The final verdict follows the MLLM where it
answered yes/no and the expert otherwise (not asked, or an unparsable answer): `eagle.findings.final_verdict`.
"""

from __future__ import annotations

from typing import Any

from eagle.findings import Box, Confidence

_ROUTED: dict[str, set[str]] = {
    "all": {"confident_normal", "uncertain", "confident_anomalous"},
    "uncertain": {"uncertain"},
    "not-confident-normal": {"uncertain", "confident_anomalous"},
    "borderline": {"uncertain"},  # the confidence column then marks the borderline band
}


def needs_mllm(confidence: Confidence, policy: str) -> bool:
    return confidence in _ROUTED[policy]


def finish_with_expert(row: dict[str, Any], boxes: list[Box]) -> None:
    """A row the MLLM did not answer for: the expert's verdict is final and explains itself."""
    row.update(verdict=row["expert_verdict"], explanation=expert_explanation(row, boxes),
               explanation_source="expert")


def expert_explanation(row: dict[str, Any], boxes: list[Box]) -> str:
    """A sentence from the expert alone: verdict, score against threshold, and where the region is."""
    score, threshold = row["expert_score"], row["threshold"]
    ratio = score / threshold if threshold else float("nan")
    if row["expert_verdict"] == "normal":
        return (f"Expert: normal, score {score:.3g} is {ratio:.2f}x the threshold {threshold:.3g}; "
                f"no anomalous region.")
    width, height = row["width"], row["height"]
    if boxes:
        b = boxes[0]
        area = 100.0 * (b.x2 - b.x1) * (b.y2 - b.y1) / max(1, width * height)
        cx, cy = (b.x1 + b.x2) / 2 / width, (b.y1 + b.y2) / 2 / height
        where = (f"strongest region at x={b.x1}-{b.x2}, y={b.y1}-{b.y2} "
                 f"({_place(cx, cy)}, {area:.1f}% of the image)")
    else:
        where = "no compact region found"
    n = len(boxes)
    return (f"Expert: {row['confidence'].replace('_', ' ')}, score {score:.3g} is {ratio:.2f}x the threshold "
            f"{threshold:.3g}; {n} region{'s' if n != 1 else ''}, {where}.")


def _place(cx: float, cy: float) -> str:
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    return "centre" if (vertical, horizontal) == ("middle", "centre") else f"{vertical} {horizontal}"
