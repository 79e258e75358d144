"""A product's pinned expert as the expert stage uses it: one model, or an ensemble (``expert.ensemble.models``).

An ensemble scores each image with every member (each a fitted expert of the product, at the version pinned for
the run), divides each member's score by that member's own label-free threshold, and combines the normalised
scores by ``expert.ensemble.combine`` (max: anomalous as soon as one member says so; mean). Anomaly maps are normalised
and combined the same way, pixel by pixel. The verdict, confidence band, regions and prompts then use the
combination, judged against threshold 1 (scores are in threshold units) and a score_max that combines the
members' score_max / threshold by the same rule.

An ensemble's pinned version lists its members, ``patchcore:ab12…+padim:cd34…``: it is what the output's
``expert_model_version`` records and what planning compares, so refitting any member re-audits the product.
This module reads metadata without torch; `ProductExpert` (scoring) loads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eagle.config import ConfidenceConfig, ExpertConfig, RoutingConfig, StorageConfig
from eagle.expert.artifact import ArtifactError, read_meta, resolve_version
from eagle.expert.experts import model_name
from eagle.expert.threshold import borderline_edges, classify_in_band, eagle_edges
from eagle.findings import Confidence, Verdict

_MEMBERS, _PAIR = "+", ":"
COMBINE = {"max": np.max, "mean": np.mean}


def ensemble_version(members: Mapping[str, str]) -> str:
    """The pinned version of an ensemble: ``model:version`` of each member, in the configured order."""
    return _MEMBERS.join(f"{model}{_PAIR}{version}" for model, version in members.items())


def member_versions(pinned: str) -> list[str]:
    """The artifact versions behind a pinned version (one for a single expert)."""
    if _PAIR not in pinned:
        return [pinned]
    return [part.split(_PAIR, 1)[1] for part in pinned.split(_MEMBERS)]


def pin(store: str, product: str, cfg: ExpertConfig, storage: StorageConfig | None = None) -> str:
    """The version of `product`'s expert for a run: ``expert.model``'s latest fit, or with ``expert.ensemble.models``
    each member's latest fit (all made for the same model input size). ArtifactError when one is missing."""
    if not cfg.ensemble.models:
        return resolve_version(store, product, storage=storage, model=cfg.model)
    members = {model: resolve_version(store, product, storage=storage, model=model) for model in cfg.ensemble.models}
    metas = {model: read_meta(store, product, version, storage) for model, version in members.items()}
    if unusable := [model for model, meta in metas.items() if not float(meta["threshold"]["value"]) > 0]:
        raise ArtifactError(f"the {', '.join(unusable)} expert of product {product!r} has a threshold of 0 or "
                            f"less, which an ensemble cannot divide its scores by: refit it on more varied images")
    sizes = {model: _input_size(meta) for model, meta in metas.items()}
    if len(set(sizes.values())) > 1:
        raise ArtifactError(f"the ensemble's experts of product {product!r} were fitted for different input sizes "
                            f"(resize, crop) {sizes}: refit them with the same expert.resize and expert.crop")
    return ensemble_version(members)


def pinned_metas(store: str, versions: Mapping[str, str], storage: StorageConfig | None = None,
                 threads: int = 16) -> dict[str, list[dict]]:
    """Each product's artifact metadata (one per expert behind its pinned version; no tensors), read once and
    in parallel: the driver's only per-product reads before images flow."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = [(product, version) for product, pinned in versions.items() for version in member_versions(pinned)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(wanted)))) as pool:
        read = list(pool.map(lambda pv: read_meta(store, pv[0], pv[1], storage), wanted))
    out: dict[str, list[dict]] = {product: [] for product in versions}
    for (product, _), meta in zip(wanted, read, strict=True):
        out[product].append(meta)
    return out


def input_size(metas: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(resize, crop) of the model input a product's pinned expert takes (every member alike: `pin`)."""
    return _input_size(metas[0])


def _input_size(meta: Mapping[str, Any]) -> tuple[int, int]:
    return int(meta["expert"]["resize"]), int(meta["expert"]["crop"])


def combine(values: Sequence[Any], how: str, dtype: type = np.float64) -> Any:
    """Normalised scores (floats) or maps (equal-shape arrays) combined element-wise by 'max' or 'mean'."""
    return COMBINE[how](np.stack([np.asarray(v, dtype=dtype) for v in values]), axis=0)


