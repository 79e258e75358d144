"""Every dataset layout the project reads, built in miniature from synthetic images: detected from its folders,
parsed by anomalib (local) and by the same rules over a listing (s3://), fitted on exactly its training split
and evaluated on its test split, labels and masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.config import ConfigError, load_config
from eagle.io import layouts
from eagle.testing.synth import image_rng, render_defect, render_normal

SIZE, N_TRAIN, N_GOOD = 64, 3, 2
# layout -> (product, image extension, the layout's defect names of the two defective test images)
CASES = {
    "mvtec_ad": ("nut", ".png", ("hole", "scratch")),
    "mpdd": ("bracket", ".png", ("hole", "scratch")),
    "mvtec_ad2": ("can", ".png", ("bad", "bad")),
    "mvtec_loco": ("juice", ".png", ("logical_anomalies", "structural_anomalies")),
    "visa": ("candle", ".JPG", ("bad", "bad")),
    "btech": ("01", ".bmp", ("ko", "ko")),
    "folder": ("part", ".png", ("bad", "bad")),
}
# What an inspect run of the root leaves out: masks and training images.
EXCLUDE = ["*/ground_truth/*", "*/Masks/*", "*/mask/*", "*/train/*", "*/validation/*", "*/normal/*",
           *(f"*/Normal/{i:03d}.JPG" for i in range(N_TRAIN))]  # VisA: its CSV's training rows


def _image(array: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format={".png": "PNG", ".JPG": "JPEG", ".bmp": "BMP"}[ext], quality=95)
    return buf.getvalue()


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build(layout: str, root: Path) -> None:
    """A miniature dataset of one product in `layout`: N_TRAIN training normals, N_GOOD normal and two
    defective test images with masks (LOCO: the first defective image has two mask files)."""
    product, ext, defects = CASES[layout]
    p = root / product
    train = [render_normal("nut", image_rng(0, "nut", "train", i), SIZE) for i in range(N_TRAIN)]
    good = [render_normal("nut", image_rng(0, "nut", "good", i), SIZE) for i in range(N_GOOD)]
    bad = [render_defect("nut", d, 0.9, image_rng(0, "nut", d, 0), SIZE) for d in ("hole", "scratch")]
    mask = lambda m: _image(m.astype(np.uint8) * 255, ".png")  # noqa: E731
    if layout in ("mvtec_ad", "mpdd", "mvtec_ad2", "mvtec_loco", "btech"):
        train_dir, good_dir = ("train/ok", "test/ok") if layout == "btech" else ("train/good", "test/good")
        test = "test_public" if layout == "mvtec_ad2" else "test"
        good_dir = f"{test}/good" if layout == "mvtec_ad2" else good_dir
        for i, img in enumerate(train):
            _put(p / train_dir / f"{i:03d}{ext}", _image(img, ext))
        if layout in ("mvtec_ad2", "mvtec_loco"):  # a validation split, which neither fit nor evaluate uses
            _put(p / "validation" / "good" / f"000{ext}", _image(good[0], ext))
        for i, img in enumerate(good):
            _put(p / good_dir / f"{i:03d}{ext}", _image(img, ext))
        for i, (defect, (img, m)) in enumerate(zip(defects, bad)):
            name = f"{i:03d}"  # distinct stems, so a mask cannot be matched to the wrong image
            _put(p / test / defect / f"{name}{ext}", _image(img, ext))
            if layout == "mvtec_ad2":
                _put(p / test / "ground_truth" / defect / f"{name}_mask.png", mask(m))
            elif layout == "mvtec_loco":
                _put(p / "ground_truth" / defect / name / "000.png", mask(m))
                if i == 0:
                    _put(p / "ground_truth" / defect / name / "001.png", mask(np.zeros_like(m)))
            elif layout == "btech":
                _put(p / "ground_truth" / defect / f"{name}.png", mask(m))
            else:
                _put(p / "ground_truth" / defect / f"{name}_mask.png", mask(m))
    elif layout == "visa":
        rows = ["object,split,label,image,mask"]
        for i, img in enumerate(train + good):
            rel = f"{product}/Data/Images/Normal/{i:03d}{ext}"
            _put(root / rel, _image(img, ext))
            rows.append(f"{product},{'train' if i < N_TRAIN else 'test'},normal,{rel},")
        for i, (img, m) in enumerate(bad):
            rel, mrel = f"{product}/Data/Images/Anomaly/{i:03d}{ext}", f"{product}/Data/Masks/Anomaly/{i:03d}.png"
            _put(root / rel, _image(img, ext))
            _put(root / mrel, mask(m))
            rows.append(f"{product},test,anomaly,{rel},{mrel}")
        _put(root / "split_csv" / "1cls.csv", ("\n".join(rows) + "\n").encode())
    elif layout == "folder":
        for i, img in enumerate(train):
            _put(p / "normal" / f"{i:03d}{ext}", _image(img, ext))
        for i, img in enumerate(good):
            _put(p / "normal_test" / f"{i:03d}{ext}", _image(img, ext))
        for i, (img, m) in enumerate(bad):
            _put(p / "abnormal" / f"{i:03d}{ext}", _image(img, ext))
            _put(p / "mask" / f"{i:03d}{ext}", mask(m))


@pytest.mark.parametrize("layout", CASES)
def test_layout_detected_and_split_as_anomalib_parses_it(layout, tmp_path):
    build(layout, tmp_path)
    product, _, defects = CASES[layout]
    detected = layouts.detect_layout(str(tmp_path))
    assert detected == ("mvtec_ad" if layout == "mpdd" else layout)  # MPDD is MVTec AD's layout
    found, samples = layouts.load_samples(str(tmp_path), layout)
    assert found == layout and {s.product for s in samples} == {product}
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == N_TRAIN and not any(s.anomalous for s in train)
    assert "validation" not in str([s.uri for s in samples])
    assert sorted(s.defect for s in test) == sorted(("good",) * N_GOOD + defects)
    assert all(Path(u).exists() for s in samples for u in (s.uri, *s.masks))
    assert all(len(s.masks) == (0 if not s.anomalous else 2 if layout == "mvtec_loco" and s.uri.endswith("000.png")
                                else 1) for s in test)
    assert layouts.list_products(str(tmp_path)) == [product]
    if layout not in layouts.LOCAL_ONLY:  # s3://: the same rules over the listing give the same samples
        files = layouts._listing(str(tmp_path), None)
        folder = "" if layout == "visa" else product
        assert layouts.rules_samples(str(tmp_path), layout, product, folder,
                                     [f for f in files if f.startswith(product + "/")]) == samples


def test_unknown_layouts_are_refused_with_what_to_do(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("not images")
    with pytest.raises(ConfigError, match="no known dataset layout.*--layout"):
        layouts.detect_layout(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown layout 'visa2'"):
        layouts.load_samples(str(tmp_path), "visa2")
    build("mvtec_ad", tmp_path)
    with pytest.raises(ConfigError, match="is not a btech product folder"):
        layouts.load_samples(str(tmp_path), "btech")


def test_object_store_refuses_layouts_read_locally_only(monkeypatch):
    monkeypatch.setattr(layouts, "_listing", lambda root, cfg: ["nut/normal/000.png"])
    with pytest.raises(ConfigError, match="layout folder is read from local folders only"):
        layouts.load_samples("s3://bucket/folder", "folder")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fit_inspect_evaluate_every_layout(ray_local, tmp_path):
    """Each layout fitted (its training split), one inspect run over every root (expert only), and
    jobs/evaluate.py on each root (its test split, labels and masks; the layout detected, MPDD's forced)."""
    import json

    from eagle.cli import evaluate_cmd
    from eagle.expert.training import fit_product
    from eagle.pipeline.inspection import run_inspect

    roots = {layout: tmp_path / "data" / layout for layout in CASES}
    cfg = load_config(overrides={
        "run_id": "layouts", "model_store": str(tmp_path / "models"),
        "inputs": {"uris": [str(r) for r in roots.values()], "exclude": EXCLUDE},
        "output": {"uri": str(tmp_path / "audit")}, "mllm": {"model": "none"},
        "expert": {"backbone": "tf_efficientnet_lite0", "resize": SIZE, "crop": SIZE},
        "threshold": {"min_unselected_patches": 4}, "resources": {"expert": {"batch_size": 8}},
    }, env={})
    for layout, root in roots.items():
        build(layout, root)
        fitted = fit_product(str(root), CASES[layout][0], cfg)
        assert fitted.images == N_TRAIN, layout  # exactly the training split: no validation, no test images
    summary = run_inspect(cfg)
    assert summary.status == {"ok": len(CASES) * (N_GOOD + 2)}, summary.lines()
    for layout, root in roots.items():
        out = tmp_path / "eval" / layout
        forced = ["--layout", layout] if layout == "mpdd" else []
        assert evaluate_cmd.main(["--output", cfg.output.uri, "--data", str(root), "--out", str(out),
                                  *forced]) == 0, layout
        metrics = json.loads((out / "metrics.json").read_text())
        o = metrics["overall"]
        assert o["n_test_images"] == o["n_test_images_with_rows"] == N_GOOD + 2, (layout, o)
        assert CASES[layout][0] in metrics["products"], layout  # (the other roots' rows are listed unmatched)
        assert o["pixel_auroc"] is not None and o["image_auroc"] is not None, (layout, o)  # labels and masks


def test_a_root_of_test_images_only_is_mvtec_ad(tmp_path):
    """An evaluation root (test images and masks, no training split) is read as MVTec AD."""
    import shutil

    build("mvtec_ad", tmp_path)
    shutil.rmtree(tmp_path / "nut" / "train")
    assert layouts.detect_layout(str(tmp_path)) == "mvtec_ad"
    _, samples = layouts.load_samples(str(tmp_path))
    assert len(samples) == N_GOOD + 2 and {s.split for s in samples} == {"test"}
