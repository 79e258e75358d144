"""Detection metrics as pure functions: image AUROC, confusion counts, FPR at the threshold, what the MLLM's
answers and verdict changes were worth, pixel AUROC, AUPRO.

Undefined values (one class only, nothing predicted positive, no defect pixels) are ``None``, never an error.
Pixel metrics work on :class:`PixelCounts`: per image, the pixel counts at each distinct score, kept apart for
normal pixels and for every connected defect region. That is exact (nothing is binned) and small for 8-bit
anomaly maps (at most 256 distinct scores per image), so a whole test set's pixels never sit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score


def auroc(anomalous: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Area under the ROC curve of `scores` for the labels `anomalous` (ties count half); ``None`` with only
    one class. `weights` are per-sample counts."""
    anomalous = np.asarray(anomalous, bool)
    if anomalous.all() or not anomalous.any():
        return None
    return float(roc_auc_score(anomalous, np.asarray(scores, float), sample_weight=weights))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def binary_stats(anomalous: np.ndarray, predicted: np.ndarray) -> dict[str, float | int | None]:
    """Confusion counts, precision, recall, F1 and accuracy, positive = anomalous."""
    y, p = np.asarray(anomalous, bool), np.asarray(predicted, bool)
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio(tp + tn, y.size)}


def fpr_at_threshold(anomalous: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> float | None:
    """Share of normal images whose score reaches their expert's threshold (the expert's own verdict rule)."""
    normal = ~np.asarray(anomalous, bool)
    flagged = np.asarray(scores, float) >= np.asarray(thresholds, float)
    return _ratio(int(flagged[normal].sum()), int(normal.sum()))


def verdict_change(anomalous: np.ndarray, expert: np.ndarray, final: np.ndarray) -> dict[str, int]:
    """Expert verdict vs final verdict, both against the truth (all boolean, True = anomalous): images both got
    right, errors the MLLM ``fixed`` (expert wrong, final right), errors it ``introduced`` (expert right, final
    wrong), and images both got wrong."""
    y = np.asarray(anomalous, bool)
    expert_ok, final_ok = np.asarray(expert, bool) == y, np.asarray(final, bool) == y
    return {"both_right": int((expert_ok & final_ok).sum()), "fixed": int((~expert_ok & final_ok).sum()),
            "introduced": int((expert_ok & ~final_ok).sum()), "both_wrong": int((~expert_ok & ~final_ok).sum())}


def answer_stats(anomalous: np.ndarray, answers: list[str | None]) -> dict[str, float | int | None]:
    """The MLLM's answers on the images it was asked about: counts of 'yes' (defect), 'no' and unparsed (any
    other value), ``parse_rate`` = yes/no answers per call, ``accuracy`` = correct yes/no answers per yes/no
    answer (``None`` without any)."""
    y = np.asarray(anomalous, bool)
    said = np.array([a if a in ("yes", "no") else "unparsed" for a in answers], dtype=object)
    parsed = said != "unparsed"
    correct = int(((said == "yes") == y)[parsed].sum())
    calls, n_parsed = len(answers), int(parsed.sum())
    return {"calls": calls, "yes": int((said == "yes").sum()), "no": int((said == "no").sum()),
            "unparsed": calls - n_parsed, "correct": correct, "wrong": n_parsed - correct,
            "parse_rate": _ratio(n_parsed, calls), "accuracy": _ratio(correct, n_parsed)}


@dataclass
class PixelCounts:
    """Pixel counts by score over many images: ``normal`` per image, one row per defect region in ``regions``."""

    scores: list[np.ndarray] = field(default_factory=list)  # per image: its distinct scores (L,)
    normal: list[np.ndarray] = field(default_factory=list)  # per image: normal pixels at each score (L,)
    regions: list[np.ndarray] = field(default_factory=list)  # per image: (R, L) region pixels at each score

    def add(self, score_map: np.ndarray, mask: np.ndarray) -> None:
        """One image: its score map and same-shape defect mask (all false for a normal image)."""
        if score_map.shape != mask.shape:
            raise ValueError(f"map {score_map.shape} and mask {mask.shape} differ in shape")
        scores, level = np.unique(score_map, return_inverse=True)
        level = level.reshape(score_map.shape)
        n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        counts = np.bincount((labels * scores.size + level).ravel(), minlength=n_labels * scores.size)
        counts = counts.reshape(n_labels, scores.size)  # label 0 = normal pixels
        self.scores.append(scores)
        self.normal.append(counts[0])
        self.regions.append(counts[1:])

    def merge(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.scores + other.scores, self.normal + other.normal, self.regions + other.regions)

    @property
    def images(self) -> int:
        return len(self.scores)


def pixel_auroc(counts: PixelCounts) -> float | None:
    """Pixel-level AUROC pooled over all images; ``None`` without both defect and normal pixels."""
    if not counts.images:
        return None
    scores = np.concatenate(counts.scores * 2)  # each image's scores twice: its normal, then its defect pixels
    weights = np.concatenate(counts.normal + [r.sum(axis=0) for r in counts.regions])
    labels = np.repeat([False, True], scores.size // 2)
    keep = weights > 0
    return auroc(labels[keep], scores[keep], weights[keep])


def pro_curve(counts: PixelCounts) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) at every distinct score t (pixels ≥ t flagged), from (0, 0) to (1, 1).

    FPR is over all normal pixels of all images; PRO is the mean over all defect regions (8-connected) of the
    share of the region flagged — the per-region overlap of MVTec AD.
    """
    n_normal = sum(int(n.sum()) for n in counts.normal)
    n_regions = sum(len(r) for r in counts.regions)
    if not n_regions or not n_normal:
        return None
    scores = np.concatenate(counts.scores)
    fp = np.concatenate(counts.normal) / n_normal
    overlap = np.concatenate([(r / r.sum(axis=1, keepdims=True)).sum(axis=0) for r in counts.regions]) / n_regions
    distinct, group = np.unique(-scores, return_inverse=True)  # descending scores
    fpr = np.cumsum(np.bincount(group, fp, minlength=distinct.size))
    pro = np.cumsum(np.bincount(group, overlap, minlength=distinct.size))
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def aupro(counts: PixelCounts, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD / anomalib's AUPRO)."""
    curve = pro_curve(counts)
    if curve is None:
        return None
    fpr, pro = curve
    fpr, pro = np.minimum(fpr, 1.0), np.minimum(pro, 1.0)  # float sums may overshoot 1 by an ulp
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size and x[-1] < fpr_limit:  # close the area with the curve's value at the limit
        share = (fpr_limit - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[cut - 1] + share * (pro[cut] - pro[cut - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)
