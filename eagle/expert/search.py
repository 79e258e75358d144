"""Exact k-nearest-neighbour search over a memory bank, pruned with a PCA lower bound.

Brute force (anomalib's way) costs queries x bank x dims multiply-adds, more than the backbone once a bank
holds a few thousand rows. Projecting onto the bank's top principal directions V never lengthens a vector,
and the residual norms bound the rest, so with a = [(x - mean)V, |residual|]:

    ||q - b||^2  >=  ||a(q) - a(b)||^2        (a cheap distance in dims + 1)

Each query's best few rows by this bound get exact distances; the answer is certified exact when its k-th
distance does not exceed the bound of the first row left out, and the few uncertified queries fall back to
brute force. Results are therefore the brute-force results, whatever the data; only the speed depends on
how much of the bank's variance the projection holds.
"""

from __future__ import annotations

import torch

# Rows of a (queries x bank) matrix computed at once: bounds memory at ~64 MB of float32.
MAX_CHUNK_ELEMENTS = 1 << 24
_SLACK = 1e-4  # relative margin on the certificate, for float rounding in the bound
_EXACT_CHUNK = 128  # queries whose candidate rows are gathered at once


def brute_force(query: torch.Tensor, bank: torch.Tensor, k: int = 1, exclude: torch.Tensor | None = None,
                bank_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (N, k) and indices (N, k) of the k nearest bank rows, by chunked fused ``addmm``;
    ``exclude`` (bool per bank row) removes rows from the search."""
    bank_sq = bank.pow(2).sum(1) if bank_sq is None else bank_sq
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, bank.shape[0]))
    dists, idxs = [], []
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        partial = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, alpha=-2)  # ||b||^2 - 2 q.b   (n, M)
        d, i = partial.min(1, keepdim=True) if k == 1 else partial.topk(k, dim=1, largest=False)
        dists.append(d.add_(q.pow(2).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


class MemoryBank:
    """Bank rows (M, D) with the PCA index; ``search`` returns exactly what brute force returns.

    On a GPU the index is not used: brute force there is a few large matrix products, which the GPU runs at
    full speed, while the pruned search is many small gathers and launches (on an H200 it held the expert to
    a sixth of its backbone's rate; BENCHMARKS.md)."""

    def __init__(self, vectors: torch.Tensor, dims: int = 64, candidates: int = 4) -> None:
        self.vectors = vectors
        self.sq = torch.linalg.vector_norm(vectors, dim=1).square_()
        self.candidates = candidates
        self.pruned = not vectors.is_cuda
        if self.pruned:
            self._index(dims)

    def _index(self, dims: int) -> None:
        vectors = self.vectors
        self.mean = vectors.mean(0)
        with torch.random.fork_rng():  # seeds every device: restore them all
            torch.manual_seed(0)  # pca_lowrank is randomised; any orthonormal basis keeps results exact
            _, _, basis = torch.pca_lowrank(vectors - self.mean, q=min(dims, *vectors.shape), center=False)
        self.basis = basis  # (D, d), orthonormal columns
        self.bound_vectors = self._bound_space(vectors, self.sq)  # (M, d + 1)
        self.bound_sq = self.bound_vectors.pow(2).sum(1)

    def _bound_space(self, x: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
        """[(x - mean)V, |residual|] without materialising x - mean (x_sq: squared row norms of x)."""
        proj = (x @ self.basis).sub_(self.mean @ self.basis)
        centered_sq = x_sq - 2 * (x @ self.mean) + self.mean.pow(2).sum()
        residual = (centered_sq - proj.pow(2).sum(1)).clamp_min_(0).sqrt_()
        return torch.cat([proj, residual.unsqueeze(1)], 1)

    def search(self, query: torch.Tensor, k: int = 1,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (N, k) and bank indices (N, k) of each query row's k nearest rows, ascending."""
        available = self.vectors.shape[0] - (int(exclude.sum()) if exclude is not None else 0)
        k = min(k, available)
        if k < 1:
            raise ValueError("memory bank has no rows to search")
        shortlist = k + self.candidates
        if not self.pruned or shortlist >= available:
            return brute_force(query, self.vectors, k, exclude, self.sq)
        bound_sq = self.bound_sq if exclude is None else self.bound_sq.masked_fill(exclude, float("inf"))
        query_sq = torch.linalg.vector_norm(query, dim=1).square_()
        query_bound = self._bound_space(query, query_sq)
        chunk = max(1, MAX_CHUNK_ELEMENTS // self.vectors.shape[0])
        dists, idxs = [], []
        for start in range(0, query.shape[0], chunk):
            stop = start + chunk
            bound = torch.addmm(bound_sq.unsqueeze(0), query_bound[start:stop], self.bound_vectors.T, alpha=-2)
            bound.add_(query_bound[start:stop].pow(2).sum(1, keepdim=True))  # squared lower bounds   (n, M)
            bound_top, cand = bound.topk(shortlist + 1, dim=1, largest=False)  # ascending
            best, index = self._exact(query[start:stop], query_sq[start:stop], cand[:, :shortlist], k)
            unsure = best[:, -1] > bound_top[:, -1] * (1 - _SLACK)
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                d, i = brute_force(query[start:stop][rows], self.vectors, k, exclude, self.sq)
                best[rows], index[rows] = d.pow(2), i
            dists.append(best.sqrt_())
            idxs.append(index)
        return torch.cat(dists), torch.cat(idxs)

    def _exact(self, query: torch.Tensor, query_sq: torch.Tensor, cand: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of the k nearest among each query's candidate rows, ascending."""
        best, index = [], []
        for start in range(0, query.shape[0], _EXACT_CHUNK):  # small blocks: gathered rows stay in cache
            c = cand[start:start + _EXACT_CHUNK]
            q = query[start:start + _EXACT_CHUNK]
            exact = torch.bmm(self.vectors[c], q.unsqueeze(2)).squeeze(2).mul_(-2)  # (n, shortlist)
            exact.add_(self.sq[c]).add_(query_sq[start:start + _EXACT_CHUNK].unsqueeze(1)).clamp_min_(0)
            d, order = exact.topk(k, dim=1, largest=False)
            best.append(d)
            index.append(c.gather(1, order))
        return torch.cat(best), torch.cat(index)
