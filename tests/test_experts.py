"""Every expert model through the same path: fit on synthetic normals → safe artifact → identical scores after
loading; tampering and foreign backbones refused; cross-fitted thresholds see no test image; per-model pointers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from eagle.config import config_hash, load_config
from eagle.config.sections import EXPERT_MODELS
from eagle.expert.artifact import (
    DEFAULT_POINTER,
    META_FILE,
    TENSORS_FILE,
    ArtifactError,
    load_artifact,
    resolve_version,
    save_artifact,
)
from eagle.expert.experts import model_class, parse_models
from eagle.expert.fitted import Expert
from eagle.expert.threshold import fold_assignment, out_of_fold_scores
from eagle.expert.training import fit_product, load_training_images
from eagle.io.images import decode_image

TINY = ["expert.backbone=resnet18", "expert.layers=[layer1,layer2]", "expert.weights=random", "expert.resize=72",
        "expert.crop=64", "threshold.min_unselected_patches=4", "threshold.folds=3", "expert.stfpm.epochs=2",
        "expert.stfpm.batch_size=4"]
CROSS_FITTED = ["padim", "stfpm"]


def tiny_cfg(store: str | Path, *extra: str):
    return load_config(overrides=[*TINY, f"model_store={store}", *extra])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from eagle.testing.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(str(root), products=("nut",), n_train=6, n_test_good=2, n_test_defect=2, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def fitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store with every model fitted for 'nut'; padim first, so it is the default expert."""
    store = tmp_path_factory.mktemp("store")
    cfg = tiny_cfg(store)
    return {"cfg": cfg, **{m: fit_product(str(data_root), "nut", cfg, model=m, default=m == "padim")
                           for m in ("padim", "stfpm", "patchcore")}}


def held_out_images(root: Path) -> list[np.ndarray]:
    return [decode_image(p.read_bytes(), 10**8) for p in sorted((root / "nut" / "test").rglob("*.png"))]


@pytest.mark.parametrize("model", CROSS_FITTED)
def test_fit_round_trips_bit_exactly(data_root: Path, fitted: dict, model: str):
    cfg, summary = fitted["cfg"], fitted[model]
    art = load_artifact(cfg.model_store, "nut", model=model)
    assert art.version == summary.version and art.meta["model"] == model == summary.model
    assert art.meta["expert"]["resize"] == 72 and art.meta["expert"]["crop"] == 64  # model_input_sizes reads these
    fit = model_class(model).fit(load_training_images(str(data_root), "nut", cfg)[1], cfg,
                                 names=art.meta["training"]["names"])
    assert fit.meta["threshold"] == art.meta["threshold"] and fit.tensors.keys() == art.tensors.keys()
    assert all(np.array_equal(fit.tensors[k].numpy(), art.tensors[k].numpy()) for k in fit.tensors)
    images = held_out_images(data_root)
    loaded = Expert.from_artifact(art).score(images)
    direct = Expert(model_class(model).from_config(cfg.expert, None, fit.tensors)).score(images)
    assert [r.score for r in loaded] == [r.score for r in direct]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(loaded, direct, strict=True))
    assert all(r.anomaly_map.shape == (64, 64) and r.anomaly_map.dtype == np.float32 for r in loaded)
    inputs = [Expert.from_artifact(art).model_input(img) for img in images]  # what decode tasks send
    via_inputs = Expert.from_artifact(art).score_inputs(inputs, [img.shape[:2] for img in images])
    assert np.allclose([r.score for r in via_inputs], [r.score for r in loaded], rtol=1e-2)


@pytest.mark.parametrize("model", CROSS_FITTED)
def test_cross_fitted_threshold_is_recorded(fitted: dict, model: str):
    cfg = fitted["cfg"]
    meta = load_artifact(cfg.model_store, "nut", model=model).meta
    threshold, names = meta["threshold"], meta["training"]["names"]
    folds = threshold["cross_fit"]["folds"]
    assert threshold["cross_fit"]["k"] == 3 and sorted(sum(folds, [])) == sorted(names)
    assert [len(f) for f in folds] == [2, 2, 2]
    scores = np.asarray(threshold["scores"])
    assert len(scores) == 6 and np.isfinite(scores).all() and threshold["skipped"] == 0
    assert threshold["value"] == pytest.approx(scores.mean() + 3 * scores.std(ddof=1))  # k-sigma on them
    assert threshold["score_max"] == scores.max()


@pytest.mark.parametrize("model", CROSS_FITTED)
@pytest.mark.parametrize("name", [TENSORS_FILE, META_FILE])
def test_tampered_artifact_refused(fitted: dict, tmp_path: Path, model: str, name: str):
    store = tmp_path / "store"
    shutil.copytree(fitted["cfg"].model_store, store)
    path = store / "nut" / fitted[model].version / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its content check"):
        load_artifact(str(store), "nut", model=model)


