"""Storage: one API over local paths, file:// and a real S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle.io import storage


@pytest.fixture(params=["local", "file", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/root"


def test_round_trip_and_listing(base):
    payload = {"a/x.png": b"\x89PNG-1", "a/b/y.JPG": b"jpg", "c.txt": b"text"}
    for rel, data in payload.items():
        storage.write_bytes(storage.join(base, rel), data)
    for rel, data in payload.items():
        assert storage.read_bytes(storage.join(base, rel)) == data
    images = storage.list_files(base, extensions=(".png", ".jpg"))
    names = [f.uri.rsplit("root", 1)[1] for f in images]
    assert names == ["/a/b/y.JPG", "/a/x.png"]
    assert [f.size for f in images] == [3, 6]
    assert all(f.version for f in images)
    if base.startswith("s3://"):
        assert all(f.uri.startswith("s3://") for f in images)
    assert storage.exists(storage.join(base, "c.txt"))
    assert not storage.exists(storage.join(base, "missing.txt"))
    assert storage.list_files(storage.join(base, "nothing-here")) == []


def test_version_changes_when_content_changes(s3_bucket):
    uri = f"{s3_bucket}/v/img.png"
    storage.write_bytes(uri, b"one")
    first = storage.list_files(f"{s3_bucket}/v")[0].version
    storage.write_bytes(uri, b"two!")
    second = storage.list_files(f"{s3_bucket}/v")[0].version
    assert first != second


def test_pyarrow_filesystem_reads_what_fsspec_wrote(s3_bucket):
    table = pa.table({"x": [1, 2, 3]})
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/t/data.parquet")
    pq.write_table(table, path, filesystem=fs)
    with storage.open_uri(f"{s3_bucket}/t/data.parquet") as fh:
        assert pq.read_table(fh).equals(table)


def test_options_never_expose_secrets_in_repr():
    from eagle.config import StorageConfig

    cfg = StorageConfig(access_key_id="AKIAEXAMPLE", secret_access_key="verysecret")
    assert "verysecret" not in repr(cfg) and "verysecret" not in cfg.model_dump_json()
    assert storage.s3_options(cfg)["secret"] == "verysecret"  # reaches the client, nothing else


def test_local_listing_follows_symlinked_folders_and_files_and_stops_at_cycles(tmp_path, caplog):
    shared = tmp_path / "shared" / "weave"
    (shared / "train" / "good").mkdir(parents=True)
    (shared / "train" / "good" / "000.png").write_bytes(b"a")
    (tmp_path / "elsewhere.png").write_bytes(b"bb")
    root = tmp_path / "root"
    (root / "grid" / "train" / "good").mkdir(parents=True)
    (root / "grid" / "train" / "good" / "000.png").write_bytes(b"ccc")
    (root / "weave").symlink_to(shared, target_is_directory=True)  # a product folder on "shared storage"
    (root / "grid" / "train" / "good" / "001.png").symlink_to(tmp_path / "elsewhere.png")
    (shared / "train" / "good" / "loop").symlink_to(shared, target_is_directory=True)  # a cycle
    (root / "grid" / "train" / "dangling").symlink_to(tmp_path / "gone")
    files = storage.list_files(str(root), extensions=(".png",))
    assert [(f.uri[len(str(root)):], f.size) for f in files] == [
        ("/grid/train/good/000.png", 3), ("/grid/train/good/001.png", 2), ("/weave/train/good/000.png", 1)]
    assert "symlink cycle" in caplog.text and "loop" in caplog.text  # reported, not silently skipped
    assert "broken symlink" in caplog.text
