"""Test-time augmentation (expert.tta=flips): the averaged score is the same for an image and its flips, the maps
follow the image, the threshold's training scores are averaged over the same views, and the fit records it so the
expert stage scores as the fit did."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_experts import data_root, held_out_images, tiny_cfg  # noqa: F401 (fixture)

from eagle.expert.artifact import load_artifact
from eagle.expert.experts import model_class
from eagle.expert.fitted import Expert
from eagle.expert.training import fit_product, load_training_images
from eagle.expert.views import VIEWS, flipped, flipped_indices


@pytest.mark.parametrize("dims", VIEWS["flips"])
def test_flipped_indices_follow_the_flipped_grid(dims: tuple[int, ...]):
    n, h, w = 3, 4, 5
    grid = torch.arange(n * h * w).view(n, h, w)
    picked = torch.tensor([0, 7, 19, 20, 33, 59])
    moved = flipped_indices(picked, (h, w), dims)
    assert torch.equal(flipped(grid, dims).flatten()[moved], picked)  # the same patch, at its flipped place


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_flip_averaged_scores_do_not_depend_on_how_an_image_is_flipped(data_root, tmp_path, model):  # noqa: F811
    cfg = tiny_cfg(tmp_path / "store", "expert.tta=flips", "expert.resize=64")
    fit_product(str(data_root), "nut", cfg, model=model)
    art = load_artifact(cfg.model_store, "nut", model=model)
    assert art.meta["expert"]["tta"] == "flips"
    expert = Expert.from_artifact(art)
    assert expert.tta == "flips"
    image = held_out_images(data_root)[-1]
    views = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]
    results = expert.score([np.ascontiguousarray(v) for v in views])
    assert np.allclose([r.score for r in results], results[0].score, rtol=1e-4)
    back = [results[0].anomaly_map, results[1].anomaly_map[:, ::-1], results[2].anomaly_map[::-1],
            results[3].anomaly_map[::-1, ::-1]]
    assert all(np.allclose(m, back[0], rtol=1e-3, atol=1e-4 * float(back[0].max())) for m in back)
    single = Expert(expert.model).score([image])[0].score  # one view: a different number
    assert single != pytest.approx(results[0].score, rel=1e-6)


def test_patchcore_training_scores_are_the_mean_over_the_views(data_root, tmp_path):  # noqa: F811
    from eagle.expert.scoring import patch_scores
    from eagle.expert.threshold import leave_own_out_scores, threshold_value

    cfg = tiny_cfg(tmp_path, "expert.tta=flips")
    images = load_training_images(str(data_root), "nut", cfg)[1]
    patchcore = model_class("patchcore")
    one = patchcore.fit(images, tiny_cfg(tmp_path))
    four = patchcore.fit(images, cfg)
    assert all(torch.equal(one.tensors[k], four.tensors[k]) for k in one.tensors)  # the bank: unflipped images
    model = patchcore.from_config(cfg.expert, tensors=four.tensors)
    opts = cfg.expert.patchcore

    def score_image(query: torch.Tensor, exclude: torch.Tensor) -> float:
        return float(patch_scores(query.unsqueeze(0), model.bank, opts.scoring, opts.num_neighbors, opts.k,
                                  exclude)[0][0])

    per_view = []
    for dims in VIEWS["flips"]:
        view = model.embed(flipped(model.preprocess(images), dims))
        n, h, w, d = view.shape
        per_view.append(leave_own_out_scores(view.reshape(n, h * w, d),
                                             flipped_indices(model.coreset_indices, (h, w), dims), score_image,
                                             cfg.threshold.min_unselected_patches)[0])
    assert np.allclose(per_view[0], one.threshold.scores, rtol=1e-5)  # the view as it is: the single-view score
    assert np.allclose(four.threshold.scores, np.mean(per_view, axis=0), rtol=1e-5)
    assert not np.allclose(four.threshold.scores, one.threshold.scores)
    assert four.threshold.value == pytest.approx(threshold_value(four.threshold.scores, cfg.threshold))


def test_a_fit_without_tta_keeps_its_version(data_root, tmp_path):  # noqa: F811
    cfg = tiny_cfg(tmp_path / "store")
    assert fit_product(str(data_root), "nut", cfg).version == \
        fit_product(str(data_root), "nut", tiny_cfg(tmp_path / "store", "expert.tta=none")).version
    assert fit_product(str(data_root), "nut", tiny_cfg(tmp_path / "store", "expert.tta=flips")).version != \
        fit_product(str(data_root), "nut", cfg).version
    assert "tta" not in load_artifact(cfg.model_store, "nut").meta["expert"]
