"""Label-free threshold (EAGLE's TGPS) and the confidence band around it.

Training scores: for each training image, score only the patches the coreset did *not* select, against the
memory bank without the rows that came from that image (otherwise most of them find their nearest neighbour
in their own image and the scores come out low), aggregated like a test image. Models without unselected
patches (PaDiM, STFPM) get out-of-fold scores instead: k-fold cross-fitting scores each training image with a
model fitted on the other folds. Either distribution stands in for the scores of normal test images; a threshold
rule turns it into one number. No step sees a label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from eagle.config import ConfidenceConfig, ThresholdConfig
from eagle.findings import Confidence, Verdict

if TYPE_CHECKING:  # the band and verdict rules below are read with artifact metadata, without torch
    import torch

# score_image(query patches (P, D), exclude mask over bank rows (M,)) -> image score
ImageScorer = Callable[["torch.Tensor", "torch.Tensor"], float]


def leave_own_out_scores(embeddings: torch.Tensor, selected: torch.Tensor, score_image: ImageScorer,
                         min_unselected: int = 1) -> tuple[np.ndarray, int]:
    """Training scores (one per kept image) and the number of skipped images.

    embeddings: (N_images, P, D) patch embeddings of the training images; selected: (M,) flat indices
    (image * P + patch) of the patches that form the memory bank, in bank-row order. An image with fewer
    than ``min_unselected`` unselected patches, or whose patches make up the whole bank, is skipped.
    """
    import torch

    n_images, n_patches, _ = embeddings.shape
    selected = selected.to(embeddings.device)
    source = selected // n_patches  # training image of each bank row
    is_selected = torch.zeros(n_images * n_patches, dtype=torch.bool, device=embeddings.device)
    is_selected[selected] = True
    is_selected = is_selected.view(n_images, n_patches)
    scores, skipped = [], 0
    for i in range(n_images):
        unselected = ~is_selected[i]
        own = source == i
        if int(unselected.sum()) < min_unselected or bool(own.all()):
            skipped += 1
            continue
        scores.append(float(score_image(embeddings[i][unselected], own)))
    return np.asarray(scores, dtype=np.float64), skipped


def fold_assignment(names: Sequence[str], k: int, seed: int = 0) -> list[int]:
    """The fold (0..k-1) of each training image, in the order of `names`: the sorted names shuffled under
    `seed` and dealt round-robin, so folds differ in size by at most one and depend only on the names."""
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    if len(names) < k:
        raise ValueError(f"{len(names)} training images cannot make {k} folds: lower threshold.folds or add "
                         "training images")
    if len(set(names)) != len(names):
        raise ValueError("training image names must be unique for fold assignment")
    order = sorted(names)
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    fold_of = {name: i % k for i, name in enumerate(shuffled)}
    return [fold_of[name] for name in names]


def out_of_fold_scores(folds: Sequence[int], fit_without: Callable[[list[int]], object],
                       score: Callable[[object, list[int]], Sequence[float]]) -> np.ndarray:
    """One score per training image from a model that never saw it: for each fold f, ``fit_without(train)`` on
    the images of the other folds, then ``score(model, held_out)`` for fold f's images (indices into folds)."""
    scores = np.full(len(folds), np.nan)
    for fold in sorted(set(folds)):
        held_out = [i for i, f in enumerate(folds) if f == fold]
        model = fit_without([i for i, f in enumerate(folds) if f != fold])
        scores[held_out] = np.asarray(score(model, held_out), dtype=np.float64)
    return scores


def threshold_value(scores: np.ndarray, cfg: ThresholdConfig) -> float:
    """The threshold the configured rule puts on training scores.

    k-sigma: mean + k·std; mad: median + k·1.4826·MAD (the MAD scaled to a std for normal data);
    quantile: the q-quantile; evt: the ``evt_quantile`` quantile of a generalized extreme value
    distribution fitted to the scores (scipy ``genextreme``).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        raise ValueError(f"need at least 2 training scores to fit a threshold, got {scores.size}")
    from scipy import stats

    if cfg.method == "k-sigma":
        return float(scores.mean() + cfg.k * scores.std(ddof=1))
    if cfg.method == "mad":
        mad = stats.median_abs_deviation(scores, scale="normal")
        return float(np.median(scores) + cfg.k * mad)
    if cfg.method == "quantile":
        return float(np.quantile(scores, cfg.quantile))
    if cfg.method == "evt":
        shape, loc, scale = stats.genextreme.fit(scores)
        return float(stats.genextreme.ppf(cfg.evt_quantile, shape, loc=loc, scale=scale))
    raise ValueError(f"unknown threshold method {cfg.method!r}")


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """Count, mean, std, min, quartiles, max of a score distribution (JSON-friendly floats)."""
    scores = np.asarray(scores, dtype=np.float64)
    q = np.quantile(scores, [0.25, 0.5, 0.75, 0.95, 0.99])
    return {"count": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std(ddof=1)),
            "min": float(scores.min()), "p25": float(q[0]), "median": float(q[1]), "p75": float(q[2]),
            "p95": float(q[3]), "p99": float(q[4]), "max": float(scores.max())}


@dataclass(frozen=True)
class ThresholdFit:
    """A fitted threshold with the training-score distribution it came from."""

    method: str
    value: float
    score_max: float
    scores: np.ndarray
    skipped: int

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "value": self.value, "score_max": self.score_max, "skipped": self.skipped,
                "summary": score_stats(self.scores), "scores": [float(s) for s in self.scores]}


def fit_threshold(scores: np.ndarray, skipped: int, cfg: ThresholdConfig) -> ThresholdFit:
    """Threshold + score_max (the largest training score) for training scores."""
    value = threshold_value(scores, cfg)
    return ThresholdFit(method=cfg.method, value=value, score_max=float(np.max(scores)),
                        scores=np.asarray(scores, dtype=np.float64), skipped=skipped)


def classify(score: float, threshold: float, score_max: float,
             cfg: ConfidenceConfig | None = None) -> tuple[Verdict, Confidence]:
    """Expert verdict (anomalous iff score >= threshold) and confidence in EAGLE's band (`eagle_edges`)."""
    return classify_in_band(score, threshold, *eagle_edges(threshold, score_max, cfg))


