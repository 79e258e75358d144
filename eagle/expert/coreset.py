"""Coreset selection that returns indices: approximate greedy k-center (PatchCore's sampler), made fast.

Greedy k-center picks, one at a time, the patch farthest from everything picked so far. As in the PatchCore
paper's approximate sampler, distances are taken in a low-dimensional Gaussian random projection and the
initial distances are the mean distance to a few random starting points. The speed-up over anomalib's
``KCenterGreedy`` (which updates all N distances per pick) comes from an exact shortcut: only the patches whose
current distance is among the ``candidates`` largest can be picked next, so picks update only those; the
other patches are brought up to date in one matrix product when the candidates' distances fall below the
largest stale one. The picks are the same as updating every patch every time.
"""

from __future__ import annotations

import math

import torch

_REFRESH_BLOCK = 512  # stale picks applied per matrix product in a refresh (bounds memory at N x 512)


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared distances (N, C) from rows of x (with precomputed squared norms) to centers (C, d)."""
    return torch.addmm(x_sq.unsqueeze(1), x, centers.T, alpha=-2).add_(centers.pow(2).sum(1)).clamp_min_(0)


def greedy_coreset(features: torch.Tensor, size: int, projection_dim: int = 128, starting_points: int = 10,
                   seed: int = 0, candidates: int = 2048) -> torch.Tensor:
    """Indices (size,) into the rows of `features` (N, D) chosen by approximate greedy k-center.

    Seeded and reproducible on a given device; the selection order is the greedy order. ``candidates`` only
    trades refresh cost against per-pick cost; the default (2048 x 128 floats = 1 MiB) stays in CPU cache.
    """
    n = features.shape[0]
    if not 0 < size <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {size}")
    device = features.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=gen, device=device) / math.sqrt(projection_dim)
        x = x @ proj
    x = x.contiguous()
    x_sq = x.pow(2).sum(1)
    starts = torch.randperm(n, generator=gen, device=device)[:starting_points]
    min_sq = _sq_dists(x, x_sq, x[starts]).sqrt_().mean(1).pow_(2)  # squared mean distance to the starts

    num_candidates = min(n, candidates)
    selected = torch.empty(size, dtype=torch.long, device=device)
    stale_from = 0  # picks from here on are not yet applied to the non-candidates
    cand = cand_x = cand_sq = cand_min = None
    bound = torch.tensor(float("inf"), device=device)
    for i in range(size):
        if cand is None or cand_min.max() < bound:
            if cand is not None:  # refresh: write back candidates, apply the stale picks to every patch
                min_sq[cand] = cand_min
                for start in range(stale_from, i, _REFRESH_BLOCK):
                    picks = x[selected[start:min(i, start + _REFRESH_BLOCK)]]
                    torch.minimum(min_sq, _sq_dists(x, x_sq, picks).amin(1), out=min_sq)
                stale_from = i
            top = torch.topk(min_sq, num_candidates)
            cand, cand_min = top.indices, top.values.clone()
            cand_x, cand_sq = x[cand], x_sq[cand]
            # Non-candidates are <= bound (when all of N are candidates, nothing is outside: -inf).
            bound = cand_min[-1] if num_candidates < n else torch.tensor(float("-inf"), device=device)
        j = int(cand_min.argmax())
        selected[i] = cand[j]
        pick = cand_x[j:j + 1]
        cand_min = torch.minimum(cand_min, _sq_dists(cand_x, cand_sq, pick).squeeze(1))
        cand_min[j] = -1.0  # picked: never again
    return selected
