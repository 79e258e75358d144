"""Datasets on shared storage: fit and inspect listings follow a product folder that is a symlink."""

from __future__ import annotations

from pathlib import Path

from eagle.config import InputConfig
from eagle.expert.training import list_products
from eagle.io.inputs import list_inputs
from eagle.testing.synth import generate


def test_fit_and_inspect_listings_follow_a_symlinked_product(tmp_path: Path):
    generate(str(tmp_path / "datasets"), products=("grid",), n_train=2, n_test_good=1, n_test_defect=1, size=32)
    root = tmp_path / "root"
    root.mkdir()
    (root / "weave").symlink_to(tmp_path / "datasets" / "grid", target_is_directory=True)
    (root / "weave" / "train" / "good" / "cycle").symlink_to(root, target_is_directory=True)
    assert list_products(str(root)) == ["weave"]
    listing = list_inputs(InputConfig(uris=[str(root)]))
    uris = listing.column("image_uri").to_pylist()
    assert set(listing.column("product").to_pylist()) == {"weave"}
    real = tmp_path / "datasets" / "grid"
    expected = sorted(str(root / "weave" / p.relative_to(real)) for p in real.rglob("*.png")
                      if "ground_truth" not in p.parts)
    assert sorted(uris) == expected and len(expected) >= 4  # each image once, under the linked name
