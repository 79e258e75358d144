"""A fitted expert as the pipeline uses it: a model (`eagle.expert.experts.ExpertModel`) loaded from its
artifact; numpy images in, score + anomaly maps out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eagle.config import ExpertConfig, StorageConfig
from eagle.expert.artifact import ArtifactError, ExpertArtifact
from eagle.expert.backbone import DTYPES, fingerprint
from eagle.expert.experts import ExpertModel, model_class, model_name


@dataclass(frozen=True)
class ExpertResult:
    """One scored image. anomaly_map: float32 (H, W) at the original size; patch_map: float32 (h, w) grid."""

    score: float
    anomaly_map: np.ndarray
    patch_map: np.ndarray


class Expert:
    """Scores batches of HxWx3 uint8 RGB images with a fitted model (any registered `ExpertModel`)."""

    def __init__(self, model: ExpertModel) -> None:
        self.model = model

    @classmethod
    def from_artifact(cls, art: ExpertArtifact, device: str = "cpu", dtype: str = "float32",
                      storage: StorageConfig | None = None, search: str = "auto") -> Expert:
        """Rebuild the model the artifact names (its meta's model, PatchCore when absent) on the backbone it was
        fitted with (refusing different weights) and load its tensors.

        ``dtype`` applies to the backbone; distances and statistics stay float32. ``search``: PatchCore's
        nearest-neighbour search (`eagle.expert.search.SEARCH_MODES`; every mode finds the exact neighbours).
        """
        cfg = ExpertConfig.from_record(art.meta["expert"])
        cfg.patchcore.search = search  # the job's choice, not the fit's: it never changes results
        model = model_class(model_name(art.meta)).from_config(cfg, storage, art.tensors)
        expected = art.meta["backbone"]["fingerprint"]
        actual = fingerprint(model.backbone)
        if actual != expected:
            raise ArtifactError(
                f"backbone {cfg.backbone!r} with weights {cfg.weights!r} differs from the one artifact {art.uri} "
                f"was fitted with (fingerprint {actual[:12]} != {expected[:12]}): different timm/anomalib "
                "version, cache or checkpoint; refit or restore the original weights")
        model = model.to(device)
        model.set_dtype(DTYPES[dtype])
        return cls(model)

    def score(self, images: Sequence[np.ndarray]) -> list[ExpertResult]:
        """Scores and anomaly maps for a batch of images of any sizes, in one backbone pass."""
        if not images:
            return []
        return self._scored(self.model.preprocess(images), [img.shape[:2] for img in images])

    def score_inputs(self, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[ExpertResult]:
        """The same from `model_input` copies (made where the images were decoded) and the original (H, W) sizes,
        which the anomaly maps come back at."""
        if not inputs:
            return []
        return self._scored(self.model.preprocessor.normalise(inputs, self.model.device, self.model.dtype), sizes)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """The small uint8 copy of `image` that `score_inputs` takes."""
        return self.model.preprocessor.model_input(image)

    def _scored(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[ExpertResult]:
        scores, patch_maps, maps = self.model.predict(batch, sizes)
        scores_np, patch_np = scores.float().cpu().numpy(), patch_maps.float().cpu().numpy()
        return [ExpertResult(score=float(s), anomaly_map=m, patch_map=p)
                for s, m, p in zip(scores_np, _on_host(maps), patch_np, strict=True)]


def _on_host(maps: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Float32 numpy copies of the maps: from a GPU in one copy for the batch (a copy per map would wait for
    the device each time); on the CPU without copying."""
    if not maps or maps[0].device.type == "cpu":
        return [m.float().numpy() for m in maps]
    flat = torch.cat([m.float().flatten() for m in maps]).cpu().numpy()
    ends = np.cumsum([m.numel() for m in maps])
    return [part.reshape(m.shape) for part, m in zip(np.split(flat, ends[:-1]), maps, strict=True)]
