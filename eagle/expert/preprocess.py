"""Every expert model's pre-processor: images as the backbone wants them (as anomalib's ``PreProcessor``).

Two halves, so the heavy one can run where the pixels are: `model_input` (resize and crop, as uint8: what a CPU
decode task sends on, crop x crop x 3 bytes instead of the whole image) and `PreProcessor.normalise` (on the
expert's device). `PreProcessor.__call__` does both, in float throughout, for fitting and direct scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF  # noqa: N812

from eagle.config.backbones import IMAGENET_MEAN, IMAGENET_STD

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per RGB channel, on [0, 1] pixels


def crop_offset(resize: int, crop: int) -> int:
    """Top/left offset of the center crop inside the resized image (as torchvision's ``center_crop``)."""
    return int(round((resize - crop) / 2.0))


class PreProcessor:
    """Resize to resize x resize (aspect ratio not kept, as anomalib's pre-processor), center-crop, normalise
    with the backbone's (mean, std) (`eagle.expert.backbone.normalisation`; ImageNet's by default)."""

    def __init__(self, resize: int, crop: int, normalisation: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> None:
        self.resize, self.crop = resize, crop
        self.mean = torch.tensor(normalisation[0]).view(3, 1, 1)
        self.std = torch.tensor(normalisation[1]).view(3, 1, 1)

    def _resized(self, image: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """(3, crop, crop) float in [0, 1]."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
        x = torch.from_numpy(np.require(image, requirements=("C", "W"))).to(device)
        x = x.permute(2, 0, 1).float() / 255
        x = TF.resize(x, [self.resize, self.resize], antialias=True)
        return TF.center_crop(x, [self.crop, self.crop])

    def __call__(self, images: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays → (B, 3, crop, crop) normalised backbone input."""
        return self._normalised(torch.stack([self._resized(image, device) for image in images]), device, dtype)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 image resized and cropped as `__call__` does, rounded to uint8 (crop x crop x 3): the
        small copy a decode task sends to the expert (rounding moves pixels by at most 0.5/255)."""
        x = self._resized(image, "cpu")
        return (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()

    def normalise(self, inputs: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`model_input` arrays → (B, 3, crop, crop) normalised backbone input."""
        for x in inputs:
            if x.shape != (self.crop, self.crop, 3) or x.dtype != np.uint8:
                raise ValueError(f"expected a {self.crop}x{self.crop}x3 uint8 model input, got {x.dtype} {x.shape}")
        host = torch.from_numpy(np.stack(inputs))
        if torch.device(device).type == "cuda":  # page-locked: the copy runs asynchronously, as uint8 (4x smaller)
            host = host.pin_memory()
        batch = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        return self._normalised(batch, device, dtype)

    def _normalised(self, batch: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        mean, std = self.mean.to(device), self.std.to(device)
        return ((batch - mean) / std).to(dtype)
