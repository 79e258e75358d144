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
    classify,
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
