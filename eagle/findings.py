"""What an audit finds about one image: the typed values shared by several stages (expert → prompts → mllm →
output), and the rule that turns the expert's verdict and the MLLM's answer into the final verdict."""

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


def final_verdict(answer: Answer | None, expert_verdict: Verdict) -> Verdict:
    """The MLLM decides where it gave a clear yes/no; otherwise the expert's verdict stands."""
    if answer == "yes":
        return "anomalous"
    if answer == "no":
        return "normal"
    return expert_verdict
