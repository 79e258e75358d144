"""PatchCore scoring as pure tensor functions: nearest-neighbour patch distances and image scores.

The default (`anomalib_image_score`) reproduces anomalib's ``PatchcoreModel.compute_anomaly_score``, with
the exact search of ``eagle.expert.search`` in place of brute force. Every function takes an optional
``exclude`` mask over memory-bank rows so that the label-free threshold can score a training image against
the bank without that image's own patches (see ``eagle.expert.threshold``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from eagle.expert.search import MemoryBank


def anomalib_image_score(patch_dist: torch.Tensor, nn_index: torch.Tensor, embedding: torch.Tensor,
                         bank: MemoryBank, num_neighbors: int,
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
    nn_sample = bank.vectors[nn_index[rows, worst]]  # m^*
    _, support = bank.search(nn_sample, num_neighbors, exclude)  # N_b(m^*)   (B, n)
    distances = torch.cdist(embedding[rows, worst].unsqueeze(1), bank.vectors[support]).squeeze(1)  # (B, n)
    weights = 1 - F.softmax(distances, 1)[:, 0]
    return weights * score


def patch_scores(embedding: torch.Tensor, bank: MemoryBank, scoring: str, num_neighbors: int, k: int,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores (B,) and per-patch scores (B, P) for an embedding (B, P, D).

    scoring: 'anomalib' (nearest-neighbour distance per patch, re-weighted image score) or 'mean_k' (the
    PatchCore paper's code: mean distance to the k nearest bank rows per patch, image score = max).
    """
    batch, num_patches, dim = embedding.shape
    flat = embedding.reshape(-1, dim)
    if scoring == "anomalib":
        dist, index = bank.search(flat, 1, exclude)
        patch = dist.reshape(batch, num_patches)
        image = anomalib_image_score(patch, index.reshape(batch, num_patches), embedding, bank, num_neighbors,
                                     exclude)
        return image, patch
    if scoring == "mean_k":
        dist, _ = bank.search(flat, k, exclude)
        patch = dist.mean(1).reshape(batch, num_patches)
        return patch.amax(1), patch
    raise ValueError(f"unknown scoring {scoring!r}; use 'anomalib' or 'mean_k'")
