"""STFPM on anomalib's ``STFPMModel``: a student network trained (anomalib's ``STFPMLoss``, its SGD settings) to
match the frozen teacher's features on normal images; anomalies are where they disagree (anomalib's map
generator: per-layer normalised feature distance, upsampled, multiplied; image score = the map's max).

The teacher is the project's backbone (`build_extractor`: imagenet / random / checkpoint, fingerprinted); the
artifact holds only the student's weights (``student.*``). Training is seeded (student initialisation, batch
order), so a fit on the same data and config gives the same version on the same machine and libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from eagle.config import ExpertConfig, JobConfig, StorageConfig
from eagle.expert.anomaly_map import uncropped
from eagle.expert.backbone import build_extractor, normalisation
from eagle.expert.preprocess import IMAGENET_MEAN, IMAGENET_STD, Normalisation, PreProcessor

_STUDENT = "student."


@contextmanager
def _extractors(teacher: nn.Module, seed: int):
    """While ``STFPMModel.__init__`` runs: its pretrained teacher is ours (no hub download, any weights), its
    student timm's initialisation under `seed`."""
    from anomalib.models.components import TimmFeatureExtractor
    from anomalib.models.image.stfpm import torch_model

    def make(backbone: str, layers: Sequence[str], pre_trained: bool = True, requires_grad: bool = False) -> Any:
        if pre_trained:
            return teacher
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=False,
                                        requires_grad=requires_grad)

    original = torch_model.TimmFeatureExtractor
    torch_model.TimmFeatureExtractor = make
    try:
        yield
    finally:
        torch_model.TimmFeatureExtractor = original


class Stfpm(nn.Module):
    """anomalib's ``STFPMModel`` with the project's backbone as its teacher."""

    name = "stfpm"

    def __init__(self, model: nn.Module, resize: int, crop: int,
                 normalisation: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> None:
        super().__init__()
        self.model = model  # anomalib.models.image.stfpm.torch_model.STFPMModel
        self.preprocessor = PreProcessor(resize, crop, normalisation)

    @classmethod
    def from_config(cls, cfg: ExpertConfig, storage: StorageConfig | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Stfpm:
        from anomalib.models.image.stfpm.torch_model import STFPMModel

        teacher = build_extractor(cfg.backbone, cfg.layers, cfg.weights, cfg.seed, storage)
        with _extractors(teacher, cfg.seed):
            model = STFPMModel(layers=list(cfg.layers), backbone=cfg.backbone)
        if tensors is not None:
            student = {k[len(_STUDENT):]: v for k, v in tensors.items() if k.startswith(_STUDENT)}
            model.student_model.load_state_dict(student, strict=True)
        return cls(model, cfg.resize, cfg.crop, normalisation(cfg.backbone)).eval()

    @classmethod
    def fit_on(cls, images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu",
               batch_size: int = 8) -> Stfpm:
        """anomalib's training step (``STFPMLoss`` between teacher and student features, SGD) for
        ``expert.stfpm.epochs`` passes over the images in seeded random order."""
        from anomalib.models.image.stfpm.loss import STFPMLoss

        opts = cfg.expert.stfpm
        stfpm = cls.from_config(cfg.expert, cfg.storage).to(device)
        batch = stfpm.preprocess(images)  # (N, 3, crop, crop): the training set is small
        loss_fn = STFPMLoss()
        optimizer = torch.optim.SGD(stfpm.model.student_model.parameters(), lr=opts.lr, momentum=opts.momentum,
                                    weight_decay=opts.weight_decay)
        order = torch.Generator().manual_seed(cfg.expert.seed)
        stfpm.model.train()
        stfpm.model.teacher_model.eval()
        for _ in range(opts.epochs):
            for idx in torch.randperm(len(images), generator=order).split(opts.batch_size):
                if len(idx) < 2 < len(images):  # BatchNorm cannot train on one sample: skip a lone last
                    continue  # one (another epoch's order pairs it)
                teacher, student = stfpm.model(batch[idx.to(batch.device)])
                loss = loss_fn(teacher, student)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return stfpm.eval()

    @property
    def backbone(self) -> nn.Module:
        return self.model.teacher_model

    @property
    def device(self) -> torch.device:
        return next(self.model.student_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.model.teacher_model.to(dtype)
        self.model.student_model.to(dtype)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.preprocessor(images, self.device, self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {_STUDENT + k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.model.student_model.state_dict().items()}

    def describe(self) -> dict[str, Any]:
        return {"layers": list(self.model.teacher_model.layers)}

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As ``STFPMModel.forward`` in eval mode (map over the crop, image score = its max); the patch map is
        the same product of layer maps at the first layer's grid; maps then back to each original size."""
        generator = self.model.anomaly_map_generator
        teacher = {k: v.float() for k, v in self.model.teacher_model(batch).items()}
        student = {k: v.float() for k, v in self.model.student_model(batch).items()}
        maps = generator.compute_anomaly_map(teacher, student, image_size=batch.shape[-2:])  # (B, 1, crop, crop)
        grid = next(iter(teacher.values())).shape[-2:]
        patch_maps = generator.compute_anomaly_map(teacher, student, image_size=grid).squeeze(1)  # (B, h, w)
        scores = maps.amax(dim=(-2, -1)).squeeze(1)
        return scores, patch_maps, uncropped(maps, self.preprocessor.resize, self.preprocessor.crop, sizes)


def fit_stfpm(images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu", batch_size: int = 8,
              names: Sequence[str] | None = None) -> Any:
    """STFPM with its cross-fitted label-free threshold (a `FitResult`)."""
    from eagle.expert.training import fit_cross_fitted

    return fit_cross_fitted(Stfpm, images, cfg, device, batch_size, names)
