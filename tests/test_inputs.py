"""Input listing: products from paths, manifests, exclusions, ordering, dedup."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle.config import ConfigError, InputConfig
from eagle.io import storage
from eagle.io.inputs import list_inputs, product_of


@pytest.mark.parametrize("uri, prefix, product", [
    ("/d/root/bolt/test/scratch/001.png", "/d/root", "bolt"),
    ("/d/root/bolt/train/good/001.png", "/d/root/", "bolt"),
    ("/d/root/bolt/test/scratch/001.png", "/d/root/bolt", "bolt"),
    ("/d/root/bolt/test/scratch/001.png", "/d/root/bolt/test", "bolt"),
    ("/d/archive/line7/img_001.jpg", "/d/archive/line7", "line7"),
    ("s3://b/plant/capsule/x/1.png", "s3://b/plant", "capsule"),
])
def test_product_of(uri, prefix, product):
    assert product_of(uri, prefix) == product


def _touch(base: str, rel: str) -> None:
    storage.write_bytes(storage.join(base, rel), b"x")


def test_listing_mvtec_root_sorted_excludes_masks(tmp_path):
    root = str(tmp_path)
    for rel in ["nut/test/good/000.png", "grid/test/hole/001.PNG", "grid/test/hole/000.png",
                "grid/ground_truth/hole/000_mask.png", "grid/readme.txt", "nut/train/good/000.jpg"]:
        _touch(root, rel)
    table = list_inputs(InputConfig(uris=[root]))
    rows = table.to_pylist()
    assert [r["product"] for r in rows] == ["grid", "grid", "nut", "nut"]
    assert [r["image_uri"].rsplit("/", 3)[-3:] for r in rows] == [
        ["test", "hole", "000.png"], ["test", "hole", "001.PNG"], ["test", "good", "000.png"],
        ["train", "good", "000.jpg"]]
    assert all(r["image_version"] and r["image_size_bytes"] == 1 for r in rows)
    excluded = list_inputs(InputConfig(uris=[root], exclude=["*/ground_truth/*", "*/train/*"]))
    assert excluded.num_rows == 3


def test_manifest_and_dedup(tmp_path):
    root = str(tmp_path / "imgs")
    _touch(root, "a/1.png")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"{root}/a/1.png", "/elsewhere/2.png"], "product": ["p1", "p2"]}), manifest)
    table = list_inputs(InputConfig(uris=[root], manifest=str(manifest)))
    assert table.column("image_uri").to_pylist() == [f"{root}/a/1.png", "/elsewhere/2.png"]  # deduplicated
    assert table.column("product").to_pylist() == ["a", "p2"]  # first listing wins; sorted by product
    csv = tmp_path / "m.csv"
    csv.write_text("path\n/x.png\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        list_inputs(InputConfig(manifest=str(csv)))


def test_no_inputs_is_a_config_error():
    with pytest.raises(ConfigError, match="no inputs"):
        list_inputs(InputConfig())


@pytest.mark.parametrize("product", ["../../etc", "a/b", "..", ".hidden", "x y"])
def test_unsafe_products_refused(tmp_path, product):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,product\n/data/1.png,{product}\n")
    with pytest.raises(ConfigError, match="unsafe product name"):
        list_inputs(InputConfig(manifest=str(manifest)))