def classify_in_band(score: float, threshold: float, low: float, high: float) -> tuple[Verdict, Confidence]:
    """Expert verdict (anomalous iff score >= threshold) and confidence: 'uncertain' when the score is in the
    band ``[low, threshold)`` (a normal verdict close to the threshold) or ``[threshold, high)`` (an anomalous
    one), confident otherwise. ``low > threshold`` or ``high <= threshold`` leaves that side of the band empty."""
    if score < threshold:
        return "normal", ("uncertain" if score >= low else "confident_normal")
    return "anomalous", ("uncertain" if score < high else "confident_anomalous")


def eagle_edges(threshold: float, score_max: float, cfg: ConfidenceConfig | None = None) -> tuple[float, float]:
    """EAGLE's band: ``(low_factor·threshold, high_factor·score_max)``.

    With both factors at 1 (the default) this is the paper's rule: uncertain exactly when
    threshold <= score < score_max, i.e. the expert says anomalous but normal training images scored as high.
    low_factor < 1 adds normal verdicts just under the threshold; high_factor > 1 widens the band above
    score_max. When the threshold lies above score_max (possible for k-sigma on few images) the band is empty.
    """
    cfg = cfg or ConfidenceConfig()
    return cfg.low_factor * threshold, cfg.high_factor * score_max


def borderline_edges(threshold: float, normal_ratios: np.ndarray, budget: float) -> tuple[float, float]:
    """The band around the threshold that holds `budget` of the normal images, learned without labels.

    normal_ratios: the training images' out-of-fold (or leave-own-out) scores divided by the threshold, which
    stand in for normal test images. The band is ``[t·(1−w), t·(1+w))``, symmetric in threshold units: it takes
    the normal images that score just under the threshold (where the expert misses faint defects) and just over
    it (its false alarms). w lies halfway between the ``k``-th and the next smallest ``|ratio − 1|``, with
    ``k = floor(budget·n)``: the band holds the k training images closest to the threshold and no more (an empty
    band when the budget is below one image). Defects close to the threshold add to the routed share.
    """
    distance = np.sort(np.abs(np.asarray(normal_ratios, dtype=np.float64) - 1.0))
    if distance.size == 0:
        raise ValueError("a borderline band needs training scores")
    k = int(np.floor(min(max(budget, 0.0), 1.0) * distance.size + 1e-9))
    if k == 0:
        return threshold, threshold
    width = distance[-1] * 1.05 if k == distance.size else (distance[k - 1] + distance[k]) / 2
    return threshold * (1.0 - width), threshold * (1.0 + width)


def band_is_empty(threshold: float, score_max: float, cfg: ConfidenceConfig | None = None) -> bool:
    """Whether EAGLE's band (`eagle_edges`) can call no score uncertain."""
    cfg = cfg or ConfidenceConfig()
    return cfg.low_factor >= 1 and threshold >= cfg.high_factor * score_max


def empty_band_advice(product: str, threshold: float, score_max: float, cfg: ConfidenceConfig | None = None
                      ) -> str | None:
    """What to tell the user when a product's uncertain band is empty; None when it is not."""
    if not band_is_empty(threshold, score_max, cfg):
        return None
    factor = np.ceil(threshold / score_max * 100) / 100 + 0.01 if score_max > 0 else float("nan")
    return (f"{product}: threshold {threshold:.4g} >= score_max {score_max:.4g}, so its uncertain band is empty: "
            f"routing.policy=uncertain sends none of its images to the MLLM and guidance (apply_to=uncertain) "
            f"never applies. Widen the band with confidence.high_factor={factor:.2f} (or confidence.low_factor "
            f"below 1), or refit with a lower threshold (threshold.k, threshold.method=quantile).")
