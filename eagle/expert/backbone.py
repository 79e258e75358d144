"""The PatchCore backbone: anomalib's timm feature extractor with ImageNet, seeded random or checkpoint weights.

A fitted memory bank is only meaningful with the exact weights that produced it, so every backbone gets a
fingerprint (SHA-256 over its state dict) that the artifact records and loading checks.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as load_safetensors

from eagle.io.storage import StorageConfig, read_bytes

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_RANDOM = "random"


def build_extractor(backbone: str, layers: list[str], weights: str, seed: int = 0,
                    storage: StorageConfig | None = None) -> torch.nn.Module:
    """anomalib's ``TimmFeatureExtractor`` (eval mode, CPU, float32) with the requested weights.

    ``weights``: 'imagenet' (timm's pretrained weights from the hub or its local cache), 'random' (timm's
    initialisation under ``seed``: the same seed gives the same weights), or a local / object-store path to a
    safetensors state dict of the timm model (keys of layers the extractor does not use, e.g. ``fc.*``, are
    ignored; missing keys are an error).
    """
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    pretrained = weights == WEIGHTS_IMAGENET
    with torch.random.fork_rng():  # manual_seed seeds every device: restore them all
        torch.manual_seed(seed)
        extractor = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pretrained)
    if len(extractor.layers) != len(layers):
        raise ValueError(f"backbone {backbone!r} lacks some of the layers {list(layers)}")
    if weights not in (WEIGHTS_IMAGENET, WEIGHTS_RANDOM):
        _load_checkpoint(extractor.feature_extractor, weights, storage)
    return extractor.eval()


def _load_checkpoint(model: torch.nn.Module, uri: str, storage: StorageConfig | None) -> None:
    state = load_safetensors(read_bytes(uri, storage))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise ValueError(f"checkpoint {uri} lacks {len(result.missing_keys)} backbone tensors (e.g. {shown})")


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (hex) over the names, shapes, dtypes and bytes of a module's state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
