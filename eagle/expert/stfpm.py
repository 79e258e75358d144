"""STFPM from anomalib's pieces: a student (anomalib's ``TimmFeatureExtractor``, trainable) trained with
anomalib's ``STFPMLoss`` and SGD settings to match the frozen teacher's features on normal images; anomalies are
where they disagree (anomalib's STFPM map generator: per-layer normalised feature distance, upsampled,
multiplied; image score = the map's max). The same modules, in the same order, as anomalib's ``STFPMModel``,
whose constructor would build (and download) its own teacher.

The teacher is the project's backbone (`build_extractor`: imagenet / random / checkpoint, fingerprinted), passed
in; the artifact holds only the student's weights (``student.*``). Training is seeded (student initialisation,
batch order), so a fit on the same data and config gives the same version on the same machine and libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from eagle.config import ExpertConfig, JobConfig, StorageConfig
from eagle.expert.anomaly_map import uncropped
from eagle.expert.backbone import build_extractor, normalisation
from eagle.expert.preprocess import IMAGENET_MEAN, IMAGENET_STD, Normalisation, PreProcessor
from eagle.expert.training import CrossFitted

_STUDENT = "student."


class Stfpm(CrossFitted, nn.Module):
    """A teacher (injected), its student and anomalib's STFPM map generator, an `eagle.expert.experts.ExpertModel`;
    thresholded by k-fold cross-fit (`CrossFitted`)."""

    name = "stfpm"
    threshold_rule = "k-fold cross-fit: out-of-fold image scores"

    def __init__(self, teacher: nn.Module, student: nn.Module, resize: int, crop: int,
                 normalisation: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> None:
        from anomalib.models.image.stfpm.anomaly_map import AnomalyMapGenerator

        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.map_generator = AnomalyMapGenerator()
        self.preprocessor = PreProcessor(resize, crop, normalisation)

    @classmethod
    def from_config(cls, cfg: ExpertConfig, storage: StorageConfig | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Stfpm:
        """The backbone as teacher, a student of the same architecture in timm's initialisation under
        ``expert.seed`` (or an artifact's student weights)."""
        from anomalib.models.components import TimmFeatureExtractor

        teacher = build_extractor(cfg.backbone, cfg.layers, cfg.weights, cfg.seed, storage)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            student = TimmFeatureExtractor(backbone=cfg.backbone, layers=list(cfg.layers), pre_trained=False,
                                           requires_grad=True)
        if tensors is not None:
            student.load_state_dict({k[len(_STUDENT):]: v for k, v in tensors.items() if k.startswith(_STUDENT)},
                                    strict=True)
        return cls(teacher, student, cfg.resize, cfg.crop, normalisation(cfg.backbone)).eval()

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
        optimizer = torch.optim.SGD(stfpm.student.parameters(), lr=opts.lr, momentum=opts.momentum,
                                    weight_decay=opts.weight_decay)
        order = torch.Generator().manual_seed(cfg.expert.seed)
        stfpm.student.train()  # the teacher stays in eval mode
        for _ in range(opts.epochs):
            for idx in torch.randperm(len(images), generator=order).split(opts.batch_size):
                if len(idx) < 2 < len(images):  # BatchNorm cannot train on one sample: skip a lone last
                    continue  # one (another epoch's order pairs it)
                chunk = batch[idx.to(batch.device)]
                loss = loss_fn(stfpm.teacher(chunk), stfpm.student(chunk))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return stfpm.eval()

    @property
    def backbone(self) -> nn.Module:
        return self.teacher

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.teacher.to(dtype)
        self.student.to(dtype)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.preprocessor(images, self.device, self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {_STUDENT + k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.student.state_dict().items()}

    def embedding_meta(self) -> dict[str, Any]:
        return {"layers": list(self.teacher.layers)}

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As ``STFPMModel.forward`` in eval mode (map over the crop, image score = its max); the patch map is
        the same product of layer maps at the first layer's grid; maps then back to each original size."""
        generator = self.map_generator
        teacher = {k: v.float() for k, v in self.teacher(batch).items()}
        student = {k: v.float() for k, v in self.student(batch).items()}
        maps = generator.compute_anomaly_map(teacher, student, image_size=batch.shape[-2:])  # (B, 1, crop, crop)
        grid = next(iter(teacher.values())).shape[-2:]
        patch_maps = generator.compute_anomaly_map(teacher, student, image_size=grid).squeeze(1)  # (B, h, w)
        scores = maps.amax(dim=(-2, -1)).squeeze(1)
        return scores, patch_maps, uncropped(maps, self.preprocessor.resize, self.preprocessor.crop, sizes)



MODEL = Stfpm
