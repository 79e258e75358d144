"""Ground truth from an MVTec-AD-layout root: which test images exist, their defect type and mask.

Labels come from folder names (``{product}/test/good`` normal, any other ``test/{defect}`` defective, the folder
name being the defect type), masks from ``{product}/ground_truth/{defect}/{stem}_mask.png``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from eagle.config import IMAGE_EXTENSIONS, StorageConfig
from eagle.io import storage

NORMAL = "good"


@dataclass(frozen=True)
class Truth:
    """One test image of the data root."""

    path: str  # relative to the root: {product}/test/{defect}/{name}
    product: str
    defect: str
    mask_uri: str | None  # None for normal images and defective ones without a mask file

    @property
    def anomalous(self) -> bool:
        return self.defect != NORMAL


def relative_path(uri: str, root: str) -> str | None:
    """`uri`'s path below `root` (schemes stripped, so local paths, ``file://`` and ``s3://`` all work)."""
    base, path = storage.strip_scheme(root).rstrip("/"), storage.strip_scheme(uri)
    return path[len(base) + 1:] if path.startswith(base + "/") else None


def load_ground_truth(root: str, cfg: StorageConfig | None = None) -> dict[str, Truth]:
    """Every test image under an MVTec-AD-layout root, by path relative to the root."""
    files = [relative_path(f.uri, root) for f in storage.list_files(root, IMAGE_EXTENSIONS, cfg)]
    masks = {p for p in files if p and p.split("/")[1:2] == ["ground_truth"]}
    truths = {}
    for path in files:
        parts = path.split("/") if path else []
        if len(parts) != 4 or parts[1] != "test":
            continue
        product, _, defect, name = parts
        mask = f"{product}/ground_truth/{defect}/{posixpath.splitext(name)[0]}_mask.png"
        has_mask = defect != NORMAL and mask in masks
        truths[path] = Truth(path, product, defect, storage.join(root, mask) if has_mask else None)
    return truths
