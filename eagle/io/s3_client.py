"""The S3 client behind `eagle.io.storage`: s3fs with botocore's retries and timeouts, files that land whole or
not at all, and a count of failed requests per kind (read, list, write).

One client for every S3 request of a job (listings, image and artifact reads, DuckDB's reads, the Parquet
writes of Ray Data through ``pyarrow.fs.FSSpecHandler``), so one set of settings (``storage.*``) and one
count cover them all. This module imports nothing from the rest of eagle.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import s3fs
from s3fs.core import S3File

log = logging.getLogger(__name__)

RETRY_KINDS = ("read", "list", "write")

_counts: Counter[str] = Counter()
_listeners: list[Callable[[str], None]] = []
_lock = threading.Lock()


def request_kind(operation: str) -> str:
    """``list``, ``read`` or ``write`` for an S3 API operation name."""
    if operation.startswith("List"):
        return "list"
    return "read" if operation.startswith(("Get", "Head")) else "write"


def retry_counts() -> dict[str, int]:
    """Failed S3 requests of this process so far, per kind (each one was retried unless it was the last
    attempt): throttling (503 SlowDown), other 5xx and dropped or timed-out connections. A dropped keep-alive
    connection that aiohttp resends by itself (idempotent methods) never reaches botocore and is not counted."""
    with _lock:
        return {k: _counts[k] for k in RETRY_KINDS}


def add_retry_listener(listener: Callable[[str], None]) -> None:
    """Also tell `listener` the kind of every failed request of this process (once per listener)."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def _on_attempt(response: Any = None, caught_exception: Exception | None = None, operation: Any = None,
                **_: Any) -> None:
    """botocore's ``needs-retry`` event, after every attempt of a request."""
    status = getattr(response[0], "status_code", 200) if response else 200
    if caught_exception is None and status < 500 and status != 429:
        return
    kind = request_kind(getattr(operation, "name", ""))
    with _lock:
        _counts[kind] += 1
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(kind)
        except Exception as exc:  # noqa: BLE001 - counting must never fail a request
            log.debug("retry listener failed: %s", exc)


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs whose clients count failed attempts and whose written files land whole or not at all.

    botocore retries each request (``storage.max_attempts``, backoff, timeouts); s3fs's own loop around it
    (``retries``) adds one more round for errors botocore does not retry, such as a body that breaks off while
    it streams. Picklable (Ray ships it to workers): fsspec rebuilds it from its arguments there.
    """

    retries = 2

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None) -> Any:
        client = await super().set_session(refresh, kwargs or {})
        if not getattr(client, "_eagle_counted", False):
            client.meta.events.register("needs-retry.s3", _on_attempt)
            client._eagle_counted = True
        return client

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> S3File:
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            f.__class__ = WholeS3File  # same object, with the write path below (s3fs has no file-class hook)
        return f


class WholeS3File(S3File):
    """An S3 file written whole or not at all.

    Plain s3fs completes a multipart upload at close even when one of its parts failed (the object would
    silently lack that part) and commits at the end of a ``with`` block whose body raised. Here a failed
    request or an exception in the block aborts the upload and publishes nothing; the error names the object.
    """

    _failed: BaseException | None = None

    def _initiate_upload(self) -> None:
        self._guarded(super()._initiate_upload)

    def _upload_chunk(self, final: bool = False) -> Any:
        return self._guarded(super()._upload_chunk, final)

    def _guarded(self, step: Callable[..., Any], *args: Any) -> Any:
        if self._failed is not None:
            raise OSError(f"not writing s3://{self.path}: an earlier request for it failed "
                          f"({self._failed})") from self._failed
        try:
            return step(*args)
        except Exception as exc:
            self._failed = exc
            self._abandon()
            raise OSError(f"writing s3://{self.path} failed: {exc}") from exc

    def _abandon(self) -> None:
        try:
            self._abort_mpu()
        except Exception as exc:  # noqa: BLE001 - the store is failing; a later run's abort_uploads gets it
            log.warning("could not abort the partial upload of s3://%s (%s); the next run of this job aborts "
                        "it, or a lifecycle rule for incomplete multipart uploads does", self.path, exc)
        self.mpu = None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: Any) -> None:
        if exc_type is not None and not self.closed:
            self._failed = self._failed or exc_type()
            self._abandon()
            self.closed = True
            return
        super().__exit__(exc_type, *rest)


def abort_uploads(fs: s3fs.S3FileSystem, prefix: str, name_prefix: str = "") -> int:
    """Abort the unfinished multipart uploads under `prefix` (``bucket/key-prefix``) whose object name starts
    with `name_prefix` (a dead worker's or a failed abort's leftovers, billed until aborted); returns how many."""
    bucket, _, key_prefix = prefix.partition("/")
    aborted = 0
    for page in _pages(fs, bucket, key_prefix.rstrip("/") + "/" if key_prefix else ""):
        for upload in page.get("Uploads", []):
            if upload["Key"].rpartition("/")[2].startswith(name_prefix):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])
                aborted += 1
    return aborted


def _pages(fs: s3fs.S3FileSystem, bucket: str, key_prefix: str) -> Any:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kwargs)
        yield page
        if not page.get("IsTruncated"):
            return
        kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