@dataclass(frozen=True)
class Band:
    """What a product's scores are judged by: the verdict threshold, the top normal training score, the rule, and
    the band in which the expert counts as unsure (``[low, threshold)`` for normal verdicts, ``[threshold, high)``
    for anomalous ones; see `eagle.expert.threshold.classify_in_band`)."""

    threshold: float
    score_max: float
    method: str
    low: float
    high: float

    def classify(self, score: float) -> tuple[Verdict, Confidence]:
        return classify_in_band(score, self.threshold, self.low, self.high)


def band_of(metas: Sequence[Mapping[str, Any]], how: str, routing: RoutingConfig | None = None,
            confidence: ConfidenceConfig | None = None) -> Band:
    """The band of one expert (its artifact's threshold) or of an ensemble (see the module docstring).

    Its unsure part is EAGLE's (threshold, score_max) band, or with ``routing.policy: borderline`` the band
    around the threshold that ``routing.score_range`` gives or that holds ``routing.budget`` of the training
    images' out-of-fold scores (`normal_ratios`)."""
    routing = routing or RoutingConfig()
    fits = [m["threshold"] for m in metas]
    if len(fits) == 1:
        threshold, score_max, method = float(fits[0]["value"]), float(fits[0]["score_max"]), fits[0]["method"]
    else:
        threshold, score_max = 1.0, float(combine([f["score_max"] / f["value"] for f in fits], how))
        rules = ", ".join(f"{model_name(meta)} {fit['method']}" for meta, fit in zip(metas, fits, strict=True))
        method = f"{how}({rules})"
    if routing.policy != "borderline":
        low, high = eagle_edges(threshold, score_max, confidence)
    elif routing.score_range is not None:
        low, high = threshold * routing.score_range[0], threshold * routing.score_range[1]
    else:
        low, high = borderline_edges(threshold, normal_ratios(metas, how), routing.budget)
    return Band(threshold, score_max, method, low, high)


def normal_ratios(metas: Sequence[Mapping[str, Any]], how: str) -> np.ndarray:
    """The training images' label-free scores in threshold units: one expert's out-of-fold (or leave-own-out)
    scores / its threshold, or an ensemble's members' ratios combined per training image (matched by name; an
    image a member skipped is left out)."""
    per_member = []
    for meta in metas:
        fit = meta["threshold"]
        ratios = np.asarray(fit["scores"], dtype=np.float64) / float(fit["value"])
        if len(metas) == 1:
            return ratios
        names = meta.get("training", {}).get("names") or []
        if len(names) != len(ratios):  # some images skipped: which ones is not recorded
            raise ArtifactError(f"expert {model_name(meta)} records {len(ratios)} training scores for "
                                f"{len(names)} training images, so an ensemble cannot match them per image: "
                                f"use routing.score_range instead of routing.budget")
        per_member.append(dict(zip(names, ratios, strict=True)))
    common = [name for name in per_member[0] if all(name in member for member in per_member[1:])]
    return np.asarray([combine([member[name] for member in per_member], how) for name in common])


@dataclass(frozen=True)
class Scored:
    """One image scored by a product's expert: the score and map the verdict and regions use, and each member's
    own score (model, artifact version, raw score, its threshold)."""

    score: float
    anomaly_map: np.ndarray
    members: list[dict[str, Any]]


class ProductExpert:
    """The expert (or the ensemble) of one product at its pinned version(s)."""

    def __init__(self, version: str, members: Sequence[tuple[Any, Any]], how: str = "max", band: Band | None = None
                 ) -> None:
        """members: (ExpertArtifact, eagle.expert.fitted.Expert) pairs, in the configured order; band: how its
        scores are judged (default: EAGLE's band of its members)."""
        self.version, self.members, self.how = version, list(members), how
        self.band = band or band_of([art.meta for art, _ in self.members], how)

    def score_inputs(self, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[Scored]:
        """Scores and maps at the original `sizes` for `model_input` copies (see Expert.score_inputs)."""
        per_member = [expert.score_inputs(inputs, sizes) for _, expert in self.members]
        out = []
        for i in range(len(inputs)):
            results = [member[i] for member in per_member]
            members = [{"model": model_name(art.meta), "version": art.version, "score": float(r.score),
                        "threshold": art.threshold} for (art, _), r in zip(self.members, results, strict=True)]
            if len(results) == 1:
                out.append(Scored(float(results[0].score), results[0].anomaly_map, members))
                continue
            thresholds = [art.threshold for art, _ in self.members]
            score = combine([r.score / t for r, t in zip(results, thresholds, strict=True)], self.how)
            amap = combine([r.anomaly_map / t for r, t in zip(results, thresholds, strict=True)], self.how,
                           np.float32)  # maps at the original size: float32 halves a 12 MP image's copy
            out.append(Scored(float(score), amap, members))
        return out
