"""Exact k-nearest-neighbour search over a memory bank, pruned with a PCA lower bound.

Brute force (anomalib's way) costs queries x bank x dims multiply-adds, more than the backbone once a bank
holds a few thousand rows. Projecting onto the bank's top principal directions V never lengthens a vector,
and the residual norms bound the rest, so with a = [(x - mean)V, |residual|]:

    ||q - b||^2  >=  ||a(q) - a(b)||^2        (a cheap distance in dims + 1)

Each query's best few rows by this bound get exact distances; the answer is certified exact when its k-th
distance does not exceed the bound of the first row left out, and the few uncertified queries fall back to
brute force. Results are therefore the brute-force results, whatever the data; only the speed depends on
how much of the bank's variance the projection holds.

On a GPU the bank is searched by a *certified low-precision shortlist* (`Shortlist`, the CUDA default): one
float16 (or bfloat16, TF32) matrix product ranks every bank row by a lower bound of its squared distance, the
best ``k + candidates`` rows are re-ranked exactly (float64 differences of the float32 vectors), and a query
is certified when its k-th exact distance is below the bound of the first row left out: then no row outside
the shortlist can be nearer, whatever the rounding. Why the bound holds: the inputs, centred on the bank's
mean (in float64: distances do not change) and scaled by a power of two to norms <= 1, are rounded to the low
precision with |x - x^| <= u|x| + eta per element (u the unit roundoff, eta the subnormal step); the product
of the rounded vectors then differs from q.b by at most

    (2u + u^2) |q||b| + 2(1 + u) sqrt(D) eta + D eta^2             (Cauchy-Schwarz on sum |q_i b_i|)

and the float32 accumulation and output rounding add (gamma_D + u_out) |q^||b^| + eta_out + D 2^-126, with
gamma_D = D u32 / (1 - D u32) (the last term: subnormal products flushed to zero, as CPU kernels do).
``|q|^2 + |b|^2 - 2 q^.b^`` less twice that, less the float32 rounding of the sum (8 u32 (|q^| + |b^|)^2),
is a lower bound of ||q - b||^2; every error term is doubled as a margin. It assumes the product accumulates
in float32 (cuBLAS with reduced-precision reductions off, which the search sets while it runs; torch's CPU
kernels for float16/bfloat16). An uncertified query (a near-tie across the shortlist's edge, a duplicated
row, a bank of very unequal norms) is searched again by a float64 shortlist with the same certificate at
float64 precision, and what that leaves (exact ties) by float64 brute force. The answer is therefore the
float64 nearest neighbour everywhere (ties to the lower bank index), with its distance rounded once to float32.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator

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


# The search a bank uses: 'auto' (CUDA: the float16 shortlist; CPU: the pruned search), 'exact' (CPU: the pruned
# search; CUDA: float32 brute force), or a shortlist precision.
SEARCH_MODES = ("auto", "exact", "float16", "bfloat16", "tf32")


class MemoryBank:
    """Bank rows (M, D) with the search ``mode`` chooses; ``search`` returns the exact nearest rows.

    On a GPU the PCA index is not used: it is many small gathers and launches there (on an H200 it held the
    expert to a sixth of its backbone's rate; BENCHMARKS.md); the certified shortlist (`Shortlist`) is the
    default there, float32 brute force with ``mode='exact'``."""

    def __init__(self, vectors: torch.Tensor, dims: int = 64, candidates: int = 4, mode: str = "auto") -> None:
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
        self.vectors = vectors
        self.sq = torch.linalg.vector_norm(vectors, dim=1).square_()
        self.candidates = candidates
        precision = "float16" if mode == "auto" and vectors.is_cuda else mode
        self.shortlist = Shortlist(vectors, precision, candidates) if precision in PRECISIONS else None
        self.pruned = self.shortlist is None and not vectors.is_cuda
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
        if self.shortlist is not None:
            return self.shortlist.search(query, k, exclude)
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


_U32, _U64 = 2.0**-24, 2.0**-53
# Shortlist precisions: (dtype the inputs are rounded to, unit roundoff u, subnormal step eta of that rounding,
# accumulation unit roundoff). 'tf32' rounds (truncates) float32 inputs to TF32's 10-bit mantissa itself, so
# the tensor cores see exact values; on a CPU the same product runs in float32.
PRECISIONS = {
    "float16": (torch.float16, 2.0**-11, 2.0**-25, _U32),
    "bfloat16": (torch.bfloat16, 2.0**-8, 2.0**-134, _U32),
    "tf32": (torch.float32, 2.0**-10, 2.0**-149, _U32),
    "float64": (torch.float64, 0.0, 0.0, _U64),  # the second try: the same certificate at float64
}
# Norms above this make float32 squared distances overflow: such queries go straight to float64.
_MAX_NORM = 2.0**60


@contextlib.contextmanager
def _full_precision_reductions() -> Iterator[None]:
    """cuBLAS may sum float16/bfloat16 products in reduced precision (split-K): the bound assumes float32."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction,
             matmul.allow_tf32)
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_tf32 = True  # 'tf32' only: its inputs are already TF32 values; float32/float64 products ignore it
    try:
        yield
    finally:
        (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction,
         matmul.allow_tf32) = saved


