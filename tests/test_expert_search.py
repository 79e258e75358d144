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


# --------------------------------------------------------------------- the certified low-precision shortlist
# (the CUDA search; its products run here in float16/bfloat16 on the CPU, with the same bound)

def float64_nearest(query: torch.Tensor, bank: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    """Float64 brute force: squared distances of the float32 vectors' float64 differences, ties to the lower
    index; the distances rounded once to float32."""
    sq = (query.double().unsqueeze(1) - bank.double().unsqueeze(0)).square().sum(2)
    if exclude is not None:
        sq = sq.masked_fill(exclude, float("inf"))
    values, index = sq.sort(dim=1, stable=True)
    return values[:, :k].sqrt().float(), index[:, :k]


def adversarial(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank, queries) built to defeat a low-precision ranking."""
    g = torch.Generator().manual_seed(seed)
    base = low_rank(400, dim=128, seed=seed).abs()  # non-negative like ReLU features: |q.b| = |q||b| cos
    if kind == "near_ties":  # each row has 15 twins ~1e-6 (relative) away, more than a shortlist holds
        bank = torch.cat([base[:40]] + [base[:40] * (1 + 1e-6 * torch.randn(40, 128, generator=g))
                                        for _ in range(15)])
        query = base[:40] * (1 + 1e-6 * torch.randn(40, 128, generator=g))
    elif kind == "duplicates":  # every row 12 times: exact ties across the shortlist's edge
        bank = base[:100].repeat(12, 1)
        query = base[:100] + 0.01 * torch.randn(100, 128, generator=g)
    elif kind == "huge_norms":  # norms ~1e15 (squares near float32's range), and rows of very unequal norms
        bank = torch.cat([base * 1e15, base[:50] * 1e-3])
        query = torch.cat([base[:100] * 1e15 * (1 + 1e-4 * torch.randn(100, 128, generator=g)),
                           base[:20] * 1e-3])
    elif kind == "below_fp16":  # two far clusters; rows within one differ below float16's resolution of the
        # spread (2^-11 relative), so centring on the mean does not resolve them
        centres = torch.cat([base[:1], -base[:1]])
        spread = 1e-5 * float(centres.norm()) / 128**0.5
        bank = centres.repeat(300, 1) + spread * torch.randn(600, 128, generator=g)
        query = centres.repeat(50, 1) + spread * torch.randn(100, 128, generator=g)
    else:
        raise ValueError(kind)
    return bank.contiguous(), query.contiguous()


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind", ["near_ties", "duplicates", "huge_norms", "below_fp16"])
def test_shortlist_exact_on_adversarial_banks(kind: str, precision: str):
    bank, query = adversarial(kind)
    index = search.Shortlist(bank, precision)
    for k in (1, 3):
        dist, idx = index.search(query, k)
        ref_dist, ref_idx = float64_nearest(query, bank, k)
        assert torch.equal(idx, ref_idx), f"{kind}/{precision}/k={k}: a neighbour differs from float64"
        assert torch.equal(dist, ref_dist)  # bit for bit: the float64 distance rounded once
    fell_back = index.counts["float64"] + index.counts["brute"]
    if kind != "huge_norms" or precision == "float16":  # bfloat16 and TF32 have float32's exponent range
        assert fell_back > 0, f"{kind}/{precision}: nothing fell back ({dict(index.counts)})"
    assert sum(index.counts.values()) == 2 * query.shape[0]


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind", ["near_ties", "huge_norms", "below_fp16", "ordinary"])
def test_shortlist_bound_is_a_lower_bound(kind: str, precision: str):
    """The certificate's premise, pair by pair: key + query_term <= the float64 squared distance."""
    bank, query = (low_rank(1000), low_rank(200, seed=4)) if kind == "ordinary" else adversarial(kind)
    index = search.Shortlist(bank, precision)
    key, query_term = index.bounds(*index.centred(query))  # all queries at once, scaled together, as the search does
    lower = key.double() + query_term.unsqueeze(1)
    exact = (query.double().unsqueeze(1) - bank.double().unsqueeze(0)).square().sum(2)
    assert bool((lower <= exact).all())


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_shortlist_certifies_ordinary_queries(precision: str):
    """On patch-like data the low-precision shortlist answers almost every query itself."""
    vectors, query = low_rank(3000), low_rank(500, seed=1)
    index = search.Shortlist(vectors, precision)
    dist, idx = index.search(query, 1)
    ref_dist, ref_idx = float64_nearest(query, vectors, 1)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert index.counts["certified"] >= 0.95 * 500, dict(index.counts)
    # the answers are the float32 search's too, up to its rounding
    f32_dist, f32_idx = reference(query, vectors, 1)
    assert (idx == f32_idx).float().mean() > 0.99
    torch.testing.assert_close(dist, f32_dist, rtol=1e-4, atol=1e-4)


def test_shortlist_with_excluded_rows_and_large_k():
    vectors, query = low_rank(2000), low_rank(300, seed=3)
    exclude = torch.zeros(2000, dtype=torch.bool)
    exclude[float64_nearest(query, vectors, 1)[1][:, 0]] = True  # every query's nearest row is excluded
    index = search.Shortlist(vectors, "float16")
    for k in (1, 9):
        dist, idx = index.search(query, k, exclude)
        ref_dist, ref_idx = float64_nearest(query, vectors, k, exclude)
        assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist) and not exclude[idx].any()
    small = search.Shortlist(vectors[:6], "float16")  # fewer rows than the shortlist: float64 brute force
    dist, idx = small.search(vectors[:6], 9)
    assert idx.shape == (6, 6) and torch.equal(idx[:, 0], torch.arange(6))
    with pytest.raises(ValueError, match="no rows"):
        small.search(vectors[:6], 1, torch.ones(6, dtype=torch.bool))


