"""Small typed values shared by several stages (expert → prompts → mllm → output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["normal", "anomalous"]
Confidence = Literal["confident_normal", "uncertain", "confident_anomalous"]
Answer = Literal["yes", "no", "unparsed"]


@dataclass(frozen=True)
class Box:
    """An anomalous region in original-image pixel coordinates (x2/y2 exclusive) with its peak map score."""

    x1: int
    y1: int
    x2: int
    y2: int
    score: float

    def as_dict(self) -> dict[str, float]:
        return {"x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2, "score": float(self.score)}