def _float32_output(vectors: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a float16 product can return float32 here (CUDA's ``mm(..., out_dtype=)``): one rounding less."""
    if not vectors.is_cuda:
        return False
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=vectors.device)
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _pow2_scale(norm: float) -> float:
    """A power of two s with norm * s <= 1 (exact to apply; at most 2^1000, so that it stays a float)."""
    return 2.0 ** min(1000, -math.ceil(math.log2(norm))) if norm > 0 else 1.0


def exact_sq(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, s) of each query (n, D) to its rows (n, s, D), float64 differences of the float32
    values (relative error below (D + 2) 2^-53)."""
    return (query.double().unsqueeze(1) - rows.double()).square_().sum(2)


def _ranked(sq: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row's squared distances and their indices, ties to the lower index."""
    index, order = index.sort(1)
    sq, by_dist = sq.gather(1, order).sort(dim=1, stable=True)
    return sq[:, :k], index.gather(1, by_dist)[:, :k]


class Shortlist:
    """The certified low-precision search (module docstring). ``counts`` tallies query rows by how they were
    answered: 'certified' (the low-precision shortlist), 'float64' (the float64 shortlist), 'brute' (float64
    brute force)."""

    chunk_elements = 1 << 24  # (queries x bank) elements of one low-precision product: ~64 MB of float32
    exact_elements = 1 << 22  # gathered float64 elements of one exact re-ranking

    def __init__(self, vectors: torch.Tensor, precision: str = "float16", candidates: int = 4) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown shortlist precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.vectors, self.precision, self.candidates = vectors, precision, candidates
        self.dtype, self.unit, self.tiny, self.acc = PRECISIONS[precision]
        if precision != "float64":  # the centred float64 values pass through float32 on their way: one rounding more
            self.unit, self.tiny = self.unit + 2 * _U32, self.tiny + 2.0**-149
        if vectors.is_cuda:
            self.chunk_elements, self.exact_elements = 1 << 27, 1 << 25
        self.work = torch.float64 if precision == "float64" else torch.float32  # the dtype bounds are summed in
        self.native_out = self.dtype in (torch.float32, torch.float64) or _float32_output(vectors, self.dtype)
        # Distances do not change when both sides move by the same vector: centred on the bank's mean (a float32
        # vector, subtracted in float64, exactly), the norms the bound grows with are the spread's, not the mean's.
        self.mean = vectors.mean(0).double() if vectors.numel() else vectors.new_zeros(vectors.shape[1]).double()
        centred = vectors.double() - self.mean
        norms = torch.linalg.vector_norm(centred, dim=1)
        self.norm_max = float(norms.max()) if norms.numel() else 0.0
        self.scale = _pow2_scale(self.norm_max)
        self.low = self._rounded(centred, self.scale)  # (M, D) the centred rows at the product's precision, scaled
        self.sq = norms.square().to(self.work)
        self.norm_hat = self._hat(norms, self.scale)
        self.counts: Counter[str] = Counter()
        self._next: Shortlist | None = None  # the float64 shortlist for uncertified queries, built when needed

    def _rounded(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x (float64) * scale rounded to the product's precision (power-of-two scaling is exact)."""
        if self.dtype == torch.float64:
            return x * scale
        x = (x * scale).float()
        if self.precision == "tf32":  # truncate to a 10-bit mantissa: |x - x^| < 2^-10 |x|
            return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
        return x.to(self.dtype)

    def _hat(self, norms: torch.Tensor, scale: float) -> torch.Tensor:
        """Upper bounds of the rounded rows' norms, unscaled: (1 + u)|x| + sqrt(D) eta / scale."""
        dim = self.vectors.shape[1]
        return ((1 + self.unit) * norms + math.sqrt(dim) * self.tiny / scale).to(self.work)

    def _constants(self, q_scale: float) -> tuple[float, float, float]:
        """(c1, c0, r): |dot error| <= c1 |q^||b^| + c0 (unscaled), sum rounding <= r (|q^| + |b^|)^2; x2 margin."""
        dim, u, eta, acc = self.vectors.shape[1], self.unit, self.tiny, self.acc
        gamma = dim * acc / (1 - dim * acc)
        u_out, eta_out = (0.0, 0.0) if self.native_out else (u, eta)  # a float16 result is rounded once more
        c1 = 2 * (2 * u + u * u + gamma + u_out * (1 + gamma))
        flush = dim * (2.0**-1022 if acc == _U64 else 2.0**-126)  # products or sums flushed to zero (FTZ)
        c0 = 2 * (2 * (1 + u) * math.sqrt(dim) * eta + dim * eta * eta + eta_out + flush) / (q_scale * self.scale)
        r = 16 * (_U64 if self.work == torch.float64 else _U32)
        return c1, c0, r

    def _product(self, q_low: torch.Tensor) -> torch.Tensor:
        if not self.native_out or self.dtype in (torch.float32, torch.float64):
            return (q_low @ self.low.T).to(self.work)
        return torch.mm(q_low, self.low.T, out_dtype=torch.float32)

    def centred(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries centred like the bank (float64) and their norms."""
        centred = query.double() - self.mean
        return centred, torch.linalg.vector_norm(centred, dim=1)

    def bounds(self, query: torch.Tensor, query_norms: torch.Tensor,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(key (n, M), query_term (n,)) for centred queries (`centred`): key + query_term (in float64) is a
        lower bound of every squared distance; the key alone ranks the rows. Norms below _MAX_NORM."""
        q_scale = _pow2_scale(float(query_norms.max()))
        c1, c0, r = self._constants(q_scale)
        q_hat = self._hat(query_norms, q_scale)
        bank_term = self.sq - r * self.norm_hat.square()
        if exclude is not None:
            bank_term = bank_term.masked_fill(exclude, float("inf"))
        # key = |b|^2 - 2 q^.b^ - 2 (c1 + r) |q^||b^| - r |b^|^2;  query_term = |q|^2 - r |q^|^2 - 2 c0
        key = self._product(self._rounded(query, q_scale)).mul_(-2 / (q_scale * self.scale))
        key.add_(bank_term).addr_(q_hat, self.norm_hat, alpha=-2 * (c1 + r))
        query_term = (query_norms.square().to(self.work) - r * q_hat.square() - 2 * c0).double()
        return key, query_term

    def search(self, query: torch.Tensor, k: int = 1,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (N, k, float32) and bank indices (N, k) of each query's k nearest rows, ascending; the
        float64 nearest rows, ties to the lower index."""
        rows_total = self.vectors.shape[0]
        available = rows_total - (int(exclude.sum()) if exclude is not None else 0)
        k = min(k, available)
        if k < 1:
            raise ValueError("memory bank has no rows to search")
        sq, index = self._search_sq(query, k, exclude)
        return sq.sqrt().float(), index

    def _search_sq(self, query: torch.Tensor, k: int,
                   exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = query.shape[0]
        sq = torch.empty(n, k, dtype=torch.float64, device=query.device)
        index = torch.empty(n, k, dtype=torch.long, device=query.device)
        available = self.vectors.shape[0] - (int(exclude.sum()) if exclude is not None else 0)
        size = k + self.candidates
        if size >= available or self.norm_max >= _MAX_NORM:
            return self._brute(query, k, exclude)
        unsure = []
        chunk = max(1, self.chunk_elements // self.vectors.shape[0])
        with _full_precision_reductions():
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                q = query[start:stop]
                centred, qn = self.centred(q)
                if float(qn.max()) >= _MAX_NORM:
                    unsure.append(torch.arange(start, stop, device=query.device))
                    continue
                key, query_term = self.bounds(centred, qn, exclude)
                del centred
                bound, cand = key.topk(size + 1, dim=1, largest=False)  # ascending
                edge = bound[:, -1].double() + query_term  # a lower bound of every row left out
                best, idx = self._rerank(q, cand[:, :size], k)
                ok = best[:, -1] * (1 + 4 * (q.shape[1] + 2) * _U64) < edge
                sq[start:stop], index[start:stop] = best, idx
                self.counts["certified" if self.precision != "float64" else "float64"] += int(ok.sum())
                if not bool(ok.all()):
                    unsure.append(start + (~ok).nonzero().squeeze(1))
        if unsure:
            rows = torch.cat(unsure)
            sq[rows], index[rows] = self._fallback(query[rows], k, exclude)
        return sq, index

    def _rerank(self, query: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact squared distances (float64) and indices of the k nearest among each query's candidates."""
        step = max(1, self.exact_elements // (cand.shape[1] * self.vectors.shape[1]))
        best, index = [], []
        for start in range(0, query.shape[0], step):
            c = cand[start:start + step]
            d, i = _ranked(exact_sq(query[start:start + step], self.vectors[c]), c, k)
            best.append(d)
            index.append(i)
        return torch.cat(best), torch.cat(index)

    def _fallback(self, query: torch.Tensor, k: int,
                  exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncertified queries: the float64 shortlist, then float64 brute force for what it leaves."""
        if self.precision == "float64":
            return self._brute(query, k, exclude)
        if self._next is None:
            self._next = Shortlist(self.vectors, "float64", self.candidates)
        before = Counter(self._next.counts)
        result = self._next._search_sq(query, k, exclude)
        after = self._next.counts
        for key in ("float64", "brute"):
            self.counts[key] += after[key] - before[key]
        return result

    def _brute(self, query: torch.Tensor, k: int,
               exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 differences against every bank row (exact ties to the lower index)."""
        self.counts["brute"] += query.shape[0]
        rows = self.vectors.shape[0]
        step = max(1, self.exact_elements // (rows * self.vectors.shape[1]))
        every = torch.arange(rows, device=query.device)
        best, index = [], []
        for start in range(0, query.shape[0], step):
            q = query[start:start + step]
            sq = exact_sq(q, self.vectors.unsqueeze(0).expand(q.shape[0], -1, -1))
            if exclude is not None:
                sq = sq.masked_fill(exclude, float("inf"))
            d, i = _ranked(sq, every.expand(q.shape[0], -1), k)
            best.append(d)
            index.append(i)
        return torch.cat(best), torch.cat(index)