@pytest.mark.parametrize("model", CROSS_FITTED)
def test_different_backbone_weights_refused(fitted: dict, tmp_path: Path, model: str):
    art = load_artifact(fitted["cfg"].model_store, "nut", model=model)
    meta = {**art.meta, "expert": {**art.meta["expert"], "seed": 1}}  # random init under another seed
    save_artifact(str(tmp_path), "nut", art.tensors, meta)
    with pytest.raises(ArtifactError, match="differs from the one"):
        Expert.from_artifact(load_artifact(str(tmp_path), "nut"))


@pytest.mark.parametrize("model", CROSS_FITTED)
def test_cross_fit_sees_no_test_image(data_root: Path, fitted: dict, tmp_path: Path, model: str):
    """Without test/ and ground_truth/ folders the fit is byte-identical (same content-hash version)."""
    train_only = tmp_path / "data"
    shutil.copytree(data_root / "nut" / "train", train_only / "nut" / "train")
    again = fit_product(str(train_only), "nut", tiny_cfg(tmp_path / "store"), model=model)
    assert again.version == fitted[model].version


def test_pointers_per_model_and_the_default(fitted: dict, tmp_path: Path):
    store = Path(fitted["cfg"].model_store) / "nut"
    versions = {m: fitted[m].version for m in ("padim", "stfpm", "patchcore")}
    assert (store / DEFAULT_POINTER).read_text().strip() == versions["padim"]  # the default expert
    for model, version in versions.items():
        assert (store / f"{DEFAULT_POINTER}.{model}").read_text().strip() == version
        assert resolve_version(str(store.parent), "nut", model=model) == version
    assert resolve_version(str(store.parent), "nut", model="auto") == versions["padim"]
    # a store from before several models: only LATEST; it stands for patchcore when it names a PatchCore
    legacy = tmp_path / "legacy"
    shutil.copytree(store / versions["patchcore"], legacy / "nut" / versions["patchcore"])
    (legacy / "nut" / DEFAULT_POINTER).write_text(versions["patchcore"] + "\n")
    assert load_artifact(str(legacy), "nut", model="patchcore").version == versions["patchcore"]
    with pytest.raises(ArtifactError, match="no fitted padim expert"):
        resolve_version(str(legacy), "nut", model="padim")
    (legacy / "nut" / DEFAULT_POINTER).write_text(versions["padim"] + "\n")  # LATEST names another model
    shutil.copytree(store / versions["padim"], legacy / "nut" / versions["padim"])
    with pytest.raises(ArtifactError, match="no fitted patchcore expert"):
        resolve_version(str(legacy), "nut", model="patchcore")


def test_patchcore_fit_ignores_other_models_settings(data_root: Path, fitted: dict, tmp_path: Path):
    """PatchCore artifacts keep their versions: the model choice and other models' options are not recorded."""
    cfg = tiny_cfg(tmp_path, "expert.model=patchcore", "threshold.folds=4", "expert.stfpm.epochs=7",
                   "expert.padim.n_features=50", "expert.ensemble.models=[patchcore,padim]",
                   "expert.ensemble.combine=mean")
    again = fit_product(str(data_root), "nut", cfg)
    assert again.version == fitted["patchcore"].version and again.model == "patchcore"
    assert "model" not in load_artifact(str(tmp_path), "nut").meta


def test_config_hash_unchanged_while_new_fields_hold_defaults():
    base = load_config()
    assert config_hash(load_config(overrides=["threshold.folds=5", "expert.stfpm.epochs=20"])) == config_hash(base)
    assert config_hash(load_config(overrides=["expert.model=padim"])) != config_hash(base)
    assert config_hash(load_config(overrides=["threshold.folds=3"])) != config_hash(base)


def test_fold_assignment_depends_only_on_names():
    names = [f"train/good/{i:03d}.png" for i in range(11)]
    folds = fold_assignment(names, 3, seed=0)
    assert sorted(np.bincount(folds)) == [3, 4, 4]
    reordered = names[::-1]
    assert fold_assignment(reordered, 3, seed=0) == folds[::-1]
    assert fold_assignment(names, 3, seed=1) != folds
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        fold_assignment(names[:4], 5)
    seen = []
    scores = out_of_fold_scores(folds, lambda train: seen.append(set(train)) or set(train),
                                lambda model, held: [float(i in model) for i in held])
    assert not scores.any() and len(seen) == 3  # no image is scored by a model that saw it


def test_registry_and_model_lists():
    assert EXPERT_MODELS == ("patchcore", "padim", "stfpm")
    assert parse_models("padim, patchcore,padim") == ["padim", "patchcore"]
    with pytest.raises(ValueError, match="unknown expert model 'efficientad'"):
        parse_models("padim,efficientad")
