"""Ground truth from a dataset root in any layout `eagle.io.layouts` reads: which test images exist, their
defect type and masks.

MVTec AD: labels from folder names (``{product}/test/good`` normal, any other ``test/{defect}`` defective, the
folder name being the defect type), masks from ``{product}/ground_truth/{defect}/{stem}_mask.png``; the other
layouts (MVTec AD 2's ``test_public``, LOCO's per-image mask folders, VisA's split CSV, ...) as that module says.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from eagle.config import StorageConfig
from eagle.io import storage
from eagle.io.layouts import NORMAL, load_samples


@dataclass(frozen=True)
class Truth:
    """One test image of the data root."""

    path: str  # relative to the root, e.g. {product}/test/{defect}/{name}
    product: str
    defect: str
    masks: tuple[str, ...] = ()  # none for normal images and defective ones without a mask; LOCO: several

    def __post_init__(self) -> None:  # one mask URI, or None, as before layouts had several masks per image
        if not isinstance(self.masks, tuple):
            object.__setattr__(self, "masks", (self.masks,) if self.masks else ())

    @property
    def anomalous(self) -> bool:
        return self.defect != NORMAL

    @property
    def mask_uri(self) -> str | None:
        """The first mask (whether there is one; `read_mask` unites them all)."""
        return self.masks[0] if self.masks else None


def read_mask(truth: Truth, cfg: StorageConfig | None = None) -> np.ndarray | None:
    """The union of a test image's masks (bool, at the first mask's size), or None without one."""
    union = None
    for uri in truth.masks:
        mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri, cfg))).convert("L")) > 0
        union = mask if union is None else union | (mask if mask.shape == union.shape else cv2.resize(
            mask.astype(np.uint8), union.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0)
    return union


def relative_path(uri: str, root: str) -> str | None:
    """`uri`'s path below `root` (schemes stripped, so local paths, ``file://`` and ``s3://`` all work)."""
    base, path = storage.strip_scheme(root).rstrip("/"), storage.strip_scheme(uri)
    return path[len(base) + 1:] if path.startswith(base + "/") else None


def load_ground_truth(root: str, cfg: StorageConfig | None = None, layout: str | None = None) -> dict[str, Truth]:
    """Every test image under a dataset root (layout detected unless given), by path relative to the root."""
    _, samples = load_samples(root, layout, cfg)
    truths = {}
    for s in samples:
        path = relative_path(s.uri, root)
        if s.split == "test" and path:
            truths[path] = Truth(path, s.product, s.defect, s.masks if s.anomalous else ())
    return truths
