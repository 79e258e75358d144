"""The expert models: the interface every one implements (`ExpertModel`) and the registry of their names.

Words: a *model* is one kind of anomaly model (PatchCore, PaDiM, STFPM: a class implementing `ExpertModel`);
an *expert* is a model fitted to one product's normal images (an artifact; `eagle.expert.fitted.Expert` once
loaded); a product's *pinned expert* is the expert, or ensemble of experts, that a run scores it with
(`eagle.expert.ensemble`).

The registry is `eagle.config.sections.ModelName`: model NAME is the class ``MODEL`` of the module
``eagle.expert.NAME``. An artifact names its model in ``meta["model"]``; one without the key is a PatchCore
(artifacts written before there were several models, and every PatchCore artifact, so that their versions did
not change). This module imports nothing heavy: reading metadata never loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

from eagle.config.sections import EXPERT_MODELS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from eagle.config import ExpertConfig, JobConfig, StorageConfig
    from eagle.expert.preprocess import PreProcessor
    from eagle.expert.threshold import ThresholdFit

DEFAULT_MODEL = "patchcore"


@dataclass(frozen=True)
class FitResult:
    """A fitted expert before it is saved: what its artifact holds, and how long the fit took."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    threshold: ThresholdFit
    timings: dict[str, float]


@runtime_checkable
class ExpertModel(Protocol):
    """What the fit job, artifacts and the expert stage need of a model; each is also an ``nn.Module`` (CPU,
    float32, eval when built). Every model takes the same input (``preprocessor``: cfg.resize, cfg.crop), so
    decode tasks make one `model_input` whatever the expert."""

    name: ClassVar[str]  # its registry name, recorded in the artifact's meta["model"]
    threshold_rule: ClassVar[str]  # where its label-free threshold's training scores come from
    preprocessor: PreProcessor

    @classmethod
    def from_config(cls, cfg: ExpertConfig, storage: StorageConfig | None = None,
                    tensors: dict[str, torch.Tensor] | None = None) -> Self:
        """Built as the expert config describes it, with an artifact's tensors (None: not fitted)."""

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu", batch_size: int = 8,
            names: Sequence[str] | None = None) -> FitResult:
        """Fitted on a product's normal training images (`names`: theirs, relative to the product), with its
        label-free threshold and the artifact's metadata."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """What its artifact stores (CPU tensors); `from_config` takes them back."""

    def embedding_meta(self) -> dict[str, Any]:
        """The shape of what was fitted (dims, grid, ...), for the artifact's meta["embedding"]."""

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB arrays → (B, 3, crop, crop) input on the model's device and dtype."""

    def predict(self, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Image scores (B,), patch maps (B, h, w) and anomaly maps (H, W) at each original size."""

    @property
    def backbone(self) -> torch.nn.Module:
        """The frozen pretrained network whose weights the artifact's fingerprint names."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's compute dtype."""

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Backbone compute dtype; distances and statistics stay float32."""


def check_model(name: str) -> str:
    """`name` if a model is registered under it; a clear error for any other."""
    if name not in EXPERT_MODELS:
        raise ValueError(f"unknown expert model {name!r}; known: {', '.join(EXPERT_MODELS)}")
    return name


def model_class(name: str) -> type[ExpertModel]:
    """The class of the registered model `name` (its module imported on first use)."""
    return importlib.import_module(f"eagle.expert.{check_model(name)}").MODEL


def model_name(meta: Mapping[str, Any]) -> str:
    """The expert model an artifact's metadata describes (no 'model' key: PatchCore)."""
    return str(meta.get("model", DEFAULT_MODEL))


def parse_models(text: str) -> list[str]:
    """'padim,patchcore' → ['padim', 'patchcore'] (checked, duplicates dropped, order kept)."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for name in names:
        check_model(name)
    if not names:
        raise ValueError("no expert model named")
    return names