def test_memory_bank_modes():
    vectors, query = low_rank(500), low_rank(50, seed=5)
    assert MemoryBank(vectors).pruned and MemoryBank(vectors).shortlist is None  # CPU default: pruned search
    bank = MemoryBank(vectors, mode="float16")
    assert bank.shortlist is not None and not bank.pruned
    dist, idx = bank.search(query, 3)
    assert torch.equal(idx, float64_nearest(query, vectors, 3)[1])
    assert bank.shortlist.counts["certified"] > 0
    with pytest.raises(ValueError, match="unknown search mode"):
        MemoryBank(vectors, mode="float8")


@pytest.mark.parametrize("scoring", ["anomalib", "mean_k"])
def test_patch_scores_same_with_shortlist(scoring: str):
    """PatchCore's scores on the shortlist search (the CUDA default) equal those on the exact CPU search."""
    from eagle.expert.scoring import patch_scores

    vectors = low_rank(2000).abs()
    embedding = low_rank(4 * 64, seed=7).abs().reshape(4, 64, -1)
    exact = patch_scores(embedding, MemoryBank(vectors), scoring, 9, 5)
    short = patch_scores(embedding, MemoryBank(vectors, mode="float16"), scoring, 9, 5)
    for a, b in zip(exact, short, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind", ["near_ties", "duplicates", "huge_norms", "below_fp16", "ordinary"])
def test_shortlist_on_cuda(kind: str, precision: str):
    """The certificate's premise on cuBLAS (float32 accumulation, TF32 tensor cores): exact on every bank."""
    bank, query = (low_rank(3000), low_rank(500, seed=1)) if kind == "ordinary" else adversarial(kind)
    index = search.Shortlist(bank.cuda(), precision)
    assert index.native_out  # float16/bfloat16 products return float32 there
    key, query_term = index.bounds(*index.centred(query.cuda()))
    exact = (query.double().unsqueeze(1) - bank.double().unsqueeze(0)).square().sum(2)
    assert bool(((key.double() + query_term.unsqueeze(1)).cpu() <= exact).all())
    for k in (1, 3):
        dist, idx = index.search(query.cuda(), k)
        ref_dist, ref_idx = float64_nearest(query, bank, k)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)
    if kind == "ordinary":
        assert index.counts["certified"] >= 0.95 * 2 * 500
    assert MemoryBank(bank.cuda()).shortlist is not None  # the CUDA default
