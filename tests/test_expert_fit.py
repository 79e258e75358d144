"""Fit → save → load: identical scores, local and S3; tampering and foreign weights refused; no labels used."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eagle.config import load_config
from eagle.expert.artifact import DEFAULT_POINTER, META_FILE, TENSORS_FILE, ArtifactError, load_artifact, save_artifact
from eagle.expert.fitted import Expert
from eagle.expert.patchcore import PatchCore
from eagle.expert.training import fit_product, list_products, load_training_images
from eagle.io.images import decode_image

TINY = ["expert.backbone=resnet18", "expert.weights=random", "expert.resize=64", "expert.crop=64",
        "threshold.min_unselected_patches=4"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eagle.testing.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(str(root), products=("nut",), n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=0)
    return root


def tiny_cfg(store: str | Path, *extra: str):
    return load_config(overrides=[*TINY, f"model_store={store}", *extra])


def held_out_images(root: Path) -> list[np.ndarray]:
    return [decode_image(p.read_bytes(), 10**8) for p in sorted((root / "nut" / "test").rglob("*.png"))]


@pytest.fixture(scope="module")
def fitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store")
    cfg = tiny_cfg(store)
    summary = fit_product(str(data_root), "nut", cfg)
    return cfg, summary


def test_round_trip_gives_identical_scores(data_root: Path, fitted):
    cfg, summary = fitted
    _, train = load_training_images(str(data_root), "nut", cfg)
    in_memory = PatchCore.fit(train, cfg)
    art = load_artifact(cfg.model_store, "nut")
    assert art.version == summary.version
    assert (Path(cfg.model_store) / "nut" / DEFAULT_POINTER).read_text().strip() == summary.version
    assert torch.equal(art.memory_bank, in_memory.tensors["memory_bank"])
    assert art.threshold == pytest.approx(in_memory.threshold.value) and art.score_max == summary.score_max
    assert art.meta["threshold"]["method"] == "k-sigma" and len(art.meta["threshold"]["scores"]) == 6
    assert art.meta["coreset"]["size"] == summary.coreset == int(6 * 64 * 0.1)

    images = held_out_images(data_root)
    loaded = Expert.from_artifact(art).score(images)
    direct = Expert(PatchCore.from_config(cfg.expert, tensors=in_memory.tensors)).score(images)
    assert [r.score for r in loaded] == [r.score for r in direct]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(loaded, direct, strict=True))


def test_s3_store_round_trip(fitted, s3_bucket: str, data_root: Path):
    cfg, summary = fitted
    art = load_artifact(cfg.model_store, "nut")
    version = save_artifact(s3_bucket + "/models", "nut", art.tensors, art.meta)
    assert version == art.version  # content hash: the same content has the same version anywhere
    remote = load_artifact(s3_bucket + "/models", "nut")
    images = held_out_images(data_root)[:2]
    assert [r.score for r in Expert.from_artifact(remote).score(images)] == \
           [r.score for r in Expert.from_artifact(art).score(images)]


@pytest.mark.parametrize("name", [TENSORS_FILE, META_FILE])
def test_tampered_artifact_refused(fitted, tmp_path: Path, name: str):
    cfg, summary = fitted
    store = tmp_path / "store"
    shutil.copytree(cfg.model_store, store)
    path = store / "nut" / summary.version / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its content check"):
        load_artifact(str(store), "nut")


def test_different_backbone_weights_refused(fitted, tmp_path: Path):
    cfg, _ = fitted
    art = load_artifact(cfg.model_store, "nut")
    meta = {**art.meta, "expert": {**art.meta["expert"], "seed": 1}}  # random init under another seed
    save_artifact(str(tmp_path), "nut", art.tensors, meta)
    with pytest.raises(ArtifactError, match="differs from the one"):
        Expert.from_artifact(load_artifact(str(tmp_path), "nut"))


def test_missing_product_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ArtifactError, match="no fitted expert for product 'bolt'"):
        load_artifact(str(tmp_path), "bolt")


def test_fit_uses_no_labels(data_root: Path, fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without any test/ or ground_truth/ folder the fit is byte-identical (same content-hash version)."""
    _, summary = fitted
    train_only = tmp_path / "data"
    shutil.copytree(data_root / "nut" / "train", train_only / "nut" / "train")
    monkeypatch.chdir(tmp_path)
    assert list_products("data") == list_products(str(data_root)) == ["nut"]  # relative roots too
    again = fit_product(str(train_only), "nut", tiny_cfg(tmp_path / "store"))
    assert again.version == summary.version and again.threshold == summary.threshold
