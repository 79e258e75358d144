"""PatchCore in plain PyTorch on anomalib's components: patch embedding and scoring against the memory bank,
with its pre-processor (`preprocess.py`) and anomaly-map generator (`anomaly_map.py`) as objects of their own;
fitted by a coreset of the training patches (`coreset.py`) and thresholded by TGPS (`threshold.py`).

Embedding and scoring follow anomalib's ``PatchcoreModel`` by default (3x3 average-pooled layer features,
deeper layers bilinearly resized to the first one's grid and concatenated; nearest-neighbour patch
distances; re-weighted image score), so its scores match anomalib's on the same memory bank.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from eagle.config import ExpertConfig, JobConfig, StorageConfig
from eagle.config.hashing import fit_view, without_unset_later_fields
from eagle.expert.anomaly_map import AnomalyMapGenerator
from eagle.expert.backbone import DTYPES, build_extractor, fingerprint, normalisation
from eagle.expert.coreset import greedy_coreset
from eagle.expert.experts import FitResult
from eagle.expert.preprocess import IMAGENET_MEAN, IMAGENET_STD, Normalisation, PreProcessor
from eagle.expert.scoring import patch_scores
from eagle.expert.search import MemoryBank
from eagle.expert.threshold import fit_threshold, leave_own_out_scores
from eagle.expert.training import provenance


class PatchCore(nn.Module):
    """Backbone + patch embedding + memory bank (`eagle.expert.experts.ExpertModel`). ``forward`` takes
    preprocessed images (B, 3, crop, crop).

    projection_dim: optional channel reduction of each patch vector, as the PatchCore paper's code does it
    (each layer average-pooled over channels to ``projection_dim``, then the layers pooled together to
    ``projection_dim``); None keeps anomalib's concatenation (1536 dims for WRN50 layer2+layer3).
    """

    name = "patchcore"
    threshold_rule = "TGPS: unselected patches against the bank without their image's rows"

    def __init__(self, extractor: nn.Module, layers: Sequence[str], resize: int = 256, crop: int = 224,
                 patch_size: int = 3, projection_dim: int | None = None, scoring: str = "anomalib",
                 num_neighbors: int = 9, k: int = 5, memory_bank: torch.Tensor | None = None,
                 coreset_indices: torch.Tensor | None = None,
                 normalisation: Normalisation = (IMAGENET_MEAN, IMAGENET_STD), search_mode: str = "auto") -> None:
        super().__init__()
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        self.extractor = extractor.to(memory_format=torch.channels_last)  # ~8% faster convolutions on CPU
        self.layers = list(layers)
        self.resize, self.crop = resize, crop
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.scoring, self.num_neighbors, self.k = scoring, num_neighbors, k
        self.memory_bank: torch.Tensor
        self.register_buffer("memory_bank", torch.empty(0) if memory_bank is None else memory_bank.float())
        self.coreset_indices: torch.Tensor  # which training patches the bank kept
        self.register_buffer("coreset_indices",
                             torch.empty(0, dtype=torch.long) if coreset_indices is None else coreset_indices)
        self.preprocessor = PreProcessor(resize, crop, normalisation)
        self.map_generator = AnomalyMapGenerator(resize, crop)
        self._bank: tuple[tuple[int, tuple[int, ...], torch.device, str], MemoryBank] | None = None
        self.search_mode = search_mode  # eagle.expert.search.SEARCH_MODES; the job's expert.patchcore.search

    @classmethod
    def from_config(cls, cfg: ExpertConfig, storage: StorageConfig | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> PatchCore:
        """A PatchCore (CPU, float32, eval) as the expert config describes it, with an artifact's memory bank."""
        opts, tensors = cfg.patchcore, tensors or {}
        extractor = build_extractor(cfg.backbone, cfg.layers, cfg.weights, cfg.seed, storage)
        return cls(extractor, cfg.layers, resize=cfg.resize, crop=cfg.crop, patch_size=opts.patch_size,
                   projection_dim=opts.projection_dim, scoring=opts.scoring, num_neighbors=opts.num_neighbors,
                   k=opts.k, memory_bank=tensors.get("memory_bank"), coreset_indices=tensors.get("coreset_indices"),
                   normalisation=normalisation(cfg.backbone), search_mode=opts.search).eval()

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu", batch_size: int = 8,
            names: Sequence[str] | None = None) -> FitResult:
        """Memory bank (coreset of all training patches) and label-free threshold (TGPS) from normal images only.
        ``names`` are not needed: the threshold uses no folds."""
        cfg = fit_view(cfg, cls.name)
        ecfg, opts, start = cfg.expert, cfg.expert.patchcore, time.perf_counter()
        model = cls.from_config(ecfg, cfg.storage)
        weights_fingerprint = fingerprint(model.backbone)
        model = model.to(device)
        model.set_dtype(DTYPES[ecfg.resolved_dtype(device)])
        embeddings = torch.cat([model.embed(model.preprocess(images[i:i + batch_size]))
                                for i in range(0, len(images), batch_size)])  # (N, h, w, D)
        n_images, grid_h, grid_w, dim = embeddings.shape
        flat = embeddings.reshape(-1, dim)
        t_embed = time.perf_counter()

        size = max(1, int(flat.shape[0] * opts.coreset_ratio))
        model.coreset_indices = greedy_coreset(flat, size, opts.coreset_projection_dim, seed=ecfg.seed)
        model.memory_bank = flat[model.coreset_indices]
        t_coreset = time.perf_counter()
        index = MemoryBank(model.memory_bank)

        def score_image(query: torch.Tensor, exclude: torch.Tensor) -> float:
            image, _ = patch_scores(query.unsqueeze(0), index, opts.scoring, opts.num_neighbors, opts.k, exclude)
            return float(image[0])

        scores, skipped = leave_own_out_scores(embeddings.reshape(n_images, grid_h * grid_w, dim),
                                               model.coreset_indices, score_image,
                                               cfg.threshold.min_unselected_patches)
        threshold = fit_threshold(scores, skipped, cfg.threshold)
        t_threshold = time.perf_counter()

        recorded = {k: v for k, v in ecfg.record().items() if k != "search"}
        meta = {
            "expert": without_unset_later_fields("expert", recorded),
            "threshold": {**threshold.as_dict(),
                          "config": without_unset_later_fields("threshold", cfg.threshold.model_dump(mode="json"))},
            "backbone": {"name": ecfg.backbone, "layers": list(ecfg.layers), "weights": ecfg.weights,
                         "fingerprint": weights_fingerprint},
            "embedding": {**model.embedding_meta(), "resize": ecfg.resize, "crop": ecfg.crop},
            "coreset": {"method": "approximate greedy k-center", "ratio": opts.coreset_ratio, "size": size,
                        "total_patches": int(flat.shape[0]), "projection_dim": opts.coreset_projection_dim},
            "training": {"images": n_images},
            **provenance(cfg),
        }
        timings = {"embed": t_embed - start, "coreset": t_coreset - t_embed, "threshold": t_threshold - t_coreset}
        return FitResult(tensors=model.tensors(), meta=meta, threshold=threshold, timings=timings)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank.float().cpu(), "coreset_indices": self.coreset_indices.cpu()}

    def embedding_meta(self) -> dict[str, Any]:
        """Patch-vector dims and the patch grid (from one blank image)."""
        blank = torch.zeros(1, 3, self.crop, self.crop, device=self.device, dtype=self.dtype)
        return {"dim": int(self.memory_bank.shape[1]), "grid": list(self.embed(blank).shape[1:3])}

    @property
    def backbone(self) -> nn.Module:
        return self.extractor

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Backbone compute dtype; nearest-neighbour search stays float32."""
        self.extractor.to(dtype)

    @property
    def device(self) -> torch.device:
        return self.memory_bank.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.extractor.parameters()).dtype

    @property
    def bank(self) -> MemoryBank:
        """The search index over ``memory_bank``, rebuilt whenever the buffer is replaced or moved."""
        key = (self.memory_bank.data_ptr(), tuple(self.memory_bank.shape), self.memory_bank.device,
               self.search_mode)
        if self._bank is None or self._bank[0] != key:
            self._bank = (key, MemoryBank(self.memory_bank, mode=self.search_mode))
        return self._bank[1]

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays → (B, 3, crop, crop) backbone input on the model's device and dtype."""
        return self.preprocessor(images, self.device, self.dtype)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, h, w, D), float32, for preprocessed images (B, 3, crop, crop)."""
        features = self.extractor(batch.contiguous(memory_format=torch.channels_last))
        pooled = [self._neighbourhood_mean(features[layer]).float() for layer in self.layers]
        grid = pooled[0].shape[-2:]
        pooled = [pooled[0]] + [F.interpolate(f, size=grid, mode="bilinear") for f in pooled[1:]]
        if self.projection_dim is None:
            return torch.cat(pooled, 1).permute(0, 2, 3, 1)
        flat = [f.permute(0, 2, 3, 1).reshape(-1, 1, f.shape[1]) for f in pooled]  # (B*h*w, 1, C_l)
        per_layer = torch.cat([F.adaptive_avg_pool1d(f, self.projection_dim) for f in flat], 2)
        projected = F.adaptive_avg_pool1d(per_layer, self.projection_dim)  # (B*h*w, 1, d)
        return projected.reshape(batch.shape[0], *grid, self.projection_dim)

    def _neighbourhood_mean(self, feature: torch.Tensor) -> torch.Tensor:
        """anomalib's ``AvgPool2d(p, 1, p // 2)`` (zero padding counted) as a depthwise convolution: the same
        numbers up to rounding, ~5x faster on CPU."""
        channels, p = feature.shape[1], self.patch_size
        weight = torch.full((channels, 1, p, p), 1 / p**2, dtype=feature.dtype, device=feature.device)
        return F.conv2d(feature, weight, padding=p // 2, groups=channels)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and patch-score maps (B, h, w) for preprocessed images."""
        if self.memory_bank.numel() == 0:
            raise ValueError("memory bank is empty: fit the model first")
        embedding = self.embed(batch)
        b, h, w, d = embedding.shape
        image, patch = patch_scores(embedding.reshape(b, h * w, d), self.bank, self.scoring,
                                    self.num_neighbors, self.k)
        return image, patch.reshape(b, h, w)

    def anomaly_maps(self, patch_maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Anomaly maps (H, W) at each original size from patch-score maps (B, h, w)."""
        return self.map_generator(patch_maps, sizes)

    def predict(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Image scores (B,), patch maps (B, h, w) and anomaly maps (H, W) at each original size."""
        scores, patch_maps = self(batch)
        return scores, patch_maps, self.anomaly_maps(patch_maps, sizes)


MODEL = PatchCore
