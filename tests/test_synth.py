"""The synthetic MVTec-layout generator: layout, exact masks, reproducibility, labels, S3 and the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eagle.io.storage import list_files, read_bytes
from eagle.testing.synth import (
    DEFECTS,
    GRAYSCALE,
    LABEL_COLUMNS,
    MASK_TOL,
    PRODUCT_DEFECTS,
    PRODUCTS,
    generate,
    render_defect,
    render_normal,
    strengths,
)

SMALL = dict(n_train=2, n_test_good=1, n_test_defect=2, size=64)
CASES = [(p, d) for p in PRODUCTS for d in PRODUCT_DEFECTS[p]]


def expected_files(products=PRODUCTS, n_train=2, n_test_good=1, n_test_defect=2) -> set[str]:
    """Relative paths MVTec-AD would have for these counts, written out independently of the generator."""
    files = {"labels.csv"}
    for p in products:
        files |= {f"{p}/train/good/{i:03d}.png" for i in range(n_train)}
        files |= {f"{p}/test/good/{i:03d}.png" for i in range(n_test_good)}
        for d in PRODUCT_DEFECTS[p]:
            files |= {f"{p}/test/{d}/{i:03d}.png" for i in range(n_test_defect)}
            files |= {f"{p}/ground_truth/{d}/{i:03d}_mask.png" for i in range(n_test_defect)}
    return files


def relative(prefix: str) -> dict[str, str]:
    return {f.uri[len(prefix.rstrip("/")) + 1:]: f.uri for f in list_files(prefix)}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(str(root), seed=3, **SMALL)
    return root


def test_products_and_defects_cover_textures_object_and_four_kinds() -> None:
    assert set(DEFECTS) <= {d for p in PRODUCTS for d in PRODUCT_DEFECTS[p]}
    assert len(PRODUCTS) >= 3 and len(DEFECTS) >= 4


def test_layout_matches_mvtec(small_dataset: Path) -> None:
    files = relative(str(small_dataset))
    assert set(files) == expected_files()
    for rel, uri in files.items():
        if not rel.endswith(".png"):
            continue
        product, kind = rel.split("/")[:2]
        img = Image.open(io.BytesIO(read_bytes(uri)))
        assert img.size == (64, 64)
        if kind == "ground_truth":
            assert img.mode == "L"
            values = set(np.unique(np.asarray(img)).tolist())
            assert values == {0, 255}, rel  # binary and non-empty
            image_rel = rel.replace("ground_truth", "test").replace("_mask.png", ".png")
            assert image_rel in files
        else:
            assert img.mode == ("L" if product in GRAYSCALE else "RGB")


@pytest.mark.parametrize("product,defect", CASES)
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_mask_is_exactly_the_changed_pixels(product: str, defect: str, strength: float) -> None:
    normal = render_normal(product, np.random.default_rng(11), 128)
    image, mask = render_defect(product, defect, strength, np.random.default_rng(11), 128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and mask.shape == (128, 128)
    diff = np.abs(image.astype(np.int16) - normal).max(axis=2)
    assert mask.sum() >= 3
    assert diff[~mask].max(initial=0) <= MASK_TOL
    assert diff[mask].min() > MASK_TOL
    assert mask.mean() < 0.1  # a local defect, not a changed image


@pytest.mark.parametrize("product,defect", CASES)
def test_strength_runs_from_faint_to_clear(product: str, defect: str) -> None:
    normal = render_normal(product, np.random.default_rng(5), 128).astype(np.int16)
    change = []
    for strength in (0.0, 0.5, 1.0):
        image, mask = render_defect(product, defect, strength, np.random.default_rng(5), 128)
        change.append(int(np.abs(image - normal).sum()))
    assert change[0] < change[1] < change[2]
    assert change[2] > 2 * change[0]


def test_normal_images_vary_and_are_not_flat() -> None:
    for product in PRODUCTS:
        a, b = (render_normal(product, np.random.default_rng(s), 128).astype(np.int16) for s in (1, 2))
        assert np.mean(np.abs(a - b) > MASK_TOL) > 0.2, product  # each image is drawn afresh
        assert a.std() > 5, product


def test_grayscale_products_render_equal_channels() -> None:
    for product in GRAYSCALE:
        image, _ = render_defect(product, "stain", 1.0, np.random.default_rng(0), 64)
        assert (image == image[..., :1]).all()


def test_same_seed_same_bytes_other_seed_differs(small_dataset: Path, tmp_path: Path) -> None:
    generate(str(tmp_path / "again"), seed=3, **SMALL)
    generate(str(tmp_path / "other"), seed=4, **SMALL)
    first, again, other = digests(small_dataset), digests(tmp_path / "again"), digests(tmp_path / "other")
    assert first == again
    images = [k for k in first if k.endswith(".png") and "ground_truth" not in k]
    assert len({first[k] for k in images}) == len(images)  # every image drawn afresh, none repeated
    assert all(first[k] != other[k] for k in images)


def test_more_images_leave_existing_ones_unchanged(small_dataset: Path, tmp_path: Path) -> None:
    generate(str(tmp_path / "more"), products=["nut"], seed=3, n_train=4, n_test_good=1, n_test_defect=2, size=64)
    assert (tmp_path / "more/nut/train/good/001.png").read_bytes() == \
        (small_dataset / "nut/train/good/001.png").read_bytes()


def test_labels_agree_with_files_and_masks(small_dataset: Path) -> None:
    with open(small_dataset / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        rows = list(reader)
    images = {k for k in expected_files() if k.endswith(".png") and "ground_truth" not in k}
    assert {r["path"] for r in rows} == images and len(rows) == len(images)
    for r in rows:
        product, split, defect, name = r["path"].split("/")
        assert (r["product"], r["split"], r["defect"]) == (product, split, defect)
        if defect == "good":
            assert r["strength"] == "" and r["mask_path"] == ""
        else:
            assert r["mask_path"] == f"{product}/ground_truth/{defect}/{name[:-4]}_mask.png"
            assert (small_dataset / r["mask_path"]).is_file()
            assert float(r["strength"]) == strengths(2)[int(name[:3])]
    per_defect = [r for r in rows if r["product"] == "nut" and r["defect"] == "hole"]
    assert [float(r["strength"]) for r in per_defect] == sorted(float(r["strength"]) for r in per_defect)


def test_writes_to_s3_and_lists_back(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/synth"
    summary = generate(prefix, products=["nut", "grid"], seed=1, **SMALL)
    files = relative(prefix)
    assert set(files) == expected_files(products=("nut", "grid"))
    assert summary.images == sum(1 for k in files if k.endswith(".png") and "ground_truth" not in k)
    assert summary.masks == sum(1 for k in files if k.endswith("_mask.png"))
    mask = np.asarray(Image.open(io.BytesIO(read_bytes(files["nut/ground_truth/missing/001_mask.png"]))))
    assert mask.dtype == np.uint8 and mask.max() == 255


def test_rejects_unknown_product_and_inapplicable_defect() -> None:
    with pytest.raises(ValueError, match="unknown product"):
        render_normal("teapot", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="no defect"):
        render_defect("marble", "missing", 0.5, np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="strength"):
        render_defect("nut", "hole", 1.5, np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="size"):
        generate("/nonexistent/never-written", size=8)


def test_cli_writes_dataset(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "eagle.testing.synth", "--out", str(out), "--products", "nut,marble", "--seed", "2",
         "--size", "64", "--n-train", "2", "--n-test-good", "1", "--n-test-defect", "2"],
        capture_output=True, text=True, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["counts"]["nut"]["test/missing"] == 2
    assert set(relative(str(out))) == expected_files(products=("nut", "marble"))
    bad = subprocess.run([sys.executable, "-m", "eagle.testing.synth", "--out", str(out), "--products", "teapot"],
                         capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert bad.returncode == 2 and "unknown product" in bad.stderr
