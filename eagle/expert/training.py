"""Fitting a product's expert: its training images, the model's fit (`ExpertModel.fit`), the artifact; what every
fit records (`provenance`), and the k-fold cross-fit of models without a threshold of their own (`CrossFitted`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, ClassVar

import numpy as np

from eagle.config import JobConfig, StorageConfig, config_hash
from eagle.config.hashing import fit_view
from eagle.expert.artifact import save_artifact
from eagle.expert.backbone import fingerprint
from eagle.expert.experts import ExpertModel, FitResult, model_class
from eagle.expert.threshold import fit_threshold, fold_assignment, out_of_fold_scores
from eagle.io import layouts
from eagle.io.images import decode_image
from eagle.io.storage import join, read_bytes, strip_scheme

_LIBRARIES = ("eagle-audit", "torch", "timm", "anomalib", "numpy", "scipy", "safetensors")


@dataclass(frozen=True)
class FitSummary:
    """What jobs/fit.py prints per product."""

    product: str
    version: str
    images: int
    patches: int
    coreset: int
    threshold_method: str
    threshold: float
    score_max: float
    skipped: int
    seconds: float
    model: str = "patchcore"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_products(root: str, storage: StorageConfig | None = None, layout: str | None = None) -> list[str]:
    """Products with training images under a data root in any layout `eagle.io.layouts` reads (detected
    unless given)."""
    return layouts.list_products(root, layout, storage)


def load_training_images(root: str, product: str, cfg: JobConfig, layout: str | None = None
                         ) -> tuple[list[str], list[np.ndarray]]:
    """Names (relative to the product folder, e.g. ``train/good/000.png``) and decoded RGB arrays of a product's
    training images: exactly the layout's train split of normal images."""
    uris = layouts.train_uris(root, product, layout, cfg.storage)
    if not uris:
        raise FileNotFoundError(f"no training images of {product} under {root}")
    folder = strip_scheme(join(root, product)).rstrip("/") + "/"
    names = [strip_scheme(u)[len(folder):] if strip_scheme(u).startswith(folder) else u.rsplit("/", 1)[-1]
             for u in uris]
    images = [decode_image(read_bytes(u, cfg.storage), cfg.inputs.max_image_pixels) for u in uris]
    return names, images


def provenance(cfg: JobConfig) -> dict[str, Any]:
    """What every artifact's meta records of where it came from: the config hash, the libraries' versions."""
    return {"config_hash": config_hash(cfg, sections=("expert", "threshold")),
            "versions": {name: metadata.version(name) for name in _LIBRARIES}}


def score_images(model: ExpertModel, images: Sequence[np.ndarray], batch_size: int) -> list[float]:
    """Image scores of a model (`eagle.expert.experts.ExpertModel`) for images of any size."""
    scores: list[float] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        crop = model.preprocessor.crop
        image_scores, _, _ = model.predict(model.preprocess(chunk), [(crop, crop)] * len(chunk))
        scores += [float(s) for s in image_scores.float().cpu()]
    return scores


class CrossFitted:
    """For models whose fit leaves nothing to threshold on (PaDiM, STFPM: no unselected patches): `fit` is their
    own ``fit_on(images, cfg, device, batch_size)`` inside a k-fold cross-fit."""

    name: ClassVar[str]

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu", batch_size: int = 8,
            names: Sequence[str] | None = None) -> FitResult:
        """The model and its label-free threshold from k-fold out-of-fold scores: for each of ``threshold.folds``
        folds, a model fitted on the other folds scores the fold's images; the threshold rule takes those scores;
        the final model is fitted on all images. Folds follow the image names (sorted, shuffled under
        ``expert.seed``); the meta records them with the scores (in the order of ``names``)."""
        cfg = fit_view(cfg, cls.name)
        ecfg, start = cfg.expert, time.perf_counter()
        names = list(names) if names is not None else [f"{i:06d}" for i in range(len(images))]
        folds = fold_assignment(names, cfg.threshold.folds, ecfg.seed)

        def fit_without(train: list[int]) -> Any:
            return cls.fit_on([images[i] for i in train], cfg, device, batch_size)

        def score(model: Any, held_out: list[int]) -> list[float]:
            return score_images(model, [images[i] for i in held_out], batch_size)

        scores = out_of_fold_scores(folds, fit_without, score)
        t_cross = time.perf_counter()
        model = cls.fit_on(images, cfg, device, batch_size)
        t_fit = time.perf_counter()
        threshold = fit_threshold(scores, 0, cfg.threshold)
        k = cfg.threshold.folds
        meta = {
            "model": cls.name,
            "expert": ecfg.record(),
            "threshold": {**threshold.as_dict(), "config": cfg.threshold.model_dump(mode="json"),
                          "cross_fit": {"k": k, "seed": ecfg.seed,
                                        "folds": [[n for n, f in zip(names, folds, strict=True) if f == fold]
                                                  for fold in range(k)]}},
            "backbone": {"name": ecfg.backbone, "layers": list(ecfg.layers), "weights": ecfg.weights,
                         "fingerprint": fingerprint(model.backbone)},
            "embedding": {**model.embedding_meta(), "resize": ecfg.resize, "crop": ecfg.crop},
            "training": {"images": len(images)},
            **provenance(cfg),
        }
        timings = {"cross_fit": t_cross - start, "fit": t_fit - t_cross}
        return FitResult(tensors=model.tensors(), meta=meta, threshold=threshold, timings=timings)


def fit_product(root: str, product: str, cfg: JobConfig, device: str | None = None, model: str | None = None,
                default: bool = True, layout: str | None = None) -> FitSummary:
    """Fit a product's expert `model` (default: ``expert.model``, 'auto' = patchcore) from the layout's training
    images (MVTec AD: ``{root}/{product}/train/good``; `layout` None: detected) and save it to
    ``cfg.model_store``: its ``LATEST.<model>`` pointer moves, and ``LATEST`` (the product's default expert) too
    when `default`."""
    if not cfg.model_store:
        raise ValueError("model_store is not set")
    model = model or cfg.expert.fit_model()
    start = time.perf_counter()
    names, images = load_training_images(root, product, cfg, layout)
    result = model_class(model).fit(images, cfg, device or cfg.resources.expert.resolved_device(),
                                    cfg.resources.expert.batch_size, names=names)
    result.meta["training"]["names"] = names
    version = save_artifact(cfg.model_store, product, result.tensors, result.meta, cfg.storage, set_default=default)
    coreset = result.meta.get("coreset", {})
    return FitSummary(product=product, version=version, images=len(images),
                      patches=coreset.get("total_patches", 0), coreset=coreset.get("size", 0),
                      threshold_method=result.threshold.method, threshold=result.threshold.value,
                      score_max=result.threshold.score_max, skipped=result.threshold.skipped,
                      seconds=time.perf_counter() - start, model=model)
