"""Fit one product's expert from its normal training images: embed, coreset, label-free threshold, artifact."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import numpy as np
import torch

from eagle.config import IMAGE_EXTENSIONS, JobConfig, StorageConfig, config_hash
from eagle.expert.artifact import save_artifact
from eagle.expert.backbone import fingerprint
from eagle.expert.coreset import greedy_coreset
from eagle.expert.detector import DTYPES, build_model
from eagle.expert.scoring import patch_scores
from eagle.expert.search import MemoryBank
from eagle.expert.threshold import ThresholdFit, fit_threshold, leave_own_out_scores
from eagle.io.images import decode_image
from eagle.io.storage import join, list_files, read_bytes, strip_scheme

TRAIN_FOLDER = ("train", "good")  # MVTec-AD layout: {root}/{product}/train/good/*.png
_LIBRARIES = ("eagle-audit", "torch", "timm", "anomalib", "numpy", "scipy", "safetensors")


@dataclass(frozen=True)
class FitResult:
    """The tensors and metadata of a fitted expert (what an artifact holds), before saving."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    threshold: ThresholdFit
    timings: dict[str, float]


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_products(root: str, storage: StorageConfig | None = None) -> list[str]:
    """Products under an MVTec-layout root: the first path segment of every ``*/train/good/<image>``."""
    base = strip_scheme(root).rstrip("/") + "/"
    products = set()
    for info in list_files(root, IMAGE_EXTENSIONS, storage):
        parts = strip_scheme(info.uri)[len(base):].split("/")
        if len(parts) == 4 and tuple(parts[1:3]) == TRAIN_FOLDER:
            products.add(parts[0])
    return sorted(products)


def load_training_images(root: str, product: str, cfg: JobConfig) -> tuple[list[str], list[np.ndarray]]:
    """Names (relative to the product folder) and decoded RGB arrays of a product's training images."""
    folder = join(root, product, *TRAIN_FOLDER)
    files = list_files(folder, cfg.inputs.extensions, cfg.storage)
    if not files:
        raise FileNotFoundError(f"no training images under {folder}")
    names = ["/".join(TRAIN_FOLDER) + "/" + f.uri.rstrip("/").rsplit("/", 1)[-1] for f in files]
    images = [decode_image(read_bytes(f.uri, cfg.storage), cfg.inputs.max_image_pixels) for f in files]
    return names, images


def fit_expert(images: Sequence[np.ndarray], cfg: JobConfig, device: str = "cpu",
               batch_size: int = 8) -> FitResult:
    """Memory bank (coreset of all training patches) and label-free threshold for normal images only."""
    ecfg, start = cfg.expert, time.perf_counter()
    model = build_model(ecfg, cfg.storage)
    weights_fingerprint = fingerprint(model.extractor)
    model = model.to(device)
    model.extractor.to(DTYPES[ecfg.dtype])
    embeddings = torch.cat([model.embed(model.preprocess(images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)])  # (N, h, w, D)
    n_images, grid_h, grid_w, dim = embeddings.shape
    flat = embeddings.reshape(-1, dim)
    t_embed = time.perf_counter()

    size = max(1, int(flat.shape[0] * ecfg.coreset_ratio))
    selected = greedy_coreset(flat, size, ecfg.coreset_projection_dim, seed=ecfg.seed)
    bank = flat[selected]
    t_coreset = time.perf_counter()
    index = MemoryBank(bank)

    def score_image(query: torch.Tensor, exclude: torch.Tensor) -> float:
        image, _ = patch_scores(query.unsqueeze(0), index, ecfg.scoring, ecfg.num_neighbors, ecfg.k, exclude)
        return float(image[0])

    scores, skipped = leave_own_out_scores(embeddings.reshape(n_images, grid_h * grid_w, dim), selected,
                                           score_image, cfg.threshold.min_unselected_patches)
    threshold = fit_threshold(scores, skipped, cfg.threshold)
    t_threshold = time.perf_counter()

    meta = {
        "expert": ecfg.model_dump(mode="json"),
        "threshold": {**threshold.as_dict(), "config": cfg.threshold.model_dump(mode="json")},
        "backbone": {"name": ecfg.backbone, "layers": list(ecfg.layers), "weights": ecfg.weights,
                     "fingerprint": weights_fingerprint},
        "embedding": {"dim": dim, "grid": [grid_h, grid_w], "resize": ecfg.resize, "crop": ecfg.crop},
        "coreset": {"method": "approximate greedy k-center", "ratio": ecfg.coreset_ratio, "size": size,
                    "total_patches": int(flat.shape[0]), "projection_dim": ecfg.coreset_projection_dim},
        "training": {"images": n_images},
        "config_hash": config_hash(cfg, sections=("expert", "threshold")),
        "versions": {name: metadata.version(name) for name in _LIBRARIES},
    }
    tensors = {"memory_bank": bank.float().cpu(), "coreset_indices": selected.cpu()}
    timings = {"embed": t_embed - start, "coreset": t_coreset - t_embed, "threshold": t_threshold - t_coreset}
    return FitResult(tensors=tensors, meta=meta, threshold=threshold, timings=timings)


def fit_product(root: str, product: str, cfg: JobConfig, device: str | None = None) -> FitSummary:
    """Fit a product from ``{root}/{product}/train/good`` and save it to ``cfg.model_store`` (LATEST moves)."""
    if not cfg.model_store:
        raise ValueError("model_store is not set")
    start = time.perf_counter()
    names, images = load_training_images(root, product, cfg)
    result = fit_expert(images, cfg, device or cfg.resources.expert.resolved_device(),
                        cfg.resources.expert.batch_size)
    result.meta["training"]["names"] = names
    version = save_artifact(cfg.model_store, product, result.tensors, result.meta, cfg.storage)
    return FitSummary(product=product, version=version, images=len(images),
                      patches=result.meta["coreset"]["total_patches"], coreset=result.meta["coreset"]["size"],
                      threshold_method=result.threshold.method, threshold=result.threshold.value,
                      score_max=result.threshold.score_max, skipped=result.threshold.skipped,
                      seconds=time.perf_counter() - start)
