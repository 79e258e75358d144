"""Coreset sampler: exact shortcut, reproducible, coverage as good as anomalib's KCenterGreedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eagle.expert.coreset import greedy_coreset


def clustered(n: int = 4000, dim: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, dim, generator=g) * 3
    spread = torch.rand(n, 1, generator=g)  # clusters of uneven width, like patch features
    return centers[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, dim, generator=g) * spread


def coverage(x: torch.Tensor, idx: torch.Tensor) -> float:
    """Largest distance from any row to its nearest coreset row."""
    return float(torch.cdist(x, x[idx]).min(1).values.max())


def test_candidate_shortcut_picks_exactly_what_full_greedy_picks():
    x = clustered(3000, 64)
    full = greedy_coreset(x, 300, projection_dim=32, candidates=3000)  # every row a candidate: plain greedy
    for small in (64, 500):  # many refreshes / a few
        assert torch.equal(greedy_coreset(x, 300, projection_dim=32, candidates=small), full)


def test_seeded_reproducible_unique_and_greedy_ordered():
    x = clustered(2000, 128)
    a, b = greedy_coreset(x, 200, seed=3), greedy_coreset(x, 200, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy_coreset(x, 200, seed=4))
    assert len(set(a.tolist())) == 200 and int(a.min()) >= 0 and int(a.max()) < 2000
    # greedy: coverage shrinks as the coreset grows along the selection order
    assert coverage(x, a[:50]) > coverage(x, a[:100]) > coverage(x, a)


@pytest.mark.parametrize("seed", [0, 1])
def test_coverage_within_5_percent_of_anomalib(seed):
    from anomalib.models.components import KCenterGreedy

    x = clustered(seed=seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # KCenterGreedy draws from the global RNGs
    reference = torch.tensor(KCenterGreedy(x, sampling_ratio=0.1).select_coreset_idxs())
    ours = greedy_coreset(x, len(reference), seed=seed)
    assert coverage(x, ours) <= 1.05 * coverage(x, reference)


def test_size_validated():
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(torch.randn(10, 4), 11)
