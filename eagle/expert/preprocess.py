"""The expert's pre-processor: images as the backbone wants them (anomalib's PreProcessor for PatchCore)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF  # noqa: N812

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_offset(resize: int, crop: int) -> int:
    """Top/left offset of the center crop inside the resized image (as torchvision's ``center_crop``)."""
    return int(round((resize - crop) / 2.0))


class PreProcessor:
    """Resize to resize x resize (aspect ratio not kept, as anomalib's pre-processor), center-crop, normalise."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, images: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays → (B, 3, crop, crop) normalised backbone input."""
        batch = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
            x = torch.from_numpy(np.require(image, requirements=("C", "W"))).to(device)
            x = x.permute(2, 0, 1).float() / 255
            x = TF.resize(x, [self.resize, self.resize], antialias=True)
            batch.append(TF.center_crop(x, [self.crop, self.crop]))
        mean, std = self.mean.to(device), self.std.to(device)
        return ((torch.stack(batch) - mean) / std).to(dtype)
