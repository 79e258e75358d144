"""PatchCore model: embedding and scores match anomalib's PatchcoreModel; the scoring functions do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eagle.config import ExpertConfig
from eagle.expert.fitted import Expert
from eagle.expert.patchcore import PatchCore
from eagle.expert.scoring import patch_scores
from eagle.expert.search import MemoryBank

LAYERS = ["layer2", "layer3"]


def tiny_cfg(**kw) -> ExpertConfig:
    return ExpertConfig(backbone="resnet18", layers=LAYERS, weights="random", resize=64, crop=64, **kw)


def images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    return [np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def model_and_bank():
    model = PatchCore.from_config(tiny_cfg())
    emb = model.embed(model.preprocess(images(4)))  # (4, 8, 8, 384)
    bank = emb.reshape(-1, emb.shape[-1])[::3].clone()
    model.memory_bank = bank
    return model, bank


def test_scores_and_maps_match_anomalib_patchcore(model_and_bank):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model, bank = model_and_bank
    reference = PatchcoreModel(layers=LAYERS, backbone="resnet18", pre_trained=False, num_neighbors=9).eval()
    reference.feature_extractor.load_state_dict(model.extractor.state_dict())
    reference.memory_bank = bank
    test = images(3, seed=1)
    test[2][20:30, 20:30] = 255  # a bright square: a clearly higher score
    batch = model.preprocess(test)
    expected = reference(batch)
    scores, patch_maps = model(batch)
    assert torch.allclose(scores, expected.pred_score, rtol=1e-4, atol=0)
    assert scores[2] > scores[:2].max()
    # resize == crop == image size: preprocessing is the identity geometry, so maps compare pixel for pixel
    maps = Expert(model).score(test)
    for result, ref_map in zip(maps, expected.anomaly_map[:, 0], strict=True):
        assert result.anomaly_map.shape == (64, 64) and result.patch_map.shape == (8, 8)
        np.testing.assert_allclose(result.anomaly_map, ref_map.numpy(), rtol=1e-4, atol=1e-6)


def test_anomaly_map_is_at_original_size_and_follows_the_defect():
    model = PatchCore.from_config(ExpertConfig(backbone="resnet18", layers=LAYERS, weights="random", resize=80, crop=64))
    model.memory_bank = model.embed(model.preprocess(images(3, size=96))).reshape(-1, 384)
    test = images(1, size=96, seed=3)[0][:, :80].copy()  # 96 x 80, not square
    test[40:56, 30:46] = 255
    expert = Expert(model)
    (result,) = expert.score([test])
    assert result.anomaly_map.shape == (96, 80) and result.anomaly_map.dtype == np.float32
    again = expert.score([test, test])  # cached bank index and blur kernel are reused; batch size is free
    for r in again:
        assert r.score == pytest.approx(result.score, rel=1e-5)
        np.testing.assert_allclose(r.anomaly_map, result.anomaly_map, rtol=1e-4, atol=1e-6)
    y, x = np.unravel_index(result.anomaly_map.argmax(), result.anomaly_map.shape)
    assert 32 <= y <= 64 and 22 <= x <= 54


def test_mean_k_scoring_is_mean_of_k_distances_and_max_over_patches():
    g = torch.Generator().manual_seed(1)
    emb, bank = torch.randn(2, 10, 8, generator=g), torch.randn(40, 8, generator=g)
    image, patch = patch_scores(emb, MemoryBank(bank), "mean_k", num_neighbors=9, k=5)
    expected = torch.cdist(emb.reshape(-1, 8), bank).topk(5, largest=False).values.mean(1).reshape(2, 10)
    assert torch.allclose(patch, expected, atol=1e-5)
    assert torch.allclose(image, expected.amax(1))


def test_projection_reduces_patch_dims():
    model = PatchCore.from_config(tiny_cfg(patchcore={"projection_dim": 100}))
    assert model.embed(model.preprocess(images(1))).shape == (1, 8, 8, 100)


def test_preprocess_refuses_non_rgb():
    model = PatchCore.from_config(tiny_cfg())
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        model.preprocess([np.zeros((64, 64), np.uint8)])


def test_checkpoint_weights_from_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    from eagle.expert.backbone import build_extractor, fingerprint

    torch.manual_seed(7)
    full = timm.create_model("resnet18", pretrained=False)  # a whole classifier: fc.* is ignored
    path = tmp_path / "resnet18.safetensors"
    save_file(full.state_dict(), str(path))
    extractor = build_extractor("resnet18", LAYERS, str(path))
    assert torch.equal(extractor.feature_extractor.layer2[0].conv1.weight, full.layer2[0].conv1.weight)
    assert fingerprint(extractor) != fingerprint(build_extractor("resnet18", LAYERS, "random"))
    partial = {k: v for k, v in full.state_dict().items() if not k.startswith("layer3.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks .* backbone tensors"):
        build_extractor("resnet18", LAYERS, str(tmp_path / "partial.safetensors"))


def test_model_inputs_made_elsewhere_score_as_the_images_do():
    """The decode tasks send `model_input` copies (uint8, crop x crop) instead of images: the same scores and
    maps at the original size, up to the uint8 rounding of the resized pixels."""
    from eagle.config import RegionsConfig
    from eagle.expert.regions import find_regions

    model = PatchCore.from_config(ExpertConfig(backbone="resnet18", layers=LAYERS, weights="random", resize=80, crop=64))
    model.memory_bank = model.embed(model.preprocess(images(3, size=96))).reshape(-1, 384)
    test = [im[:, :80].copy() for im in images(3, size=96, seed=4)]
    for im in test[1:]:
        im[40:56, 30:46] = 255
    expert = Expert(model)
    inputs = [expert.model_input(im) for im in test]
    assert all(x.shape == (64, 64, 3) and x.dtype == np.uint8 for x in inputs)
    direct = expert.score(test)
    remote = expert.score_inputs(inputs, [im.shape[:2] for im in test])
    for a, b in zip(direct, remote, strict=True):
        assert b.anomaly_map.shape == (96, 80)
        assert b.score == pytest.approx(a.score, rel=1e-2)
        assert np.abs(b.anomaly_map - a.anomaly_map).max() <= 0.01 * a.anomaly_map.max()
        mask_a = find_regions(a.anomaly_map, RegionsConfig()).mask_png
        mask_b = find_regions(b.anomaly_map, RegionsConfig()).mask_png
        assert (mask_a is None) == (mask_b is None)
    with pytest.raises(ValueError, match="expected a 64x64x3 uint8 model input"):
        expert.score_inputs([test[0]], [test[0].shape[:2]])
