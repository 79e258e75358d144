"""PatchCore in plain PyTorch on anomalib's components: preprocessing, patch embedding, scoring, anomaly maps.

Embedding and scoring follow anomalib's ``PatchcoreModel`` by default (3x3 average-pooled layer features,
deeper layers bilinearly resized to the first one's grid and concatenated; nearest-neighbour patch
distances; re-weighted image score), so its scores match anomalib's on the same memory bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF  # noqa: N812
from torch import nn
from torch.nn import functional as F  # noqa: N812

from eagle.expert.scoring import patch_scores
from eagle.expert.search import MemoryBank

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_offset(resize: int, crop: int) -> int:
    """Top/left offset of the center crop inside the resized image (as torchvision's ``center_crop``)."""
    return int(round((resize - crop) / 2.0))


class PatchCore(nn.Module):
    """Backbone + patch embedding + memory bank. ``forward`` takes preprocessed images (B, 3, crop, crop).

    projection_dim: optional channel reduction of each patch vector, as the PatchCore paper's code does it
    (each layer average-pooled over channels to ``projection_dim``, then the layers pooled together to
    ``projection_dim``); None keeps anomalib's concatenation (1536 dims for WRN50 layer2+layer3).
    """

    def __init__(self, extractor: nn.Module, layers: Sequence[str], resize: int = 256, crop: int = 224,
                 patch_size: int = 3, projection_dim: int | None = None, scoring: str = "anomalib",
                 num_neighbors: int = 9, k: int = 5, memory_bank: torch.Tensor | None = None) -> None:
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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self._bank: tuple[tuple[int, tuple[int, ...], torch.device], MemoryBank] | None = None
        self._blur_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.extractor.parameters()).dtype

    @property
    def bank(self) -> MemoryBank:
        """The search index over ``memory_bank``, rebuilt whenever the buffer is replaced or moved."""
        key = (self.memory_bank.data_ptr(), tuple(self.memory_bank.shape), self.memory_bank.device)
        if self._bank is None or self._bank[0] != key:
            self._bank = (key, MemoryBank(self.memory_bank))
        return self._bank[1]

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays → (B, 3, crop, crop) normalised backbone input, on the model's device.

        Each image is resized to resize x resize (aspect ratio not kept, as anomalib's pre-processor) and
        center-cropped.
        """
        batch = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
            x = torch.from_numpy(np.require(image, requirements=("C", "W"))).to(self.device)
            x = x.permute(2, 0, 1).float() / 255
            x = TF.resize(x, [self.resize, self.resize], antialias=True)
            batch.append(TF.center_crop(x, [self.crop, self.crop]))
        return ((torch.stack(batch) - self.mean) / self.std).to(self.dtype)

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

    @torch.inference_mode()
    def anomaly_maps(self, patch_maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Anomaly maps at each original (H, W): anomalib's map over the crop (nearest upsampling + Gaussian
        blur, sigma 4), mapped back through the crop and resize; the border outside the crop repeats the
        crop's edge values."""
        maps = F.interpolate(patch_maps.unsqueeze(1).float(), size=(self.crop, self.crop))  # (B, 1, crop, crop)
        maps = self._blur(maps)
        top = crop_offset(self.resize, self.crop)
        bottom = self.resize - self.crop - top
        if top or bottom:
            maps = F.pad(maps, (top, bottom, top, bottom), mode="replicate")  # (B, 1, resize, resize)
        out = []
        for m, (height, width) in zip(maps, sizes, strict=True):
            if (height, width) != tuple(m.shape[-2:]):
                m = F.interpolate(m.unsqueeze(0), size=(height, width), mode="bilinear").squeeze(0)
            out.append(m[0])
        return out

    def _blur(self, maps: torch.Tensor) -> torch.Tensor:
        """anomalib's Gaussian blur (its kernel and reflect padding) applied as two 1-D passes: the 33x33
        kernel is an outer product, and one 2-D pass costs ~25 ms per map on a CPU core."""
        if self._blur_rows is None or self._blur_rows[0].device != maps.device:
            from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator

            kernel = AnomalyMapGenerator().blur.kernel[0, 0].to(maps.device)  # (K, K), normalised
            self._blur_rows = kernel.sum(1).view(1, 1, -1, 1), kernel.sum(0).view(1, 1, 1, -1)
        rows, cols = self._blur_rows
        pad = rows.shape[2] // 2
        maps = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(F.conv2d(maps, rows), cols)
