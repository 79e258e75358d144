"""Pruned nearest-neighbour search returns exactly what brute force returns, pruned or not."""

from __future__ import annotations

import pytest
import torch

from eagle.expert import search
from eagle.expert.search import MemoryBank


def low_rank(n: int, dim: int = 256, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows near a low-dimensional subspace, like CNN patch features: the bound prunes almost everything."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g)
    return torch.randn(n, rank, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


def reference(query: torch.Tensor, bank: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    dist = torch.cdist(query, bank)
    if exclude is not None:
        dist = dist.masked_fill(exclude, float("inf"))
    return dist.topk(k, dim=1, largest=False)


@pytest.fixture()
def fallback_rows(monkeypatch):
    """Counts the query rows that went to the brute-force fallback."""
    calls = []
    original = search.brute_force

    def counting(query, *args, **kwargs):
        calls.append(query.shape[0])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(search, "brute_force", counting)
    return calls


@pytest.mark.parametrize("kind", ["low_rank", "isotropic"])
@pytest.mark.parametrize("k", [1, 9])
def test_search_equals_brute_force(kind: str, k: int, fallback_rows):
    if kind == "low_rank":
        vectors, query = low_rank(3000), low_rank(500, seed=1)
    else:  # no structure: the bound is loose and most rows fall back
        g = torch.Generator().manual_seed(2)
        vectors, query = torch.randn(3000, 256, generator=g), torch.randn(500, 256, generator=g)
    bank = MemoryBank(vectors)
    dist, idx = bank.search(query, k)
    ref = reference(query, vectors, k)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(dist, ref.values, rtol=1e-4, atol=1e-4)
    pruned_share = 1 - sum(fallback_rows) / 500
    if k == 1:  # the hot path (one neighbour per patch): pruning works exactly where the data has structure
        assert pruned_share > 0.9 if kind == "low_rank" else pruned_share < 0.5


def test_search_with_excluded_rows():
    vectors, query = low_rank(2000), low_rank(300, seed=3)
    exclude = torch.zeros(2000, dtype=torch.bool)
    exclude[reference(query, vectors, 1).indices[:, 0]] = True  # every query's nearest row is excluded
    dist, idx = MemoryBank(vectors).search(query, 3, exclude)
    ref = reference(query, vectors, 3, exclude)
    assert torch.equal(idx, ref.indices) and not exclude[idx].any()
    torch.testing.assert_close(dist, ref.values, rtol=1e-4, atol=1e-4)


def test_small_bank_and_everything_excluded():
    vectors = low_rank(6)
    dist, idx = MemoryBank(vectors).search(vectors, 9)  # k larger than the bank: all rows, ascending
    assert idx.shape == (6, 6) and torch.equal(idx[:, 0], torch.arange(6))
    with pytest.raises(ValueError, match="no rows"):
        MemoryBank(vectors).search(vectors, 1, torch.ones(6, dtype=torch.bool))
