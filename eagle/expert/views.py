"""Test-time augmentation (``expert.tta``): an image scored as it is and in flipped views, the views' scores and
maps averaged. Flips keep the crop square and the patch grid aligned, so each view's maps are flipped back into
place; the threshold's training scores are averaged over the same views (`flipped_indices` for PatchCore's
unselected patches), so a product whose flipped images look abnormal raises its threshold instead of its
false alarms."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eagle.expert.experts import ExpertModel

# The dims of a (..., H, W) tensor that each view flips: as it is, horizontally, vertically, both.
VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": ((),), "flips": ((), (-1,), (-2,), (-2, -1))}


def flipped(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`x` flipped along `dims` (its own inverse); itself when there are none."""
    return x.flip(dims) if dims else x


def predict_views(model: ExpertModel, batch: torch.Tensor, sizes: Sequence[tuple[int, int]], tta: str = "none"
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`model.predict` averaged over the views of `tta`: image scores (B,), patch maps (B, h, w) and anomaly
    maps at each original size, each view's maps flipped back before averaging."""
    views = VIEWS[tta]
    if len(views) == 1:
        return model.predict(batch, sizes)
    scores, patch_maps, maps = [], [], []
    for dims in views:
        s, p, m = model.predict(flipped(batch, dims), sizes)
        scores.append(s)
        patch_maps.append(flipped(p, dims))
        maps.append([flipped(x, dims) for x in m])
    return (torch.stack(scores).mean(0), torch.stack(patch_maps).mean(0),
            [torch.stack(per_image).mean(0) for per_image in zip(*maps, strict=True)])


def flipped_indices(indices: torch.Tensor, grid: tuple[int, int], dims: tuple[int, ...]) -> torch.Tensor:
    """Flat patch indices (image * h * w + row * w + col) of a (h, w) grid moved to where `dims` flip them."""
    h, w = grid
    image, rest = indices // (h * w), indices % (h * w)
    row, col = rest // w, rest % w
    if -2 in dims:
        row = h - 1 - row
    if -1 in dims:
        col = w - 1 - col
    return image * h * w + row * w + col
