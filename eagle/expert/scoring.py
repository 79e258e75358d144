"""PatchCore scoring as pure tensor functions: nearest-neighbour patch distances and image scores.

The default (`anomalib_image_score`) reproduces anomalib's ``PatchcoreModel.compute_anomaly_score``; every
function takes an optional ``exclude`` mask over memory-bank rows so that the label-free threshold can score
a training image against the bank without that image's own patches (see ``eagle.threshold``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

# Rows of the (queries x bank) distance matrix computed at once: bounds memory at ~64 MB of float32.
_MAX_CHUNK_ELEMENTS = 1 << 24


def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (N, k) and bank indices (N, k) of the k nearest bank rows to each query row.

    Brute force like anomalib, but with one fused ``addmm`` per chunk and the square root taken only on the
    k winners. ``exclude`` (bool, one per bank row) removes rows from the search.
    """
    bank_sq = bank.pow(2).sum(1)
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))
    k = min(k, int(bank.shape[0] - (int(exclude.sum()) if exclude is not None else 0)))
    if k < 1:
        raise ValueError("memory bank has no rows to search")
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, bank.shape[0]))
    dists, idxs = [], []
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        partial = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, alpha=-2)  # ||b||^2 - 2 q.b   (n, M)
        if k == 1:
            d, i = partial.min(1, keepdim=True)
        else:
            d, i = partial.topk(k, dim=1, largest=False)
        dists.append(d.add_(q.pow(2).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def anomalib_image_score(patch_dist: torch.Tensor, nn_index: torch.Tensor, embedding: torch.Tensor,
                         bank: torch.Tensor, num_neighbors: int,
                         exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Image scores (B,) as anomalib's PatchCore: the largest patch distance, re-weighted by how isolated
    its nearest bank row is among that row's ``num_neighbors`` neighbours (PatchCore paper, eq. 7).

    patch_dist, nn_index: (B, P) nearest-neighbour distance and bank index per patch; embedding: (B, P, D).
    """
    if num_neighbors == 1:
        return patch_dist.amax(1)
    rows = torch.arange(patch_dist.shape[0], device=patch_dist.device)
    worst = patch_dist.argmax(1)  # m^test,* in the paper
    score = patch_dist[rows, worst]  # s^*
    nn_sample = bank[nn_index[rows, worst]]  # m^*
    _, support = nearest_neighbors(nn_sample, bank, num_neighbors, exclude)  # N_b(m^*)   (B, n)
    distances = torch.cdist(embedding[rows, worst].unsqueeze(1), bank[support]).squeeze(1)  # (B, n)
    weights = 1 - F.softmax(distances, 1)[:, 0]
    return weights * score


def patch_scores(embedding: torch.Tensor, bank: torch.Tensor, scoring: str, num_neighbors: int, k: int,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (B,) and per-patch scores (B, P) for an embedding (B, P, D).

    scoring: 'anomalib' (nearest-neighbour distance per patch, re-weighted image score) or 'mean_k' (the
    PatchCore paper's code: mean distance to the k nearest bank rows per patch, image score = max).
    """
    batch, num_patches, dim = embedding.shape
    flat = embedding.reshape(-1, dim)
    if scoring == "anomalib":
        dist, index = nearest_neighbors(flat, bank, 1, exclude)
        patch = dist.reshape(batch, num_patches)
        image = anomalib_image_score(patch, index.reshape(batch, num_patches), embedding, bank, num_neighbors,
                                     exclude)
        return image, patch
    if scoring == "mean_k":
        dist, _ = nearest_neighbors(flat, bank, k, exclude)
        patch = dist.mean(1).reshape(batch, num_patches)
        return patch.amax(1), patch
    raise ValueError(f"unknown scoring {scoring!r}; use 'anomalib' or 'mean_k'")
