"""PaDiM on anomalib's ``PadimModel``: one Gaussian per patch position over (a random subset of) the backbone's
features, fitted by its own step (accumulate the training embeddings, then ``fit()``); scored by Mahalanobis
distance with anomalib's map generator (upsampled, Gaussian-blurred, image score = the map's max).

The artifact holds the Gaussian (mean (D, h*w), inverse covariance (h*w, D, D)) and the kept feature indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from eagle.config import ExpertConfig, JobConfig, StorageConfig
from eagle.expert.anomaly_map import AnomalyMapGenerator, uncropped
from eagle.expert.backbone import build_extractor, normalisation
from eagle.expert.preprocess import IMAGENET_MEAN, IMAGENET_STD, Normalisation, PreProcessor
from eagle.expert.training import CrossFitted

# anomalib's PaDiM defaults for the paper's backbones; other backbones keep every channel
_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}


class Padim(CrossFitted, nn.Module):
    """anomalib's ``PadimModel`` on the project's backbone (`build_extractor`: imagenet / random / checkpoint), an
    `eagle.expert.experts.ExpertModel`; thresholded by k-fold cross-fit (`CrossFitted`)."""

    name = "padim"
    threshold_rule = "k-fold cross-fit: out-of-fold image scores"

    def __init__(self, model: nn.Module, resize: int, crop: int,
                 normalisation: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> None:
        super().__init__()
        self.model = model  # anomalib.models.image.padim.torch_model.PadimModel
        self.preprocessor = PreProcessor(resize, crop, normalisation)
        self.map_generator = AnomalyMapGenerator(resize, crop)  # its blur: anomalib's sigma-4 kernel, separable

    @classmethod
    def from_config(cls, cfg: ExpertConfig, storage: StorageConfig | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Padim:
        from anomalib.models.image.padim.torch_model import PadimModel

        extractor = build_extractor(cfg.backbone, cfg.layers, cfg.weights, cfg.seed, storage)
        channels = sum(extractor.out_dims)
        n_features = min(cfg.padim.n_features or _N_FEATURES.get(cfg.backbone, channels), channels)
        with torch.random.fork_rng():  # PadimModel draws its feature subset with torch.randperm
            torch.manual_seed(cfg.seed)
            model = PadimModel(backbone=cfg.backbone, layers=list(cfg.layers), pre_trained=False,
                               n_features=n_features)
        model.feature_extractor = extractor
        if tensors is not None:
            model.idx = tensors["idx"]
            model.gaussian.mean = tensors["mean"]
            model.gaussian.inv_covariance = tensors["inv_covariance"]
        return cls(model, cfg.resize, cfg.crop, normalisation(cfg.backbone)).eval()

    @classmethod
    def fit_on(cls, images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu",
               batch_size: int = 8) -> Padim:
        """anomalib's training step: embed every training image (memory bank), then fit the Gaussian."""
        padim = cls.from_config(cfg.expert, cfg.storage).to(device)
        padim.model.train()
        padim.model.feature_extractor.eval()  # frozen backbone: BatchNorm keeps its running statistics
        for i in range(0, len(images), batch_size):
            padim.model(padim.preprocess(images[i:i + batch_size]))
        padim.model.fit()
        return padim.eval()

    @property
    def backbone(self) -> nn.Module:
        return self.model.feature_extractor

    @property
    def device(self) -> torch.device:
        return self.model.idx.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.backbone.to(dtype)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.preprocessor(images, self.device, self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        g = self.model.gaussian
        return {"idx": self.model.idx.cpu(), "mean": g.mean.float().cpu(),
                "inv_covariance": g.inv_covariance.float().cpu()}

    def embedding_meta(self) -> dict[str, Any]:
        dim, positions = self.model.gaussian.mean.shape
        return {"dim": int(dim), "positions": int(positions), "features_original": self.model.n_features_original}

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As ``PadimModel.forward`` in eval mode: Mahalanobis distance per patch (the patch map), upsampled to the
        crop and blurred (the map), image score = its max; maps then back to each original size."""
        if self.model.gaussian.mean.numel() == 0:
            raise ValueError("PaDiM is not fitted")
        generator = self.model.anomaly_map_generator
        features = self.model.feature_extractor(batch)
        embedding = self.model.generate_embedding({k: v.float() for k, v in features.items()})  # (B, D, h, w)
        g = self.model.gaussian
        distance = generator.compute_distance(embedding, [g.mean, g.inv_covariance])  # (B, 1, h, w)
        maps = self.map_generator.blur(generator.up_sample(distance, batch.shape[-2:]))  # (B, 1, crop, crop)
        scores = maps.amax(dim=(-2, -1)).squeeze(1)
        return scores, distance.squeeze(1), uncropped(maps, self.preprocessor.resize, self.preprocessor.crop, sizes)


MODEL = Padim
