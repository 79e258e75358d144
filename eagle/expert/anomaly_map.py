"""Anomaly maps at each original image size: PatchCore's map generator (anomalib's ``AnomalyMapGenerator`` for
PatchCore), the Gaussian blur PaDiM shares, and `uncropped`, which takes every model's crop-sized maps back
through the pre-processor's resize and crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F  # noqa: N812

from eagle.expert.preprocess import crop_offset


class AnomalyMapGenerator:
    """Nearest upsampling to the crop, anomalib's Gaussian blur (sigma 4), back through crop and resize."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop
        self._blur_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def __call__(self, patch_maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Anomaly maps at each original (H, W): anomalib's map over the crop (nearest upsampling + Gaussian
        blur, sigma 4), mapped back through the crop and resize; the border outside the crop repeats the
        crop's edge values."""
        maps = F.interpolate(patch_maps.unsqueeze(1).float(), size=(self.crop, self.crop))  # (B, 1, crop, crop)
        return uncropped(self.blur(maps), self.resize, self.crop, sizes)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
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


def uncropped(maps: torch.Tensor, resize: int, crop: int, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Maps over the crop (B, 1, crop, crop) → (H, W) maps at each original size, back through the crop (the
    border outside it repeats the crop's edge values) and the resize."""
    top = crop_offset(resize, crop)
    bottom = resize - crop - top
    if top or bottom:
        maps = F.pad(maps, (top, bottom, top, bottom), mode="replicate")  # (B, 1, resize, resize)
    out = []
    for m, (height, width) in zip(maps, sizes, strict=True):
        if (height, width) != tuple(m.shape[-2:]):
            m = F.interpolate(m.unsqueeze(0), size=(height, width), mode="bilinear").squeeze(0)
        out.append(m[0])
    return out
