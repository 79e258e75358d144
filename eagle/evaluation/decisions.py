"""What the audit decided, scored against the truth: the expert's score and verdict, the MLLM's answers, the final
verdict, and where the MLLM changed the outcome (overall, by confidence band, by guidance, by defect type).

Everything here needs only the output rows and their truths, not the anomaly maps, so it is cheap enough to
run once per run when several runs are compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from eagle.evaluation import metrics
from eagle.evaluation.ground_truth import Truth
from eagle.evaluation.routing_efficiency import routing_efficiency

BANDS = ("confident_normal", "uncertain", "confident_anomalous")
GUIDANCE = ("guided", "unguided", "not asked")


def flags(rows: Iterable[dict[str, Any]], key: str, value: Any = True) -> np.ndarray:
    """Per row: whether ``row[key] == value``."""
    return np.array([r[key] == value for r in rows], bool)


def mean(values: Iterable[float]) -> float | None:
    """The mean, ``None`` when there are no values."""
    values = list(values)
    return float(np.mean(values)) if values else None


def guidance(row: dict[str, Any]) -> str:
    """'guided' or 'unguided' for an MLLM call, 'not asked' otherwise."""
    if not row["mllm_ran"]:
        return "not asked"
    return "guided" if row["guided"] else "unguided"


def attention_by_correctness(rows: list[dict[str, Any]], anomalous: np.ndarray) -> dict[str, Any]:
    """Mean image-attention share inside the expert's region for correct and for wrong yes/no answers; answers
    without a share (not measured) are left out, so the counts here can be lower than the answer counts."""
    shares: dict[bool, list[float]] = {True: [], False: []}
    for row, truth in zip(rows, anomalous):
        share = row["image_attention_share"]
        if row["answer"] in ("yes", "no") and share is not None and np.isfinite(share):
            shares[(row["answer"] == "yes") == truth].append(share)
    return {"correct": mean(shares[True]), "wrong": mean(shares[False]),
            "n_correct": len(shares[True]), "n_wrong": len(shares[False])}


def mllm_metrics(rows: list[dict[str, Any]], anomalous: np.ndarray) -> dict[str, Any]:
    """The MLLM's answers (counts, parse rate, accuracy), the expert's accuracy on exactly the images the MLLM
    answered yes or no (the ones its accuracy is measured on; also on all it was asked about), and cost: calls
    and MLLM milliseconds per scored image (rows not asked cost nothing) and per call."""
    asked = flags(rows, "mllm_ran")
    answered = asked & np.array([r["answer"] in ("yes", "no") for r in rows], bool)
    called = [r for r, a in zip(rows, asked) if a]
    expert_right = flags(rows, "expert_verdict", "anomalous") == anomalous
    ms = sum(r["mllm_ms"] or 0.0 for r in called)
    return {
        **metrics.answer_stats(anomalous[asked], [r["answer"] for r in called]),
        "expert_accuracy_on_answered": mean(expert_right[answered]),
        "expert_accuracy_on_asked": mean(expert_right[asked]),
        "failed": sum(1 for r in rows if r["error_stage"] == "mllm"),
        "calls_per_image": mean(asked), "guided_share": mean(bool(r["guided"]) for r in called),
        "ms_per_image": ms / len(rows) if rows else None, "ms_per_call": ms / len(called) if called else None,
        "attention_share": attention_by_correctness(rows, anomalous),
    }


def _change(anomalous: np.ndarray, expert: np.ndarray, final: np.ndarray, keep: np.ndarray) -> dict[str, int]:
    return metrics.verdict_change(anomalous[keep], expert[keep], final[keep])


def verdict_changes(rows: list[dict[str, Any]], anomalous: np.ndarray) -> dict[str, Any]:
    """Expert vs final verdict against the truth (:func:`metrics.verdict_change`), in all and split by the
    expert's confidence band and by guidance ('unknown' band for rows without one)."""
    expert, final = flags(rows, "expert_verdict", "anomalous"), flags(rows, "verdict", "anomalous")
    bands = np.array([r["confidence"] or "unknown" for r in rows], dtype=object)
    modes = np.array([guidance(r) for r in rows], dtype=object)
    extra = sorted(set(bands) - set(BANDS))
    return {**metrics.verdict_change(anomalous, expert, final),
            "by_confidence": {b: _change(anomalous, expert, final, bands == b) for b in (*BANDS, *extra)},
            "by_guidance": {g: _change(anomalous, expert, final, modes == g) for g in GUIDANCE}}


def defect_recall(rows: list[dict[str, Any]], truths: list[Truth]) -> dict[str, dict[str, Any]]:
    """Per defect type (the test folder name): images, recall of the expert and of the final verdict, and the
    misses the MLLM fixed or introduced."""
    expert, final = flags(rows, "expert_verdict", "anomalous"), flags(rows, "verdict", "anomalous")
    defects = np.array([t.defect for t in truths], dtype=object)
    out = {}
    for defect in sorted({t.defect for t in truths if t.anomalous}):
        of = defects == defect
        change = metrics.verdict_change(np.ones(int(of.sum()), bool), expert[of], final[of])
        out[defect] = {"n": int(of.sum()), "expert_recall": float(expert[of].mean()),
                       "final_recall": float(final[of].mean()), "fixed": change["fixed"],
                       "introduced": change["introduced"]}
    return out


def decision_metrics(rows: list[dict[str, Any]], truths: list[Truth]) -> dict[str, Any]:
    """Every metric of one group of scored rows that needs no anomaly map."""
    anomalous = np.array([t.anomalous for t in truths], bool)
    scores = np.array([r["expert_score"] for r in rows], float)
    thresholds = np.array([r["threshold"] for r in rows], float)
    return {
        "n_images": len(rows), "n_normal": int((~anomalous).sum()), "n_defective": int(anomalous.sum()),
        "image_auroc": metrics.auroc(anomalous, scores),
        "fpr_at_threshold": metrics.fpr_at_threshold(anomalous, scores, thresholds),
        "expert": metrics.binary_stats(anomalous, flags(rows, "expert_verdict", "anomalous")),
        "final": metrics.binary_stats(anomalous, flags(rows, "verdict", "anomalous")),
        "mllm": mllm_metrics(rows, anomalous),
        "verdict_change": verdict_changes(rows, anomalous),
        "per_defect": defect_recall(rows, truths),
        "routing": routing_efficiency(rows, anomalous),
    }
