"""The expert models behind the expert stage: a registry NAME -> model class, and the interface they share.

Every expert model is an ``nn.Module`` with

    from_config(cfg: ExpertConfig, storage, tensors=None) -> model   classmethod; CPU, float32, eval; the
                                                     artifact's tensors, or None for an unfitted model
    preprocessor: PreProcessor                       the same resize/crop (cfg.resize, cfg.crop) for every model,
                                                     so decode tasks make one `model_input` whatever the expert
    preprocess(images) -> (B, 3, crop, crop)         normalised input on the model's device and dtype
    predict(batch, sizes) -> scores (B,), patch maps (B, h, w), anomaly maps [(H, W)] at each original size
    backbone: nn.Module                              the frozen pretrained network the fingerprint covers
    set_dtype(dtype), device, dtype

and a fit function ``fit(images, names, cfg, device, batch_size) -> FitResult`` (tensors + meta of a safe
artifact, with its label-free threshold). PatchCore keeps its TGPS threshold; the others threshold their
out-of-fold scores (`eagle.expert.training.fit_cross_fitted`).

An artifact names its model in ``meta["model"]``; one without the key is a PatchCore (artifacts written before
there were several models, and every PatchCore artifact, so that their versions did not change). This module
imports nothing heavy: reading metadata never loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "patchcore"


@dataclass(frozen=True)
class ExpertKind:
    """One registered expert model: where its class and its fit function live (imported on first use)."""

    name: str
    model: str  # "module:Class"
    fit: str  # "module:function"
    threshold: str  # how its label-free threshold's training scores are made, for docs and reports

    def model_class(self) -> Any:
        return _attribute(self.model)

    def fit_function(self) -> Any:
        return _attribute(self.fit)


EXPERTS: dict[str, ExpertKind] = {kind.name: kind for kind in (
    ExpertKind("patchcore", "eagle.expert.model:PatchCore", "eagle.expert.training:fit_expert",
               "TGPS: unselected patches against the bank without their image's rows"),
    ExpertKind("padim", "eagle.expert.padim:Padim", "eagle.expert.padim:fit_padim",
               "k-fold cross-fit: out-of-fold image scores"),
    ExpertKind("stfpm", "eagle.expert.stfpm:Stfpm", "eagle.expert.stfpm:fit_stfpm",
               "k-fold cross-fit: out-of-fold image scores"),
)}


def _attribute(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def expert_kind(name: str) -> ExpertKind:
    """The registered model called `name`; a clear error for any other."""
    try:
        return EXPERTS[name]
    except KeyError:
        raise ValueError(f"unknown expert model {name!r}; known: {', '.join(EXPERTS)}") from None


def model_name(meta: Mapping[str, Any]) -> str:
    """The expert model an artifact's metadata describes (no 'model' key: PatchCore)."""
    return str(meta.get("model", DEFAULT_MODEL))


def parse_models(text: str) -> list[str]:
    """'padim,patchcore' → ['padim', 'patchcore'] (checked, duplicates dropped, order kept)."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for name in names:
        expert_kind(name)
    if not names:
        raise ValueError("no expert model named")
    return names
