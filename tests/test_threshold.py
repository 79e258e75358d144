"""Label-free threshold: rules on known distributions, leave-own-patches-out scoring, confidence band."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from eagle.config import ConfidenceConfig, ThresholdConfig
from eagle.expert.scoring import patch_scores
from eagle.expert.search import MemoryBank
from eagle.expert.threshold import (
    band_is_empty,
    borderline_edges,
    classify,
    classify_in_band,
    empty_band_advice,
    fit_threshold,
    leave_own_out_scores,
    threshold_value,
)


def rule(method: str, **kw) -> ThresholdConfig:
    return ThresholdConfig(method=method, **kw)


def test_rules_on_a_normal_distribution():
    scores = np.random.default_rng(0).normal(10.0, 2.0, 20000)
    assert threshold_value(scores, rule("k-sigma")) == pytest.approx(16.0, abs=0.1)
    assert threshold_value(scores, rule("k-sigma", k=2)) == pytest.approx(14.0, abs=0.1)
    assert threshold_value(scores, rule("mad")) == pytest.approx(16.0, abs=0.15)  # MAD scaled to a std
    assert threshold_value(scores, rule("quantile", quantile=0.99)) == pytest.approx(10 + 2.326 * 2, abs=0.1)


def test_mad_resists_outliers_that_inflate_k_sigma():
    scores = np.concatenate([np.random.default_rng(1).normal(10.0, 1.0, 200), [60.0, 80.0]])
    assert threshold_value(scores, rule("mad")) == pytest.approx(13.0, abs=0.5)
    assert threshold_value(scores, rule("k-sigma")) > 20


def test_evt_recovers_the_quantile_of_a_gev_sample():
    dist = stats.genextreme(c=0.1, loc=5.0, scale=1.0)
    scores = dist.rvs(size=5000, random_state=2)
    assert threshold_value(scores, rule("evt", evt_quantile=0.975)) == pytest.approx(dist.ppf(0.975), rel=0.03)


def test_fit_keeps_distribution_and_score_max():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    fit = fit_threshold(scores, skipped=1, cfg=rule("quantile", quantile=0.5))
    assert fit.value == 2.5 and fit.score_max == 4.0 and fit.skipped == 1
    d = fit.as_dict()
    assert d["scores"] == [1.0, 2.0, 3.0, 4.0] and d["summary"]["count"] == 4 and d["summary"]["max"] == 4.0
    with pytest.raises(ValueError, match="at least 2"):
        threshold_value(np.array([1.0]), rule("k-sigma"))


def anomalib_scorer(vectors: torch.Tensor):
    bank = MemoryBank(vectors)

    def score(query: torch.Tensor, exclude: torch.Tensor) -> float:
        return float(patch_scores(query.unsqueeze(0), bank, "anomalib", 1, 1, exclude)[0][0])
    return score


def test_own_patches_are_left_out_on_a_constructed_case():
    # image 0: patches a, a' (a' is an exact duplicate of a), b; image 1: c, d, e. Selected: a (img 0), c, d.
    emb = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]],
                        [[3.0, 0.0], [0.0, 4.0], [3.0, 1.0]]])
    selected = torch.tensor([0, 3, 4])  # flat indices image * 3 + patch
    bank = emb.reshape(-1, 2)[selected]
    scores, skipped = leave_own_out_scores(emb, selected, anomalib_scorer(bank))
    # image 0's unselected patches a' and b may only match c=(3,0) or d=(0,4): a' -> 3, b -> 2; max = 3.
    # Had a stayed in the bank, a' would match it at distance 0 and the score would be 2.
    assert skipped == 0
    assert scores[0] == pytest.approx(3.0)
    assert scores[1] == pytest.approx(np.hypot(3.0, 1.0))  # e -> a at (0,0): sqrt(10) < dist to own c, d excluded


def test_exclude_mask_is_exactly_the_images_own_bank_rows_and_skips_are_counted():
    emb = torch.randn(3, 4, 2)
    selected = torch.tensor([0, 5, 6, 8, 9, 10, 11])  # image 2 has all 4 patches selected
    seen = []

    def spy(query: torch.Tensor, exclude: torch.Tensor) -> float:
        seen.append((query.shape[0], exclude.tolist()))
        return 1.0

    scores, skipped = leave_own_out_scores(emb, selected, spy, min_unselected=2)
    assert skipped == 1 and len(scores) == 2
    assert seen == [(3, [True, False, False, False, False, False, False]),
                    (2, [False, True, True, False, False, False, False])]


def test_self_match_would_bias_training_scores_low():
    from eagle.expert.coreset import greedy_coreset

    g = torch.Generator().manual_seed(0)
    # each image has its own texture offset, so its patches resemble each other more than other images'
    emb = torch.randn(8, 1, 16, generator=g) * 2 + torch.randn(8, 64, 16, generator=g)
    flat = emb.reshape(-1, 16)
    selected = greedy_coreset(flat, 51, seed=0)
    bank = flat[selected]
    honest, _ = leave_own_out_scores(emb, selected, anomalib_scorer(bank))
    leaky, _ = leave_own_out_scores(emb, selected, lambda q, ex: anomalib_scorer(bank)(q, torch.zeros_like(ex)))
    assert (honest > leaky).all()


def test_classify_eagle_band_and_factors():
    eagle = ConfidenceConfig()
    assert classify(0.5, 1.0, 2.0, eagle) == ("normal", "confident_normal")
    assert classify(1.0, 1.0, 2.0, eagle) == ("anomalous", "uncertain")
    assert classify(1.5, 1.0, 2.0, eagle) == ("anomalous", "uncertain")
    assert classify(2.0, 1.0, 2.0, eagle) == ("anomalous", "confident_anomalous")
    assert classify(1.5, 1.0, 0.9, eagle) == ("anomalous", "confident_anomalous")  # threshold above score_max
    wide = ConfidenceConfig(low_factor=0.8, high_factor=1.5)
    assert classify(0.85, 1.0, 2.0, wide) == ("normal", "uncertain")
    assert classify(0.75, 1.0, 2.0, wide) == ("normal", "confident_normal")
    assert classify(2.5, 1.0, 2.0, wide) == ("anomalous", "uncertain")
    assert classify(3.0, 1.0, 2.0, wide) == ("anomalous", "confident_anomalous")


def test_an_empty_uncertain_band_is_named_with_the_setting_that_widens_it():
    assert band_is_empty(0.5, 0.4) and not band_is_empty(0.3, 0.4)
    assert not band_is_empty(0.5, 0.4, ConfidenceConfig(low_factor=0.9))  # normal verdicts near the threshold
    assert not band_is_empty(0.5, 0.4, ConfidenceConfig(high_factor=1.3))
    advice = empty_band_advice("grid", 0.5, 0.4)
    assert advice.startswith("grid: threshold 0.5 >= score_max 0.4") and "confidence.high_factor=1.26" in advice
    assert not band_is_empty(0.5, 0.4, ConfidenceConfig(high_factor=1.26))  # the advice is enough
    assert empty_band_advice("grid", 0.3, 0.4) is None


def test_classify_in_band_on_both_sides_of_the_threshold():
    assert classify_in_band(0.85, 1.0, 0.9, 1.2) == ("normal", "confident_normal")
    assert classify_in_band(0.9, 1.0, 0.9, 1.2) == ("normal", "uncertain")  # low edge included
    assert classify_in_band(1.0, 1.0, 0.9, 1.2) == ("anomalous", "uncertain")
    assert classify_in_band(1.2, 1.0, 0.9, 1.2) == ("anomalous", "confident_anomalous")  # high edge excluded
    assert classify_in_band(0.99, 1.0, 1.0, 1.0) == ("normal", "confident_normal")  # an empty band


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("n", [10, 60, 1000])
def test_the_borderline_band_holds_the_budget_of_normal_scores(budget, n):
    rng = np.random.default_rng(n)
    scores = rng.gamma(4.0, 0.5, n)  # skewed, like nearest-neighbour distances
    threshold = threshold_value(scores, rule("k-sigma"))
    low, high = borderline_edges(threshold, scores / threshold, budget)
    assert threshold - low == pytest.approx(high - threshold)  # symmetric
    inside = np.mean([classify_in_band(s, threshold, low, high)[1] == "uncertain" for s in scores])
    assert budget - 1 / n - 1e-9 <= inside <= budget + 1e-9  # never more than the budget, at most one image less
    assert (low < threshold < high) == (budget * n >= 1)  # a budget below one training image: an empty band
    # normal images of the same distribution the band has not seen: about the budget too (within 3 sampling sd)
    fresh = rng.gamma(4.0, 0.5, 20000)
    if n >= 60:
        assert np.mean((fresh >= low) & (fresh < high)) == pytest.approx(budget, abs=3 * np.sqrt(budget / n) + 0.01)


def test_a_wider_budget_widens_the_band_around_the_same_threshold():
    ratios = np.random.default_rng(1).normal(0.7, 0.12, 200)
    bands = [borderline_edges(2.0, ratios, b) for b in (0.1, 0.2, 0.4)]
    assert bands[0][0] > bands[1][0] > bands[2][0] and bands[0][1] < bands[1][1] < bands[2][1]
    with pytest.raises(ValueError, match="training scores"):
        borderline_edges(2.0, np.array([]), 0.2)


def _meta(model: str, value: float, scores: list[float], names: list[str], score_max: float | None = None) -> dict:
    return {"model": model, "threshold": {"method": "k-sigma", "value": value, "score_max": score_max or max(scores),
                                          "scores": scores}, "training": {"names": names}}


def test_band_of_follows_the_routing_policy():
    from eagle.config import RoutingConfig
    from eagle.expert.ensemble import band_of

    meta = _meta("patchcore", 2.0, [1.0, 1.5, 1.8, 1.9, 2.1], list("abcde"), score_max=2.1)
    eagle = band_of([meta], "max")
    assert (eagle.low, eagle.high) == (2.0, 2.1) and eagle.classify(2.05) == ("anomalous", "uncertain")
    ranged = band_of([meta], "max", RoutingConfig(policy="borderline", score_range=(0.9, 1.1)))
    assert (ranged.low, ranged.high) == pytest.approx((1.8, 2.2)) and ranged.classify(1.85) == ("normal", "uncertain")
    # budget 0.4 of 5 training images: the 2 closest to the threshold (1.9 and 2.1, 0.05 away), not 1.8 (0.1 away)
    learned = band_of([meta], "max", RoutingConfig(policy="borderline", budget=0.4))
    assert learned.low == pytest.approx(2.0 * (1 - 0.075)) and learned.high == pytest.approx(2.0 * 1.075)
    assert [learned.classify(s)[1] == "uncertain" for s in (1.8, 1.9, 2.1, 2.2)] == [False, True, True, False]


def test_an_ensemble_band_combines_its_members_scores_per_training_image():
    from eagle.config import RoutingConfig
    from eagle.expert.ensemble import band_of, normal_ratios

    a = _meta("patchcore", 2.0, [1.0, 2.0, 1.6, 0.4], ["x", "y", "z", "w"])
    b = _meta("padim", 10.0, [9.0, 5.0, 8.0], ["y", "x", "z"])  # another order, and no "w"
    ratios = normal_ratios([a, b], "max")  # per name: x max(0.5, 0.5), y max(1.0, 0.9), z max(0.8, 0.8)
    assert sorted(ratios.tolist()) == pytest.approx([0.5, 0.8, 1.0])
    assert sorted(normal_ratios([a, b], "mean").tolist()) == pytest.approx([0.5, 0.8, 0.95])
    band = band_of([a, b], "max", RoutingConfig(policy="borderline", budget=1 / 3))  # 1 of 3: y, at 0 from 1
    assert band.threshold == 1.0 and band.low == pytest.approx(0.9) and band.high == pytest.approx(1.1)
    skipped = _meta("patchcore", 2.0, [1.0, 2.0], ["x", "y", "z"])  # a skipped image: names cannot be matched
    with pytest.raises(Exception, match="score_range"):
        normal_ratios([skipped, b], "max")
