"""The S3 client under faults (tests/faulty_proxy.py in front of the local S3 server): requests retried and
counted per kind, written files whole or not at all, partial multipart uploads aborted."""

from __future__ import annotations

import os

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faulty_proxy import FaultyProxy

from eagle.io import storage

MB = 2**20


def _cfg(proxy: FaultyProxy, **kw: object) -> storage.StorageConfig:
    return storage.StorageConfig(endpoint_url=proxy.url, **kw)


def _uploads(s3_server: str, bucket: str) -> list[dict]:
    client = boto3.client("s3", endpoint_url=s3_server)
    return client.list_multipart_uploads(Bucket=bucket.removeprefix("s3://")).get("Uploads", [])


def _delta(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in storage.retry_counts().items()}


def test_ten_percent_faults_on_every_request_kind_are_retried_and_counted(s3_server, s3_bucket):
    before = storage.retry_counts()
    payloads = {f"{s3_bucket}/small/{i:02d}.bin": os.urandom(1000 + i) for i in range(40)}
    big = os.urandom(12 * MB)
    table = pa.table({"i": list(range(5000))})
    with FaultyProxy(s3_server, every=10) as proxy:
        cfg = _cfg(proxy)
        for uri, data in payloads.items():
            storage.write_bytes(uri, data, cfg)
        fs, path = storage.filesystem(f"{s3_bucket}/big.bin", cfg)
        with fs.open(path, "wb", block_size=5 * MB) as fh:  # a multipart upload of 3 parts
            for i in range(0, len(big), MB):
                fh.write(big[i:i + MB])
        fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/t.parquet", cfg)
        pq.write_table(table, path, filesystem=fs)  # the pyarrow path Ray Data writes through
        listed = storage.list_files(f"{s3_bucket}/small", cfg=cfg)
        read = {f.uri: storage.read_bytes(f.uri, cfg) for f in listed}
        assert storage.read_bytes(f"{s3_bucket}/big.bin", cfg) == big
        assert pq.read_table(path, filesystem=fs).equals(table)
    assert read == payloads
    assert all(proxy.injected.values()), proxy.injected  # every fault kind happened
    assert {"GET", "PUT"} <= set(proxy.by_method), proxy.by_method
    counted = _delta(before)
    # every 5xx answer is counted once; a dropped keep-alive connection is counted unless aiohttp itself
    # resent the request (it does so, unseen by botocore, for idempotent methods)
    answered = proxy.injected["slowdown"] + proxy.injected["internal"]
    assert answered <= sum(counted.values()) <= proxy.faults, (counted, proxy.injected)
    assert counted["write"] and counted["read"], counted
    assert not _uploads(s3_server, s3_bucket)


def test_a_part_that_fails_for_good_publishes_nothing_and_aborts_the_upload(s3_server, s3_bucket):
    before = storage.retry_counts()
    # every UploadPart fails (PUT with a partNumber), the upload's creation and abort go through
    with FaultyProxy(s3_server, every=1, methods={"PUT"}, kinds=("slowdown",), paths=r"partNumber=") as proxy:
        cfg = _cfg(proxy, max_attempts=2)
        with pytest.raises(OSError, match=rf"writing {s3_bucket}/big.bin failed: .*reduce your request rate"):
            fs, path = storage.filesystem(f"{s3_bucket}/big.bin", cfg)
            with fs.open(path, "wb", block_size=5 * MB) as fh:
                fh.write(os.urandom(6 * MB))
                fh.write(os.urandom(6 * MB))
    assert proxy.faults >= 2
    assert not storage.exists(f"{s3_bucket}/big.bin")
    assert not _uploads(s3_server, s3_bucket)  # aborted, not left billing
    assert _delta(before)["write"] == proxy.faults


def test_an_exception_while_writing_publishes_nothing(s3_server, s3_bucket):
    cfg = storage.StorageConfig()
    for size in (1000, 6 * MB):  # a one-shot PUT and a started multipart upload
        fs, path = storage.filesystem(f"{s3_bucket}/half-{size}.bin", cfg)
        with pytest.raises(RuntimeError, match="encoder broke"):
            with fs.open(path, "wb", block_size=5 * MB) as fh:
                fh.write(os.urandom(size))
                raise RuntimeError("encoder broke")
        assert not storage.exists(f"{s3_bucket}/half-{size}.bin")
    assert not _uploads(s3_server, s3_bucket)


def test_abort_uploads_takes_only_the_named_leftovers(s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    for key in ("out/product=a/run1_a001_x-0.parquet", "out/product=b/run1_a001_y-0.parquet",
                "out/product=a/run2_a001_z-0.parquet", "elsewhere/run1_a001_w-0.parquet"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    assert storage.abort_uploads(f"{s3_bucket}/out", "run1_") == 2
    assert sorted(u["Key"] for u in _uploads(s3_server, s3_bucket)) == [
        "elsewhere/run1_a001_w-0.parquet", "out/product=a/run2_a001_z-0.parquet"]
    assert storage.abort_uploads("/tmp/local-prefix", "run1_") == 0
