"""One way to reach files: plain paths, ``file://`` and ``s3://`` through fsspec/s3fs (pyarrow for Ray Data).

Endpoint, region and credentials come from the job's StorageConfig (defined here, with its environment
fallback), then the standard AWS environment variables and config files (botocore's own chain). Credentials
are never logged or returned in anything printable. This module imports nothing from the rest of eagle.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import IO, Any, Literal
from urllib.parse import urlparse

import fsspec
import fsspec.asyn
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileInfo:
    """A listed file: its full URI, size and a change token (ETag on S3, mtime locally)."""

    uri: str
    size: int
    version: str


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme == "s3"


def strip_scheme(uri: str) -> str:
    """Path as the filesystem object wants it: ``bucket/key`` for s3, an absolute path locally."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return f"{parsed.netloc}{parsed.path}".rstrip("/") if parsed.path not in ("", "/") else parsed.netloc
    if parsed.scheme == "file":
        return os.path.abspath(parsed.path)
    return os.path.abspath(uri)


_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_segment(name: str, what: str) -> str:
    """`name` if it can stand as one path segment under a prefix (no '/', no '..', no odd characters)."""
    if not _SAFE_SEGMENT.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a safe path segment: use letters, digits, '.', '_' and '-' "
                         f"(max 128, no '..')")
    return name


def join(base: str, *parts: str) -> str:
    """Join path parts under a URI, keeping its scheme."""
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


# The AWS variables this module reads (the one place that does). Non-secret ones may travel to Ray workers.
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
SETTING_ENV_VARS = (*ENDPOINT_ENV_VARS, *REGION_ENV_VARS, "AWS_PROFILE")
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageConfig(BaseModel):
    """Object-store settings. Unset fields fall back to the standard AWS environment variables and config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: str | None = Field(None, description="S3 endpoint (AWS_ENDPOINT_URL); for MinIO, Ceph, moto.")
    region: str | None = Field(None, description="Region (AWS_REGION / AWS_DEFAULT_REGION).")
    profile: str | None = Field(None, description="Named AWS profile (AWS_PROFILE).")
    access_key_id: SecretStr | None = Field(None, description="Prefer AWS_ACCESS_KEY_ID or an instance role.")
    secret_access_key: SecretStr | None = Field(None, description="Prefer AWS_SECRET_ACCESS_KEY.")
    session_token: SecretStr | None = Field(None, description="Prefer AWS_SESSION_TOKEN.")
    anon: bool = Field(False, description="Anonymous access to public buckets.")
    max_attempts: int = Field(8, ge=1, description="Attempts per object-store request on throttling (503 "
                              "SlowDown), 5xx and dropped connections, with exponential backoff (capped at 20 s).")
    retry_mode: Literal["adaptive", "standard"] = Field(
        "adaptive", description="botocore retry mode; adaptive also slows this client down while S3 throttles.")
    connect_timeout_s: float = Field(5.0, gt=0, description="A connection not made in this time is retried.")
    read_timeout_s: float = Field(30.0, gt=0, description="A request whose answer stalls this long is retried.")


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def storage_env_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The storage section's non-secret fields found in `env` (config loading layers them under the file)."""
    found = {"endpoint_url": _first(env, ENDPOINT_ENV_VARS), "region": _first(env, REGION_ENV_VARS),
             "profile": env.get("AWS_PROFILE") or None}
    return {k: v for k, v in found.items() if v}


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 settings: config first, then the AWS environment. Never printed (holds secrets)."""

    endpoint: str | None
    region: str | None
    profile: str | None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    anon: bool = False
    max_attempts: int = 8
    retry_mode: str = "adaptive"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


def s3_settings(cfg: StorageConfig | None = None) -> S3Settings:
    cfg = cfg or StorageConfig()
    env = {**storage_env_defaults(os.environ), **cfg.model_dump(exclude_none=True)}
    secret = (lambda s, var: s.get_secret_value() if s else os.environ.get(var) or None)  # noqa: E731
    return S3Settings(endpoint=env.get("endpoint_url"), region=env.get("region"), profile=env.get("profile"),
                      key=secret(cfg.access_key_id, "AWS_ACCESS_KEY_ID"),
                      secret=secret(cfg.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                      token=secret(cfg.session_token, "AWS_SESSION_TOKEN"),
                      anon=cfg.anon, max_attempts=cfg.max_attempts, retry_mode=cfg.retry_mode,
                      connect_timeout_s=cfg.connect_timeout_s, read_timeout_s=cfg.read_timeout_s)


def s3_options(cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem``."""
    return _options_of(s3_settings(cfg))


def _options_of(s: S3Settings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "anon": s.anon,
        "use_listings_cache": False,
        "config_kwargs": {"retries": {"max_attempts": s.max_attempts, "mode": s.retry_mode},
                          "connect_timeout": s.connect_timeout_s, "read_timeout": s.read_timeout_s},
    }
    if s.endpoint:
        opts["endpoint_url"] = s.endpoint
    if s.region:
        opts["client_kwargs"] = {"region_name": s.region}
    if s.profile:
        opts["profile"] = s.profile
    if s.key and s.secret:
        opts.update(key=s.key, secret=s.secret, **({"token": s.token} if s.token else {}))
    return opts


@lru_cache(maxsize=16)
def _s3fs(settings: S3Settings) -> fsspec.AbstractFileSystem:
    from eagle.io.s3_client import S3FileSystem

    return S3FileSystem(**_options_of(settings))


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    if is_remote(uri):
        return _s3fs(s3_settings(cfg)), strip_scheme(uri)
    return fsspec.filesystem("file"), strip_scheme(uri)


def pyarrow_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (for Parquet and Ray Data) and the path inside it: the local one, or the same S3
    client as `filesystem` (its retries, timeouts, whole-or-nothing writes and retry count) behind pyarrow's
    fsspec handler."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), strip_scheme(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs(s3_settings(cfg)))), strip_scheme(uri)


def retry_counts() -> dict[str, int]:
    """Failed object-store requests of this process so far, per kind (read, list, write); see
    `eagle.io.s3_client.retry_counts`."""
    from eagle.io.s3_client import retry_counts as counts

    return counts()


def add_retry_listener(listener: Callable[[str], None]) -> None:
    """Call `listener` with the kind of every failed object-store request of this process."""
    from eagle.io.s3_client import add_retry_listener as add

    add(listener)


def abort_uploads(prefix: str, name_prefix: str = "", cfg: StorageConfig | None = None) -> int:
    """Abort unfinished multipart uploads under an s3:// `prefix` whose object name starts with `name_prefix`;
    returns how many (0 for local paths, which have none)."""
    if not is_remote(prefix):
        return 0
    from eagle.io.s3_client import abort_uploads as abort

    fs, path = filesystem(prefix, cfg)
    return abort(fs, path, name_prefix)


def open_uri(uri: str, mode: str = "rb", cfg: StorageConfig | None = None) -> IO[Any]:
    """Open a file for reading or writing; parent folders are created for local writes."""
    fs, path = filesystem(uri, cfg)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    """The whole file. On S3 one GET of the current version (no HEAD first: half the requests, and an object
    rewritten meanwhile, such as a renewed lease, is read whole rather than failing as changed)."""
    fs, path = filesystem(uri, cfg)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    with open_uri(uri, "wb", cfg) as fh:
        fh.write(data)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    fs.invalidate_cache(path)  # other processes write to the same prefixes: never answer from a stale listing
    return fs.exists(path)


def list_files(prefix: str, extensions: tuple[str, ...] | list[str] | None = None,
               cfg: StorageConfig | None = None, recursive: bool = True, within: str | None = None
               ) -> list[FileInfo]:
    """Files under `prefix` (recursive unless told), sorted by URI, optionally filtered by extension
    (case-insensitive).

    Local folders and files reached through symlinks are listed under the linked name (datasets often live on
    shared storage); a link back into a folder already being walked, or into `within` (the prefix a part
    belongs to), is reported and not followed. s3fs keeps no listing cache (other processes write to the same
    prefixes, and a cache of millions of keys would live as long as the job)."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    if not is_remote(prefix):
        path = strip_scheme(prefix)
        found = _walk_local(path, within and strip_scheme(within)) if recursive else _local_files(path)
        return sorted((f for f in found if not exts or f.uri.lower().endswith(exts)), key=lambda f: f.uri)
    fs, path = filesystem(prefix, cfg)
    if recursive:
        entries = fs.find(path, detail=True) if fs.exists(path) else {}
    else:
        entries = {e["name"]: e for e in _s3_ls(fs, path) if e.get("type") == "file"}
    out = []
    for name, info in entries.items():
        if info.get("type") == "directory" or (exts and not name.lower().endswith(exts)):
            continue
        version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or "")
        out.append(FileInfo(uri=f"s3://{name}", size=int(info.get("size") or 0), version=str(version).strip('"')))
    return sorted(out, key=lambda f: f.uri)


def list_folders(prefix: str, cfg: StorageConfig | None = None) -> list[str]:
    """The immediate sub-folders of `prefix` (symlinked ones included locally), sorted."""
    if not is_remote(prefix):
        path = strip_scheme(prefix)
        if not os.path.isdir(path):
            return []
        return sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=True))
    fs, path = filesystem(prefix, cfg)
    return sorted(f"s3://{e['name']}" for e in _s3_ls(fs, path) if e.get("type") == "directory")


def _s3_ls(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def _local_files(folder: str) -> list[FileInfo]:
    if os.path.isfile(folder):
        return _walk_local(folder)
    if not os.path.isdir(folder):
        return []
    out = []
    for entry in os.scandir(folder):
        try:
            if entry.is_file(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                out.append(FileInfo(uri=entry.path, size=st.st_size, version=str(st.st_mtime)))
        except OSError:
            log.warning("skipping %s: broken symlink", entry.path)
    return out


def _walk_local(root: str, within: str | None = None) -> list[FileInfo]:
    """Files under a local folder, following symlinks; each real folder is entered once per branch."""
    if os.path.isfile(root):
        st = os.stat(root)
        return [FileInfo(uri=root, size=st.st_size, version=str(st.st_mtime))]
    out: list[FileInfo] = []
    outer = set()
    if within and os.path.isdir(within):
        wst = os.stat(within)
        outer = {(wst.st_dev, wst.st_ino)}
    ancestors: dict[str, set[tuple[int, int]]] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        seen = ancestors.get(os.path.dirname(folder), outer) | {(st.st_dev, st.st_ino)}
        ancestors[folder] = seen
        for d in list(dirs):
            child = os.path.join(folder, d)
            try:
                cst = os.stat(child)
            except OSError:  # a dangling link
                log.warning("skipping %s: broken symlink", child)
                dirs.remove(d)
                continue
            if (cst.st_dev, cst.st_ino) in seen:
                log.warning("not following %s: it links back to %s (a symlink cycle)", child, os.path.realpath(child))
                dirs.remove(d)
        for name in files:
            path = os.path.join(folder, name)
            try:
                fst = os.stat(path)
            except OSError:
                log.warning("skipping %s: broken symlink", path)
                continue
            out.append(FileInfo(uri=path, size=fst.st_size, version=str(fst.st_mtime)))
    return out


def create_exclusive(uri: str, data: bytes, cfg: StorageConfig | None = None) -> bool:
    """Write `uri` only if it does not exist yet (S3: a conditional PUT, ``If-None-Match: *``; locally
    O_EXCL); True when this call created it, False when it was already there."""
    fs, path = filesystem(uri, cfg)
    try:
        if is_remote(uri):
            fs.pipe_file(path, data, mode="create")
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "xb") as fh:
                fh.write(data)
    except FileExistsError:
        return False
    return True


def read_versioned(uri: str, cfg: StorageConfig | None = None) -> tuple[bytes, str] | None:
    """The file and its version in one request (S3: a GET and its ETag; locally a hash of the content), or None
    when it does not exist. The version is what `write_if` and `remove_if` compare against."""
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _local_version(data)
    bucket, _, key = path.partition("/")

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            return await body.read(), resp["ETag"].strip('"')

    try:
        return fsspec.asyn.sync(fs.loop, get)
    except FileNotFoundError:
        return None


def write_if(uri: str, data: bytes, version: str | None, cfg: StorageConfig | None = None) -> str | None:
    """A conditional write, atomic against every other writer of `uri`: with `version` None create the file
    only if it does not exist (S3 ``If-None-Match: *``; locally a hard link of a complete temporary file, which
    fails if the name exists), else replace it only if its current version is `version` (S3 ``If-Match`` on
    the ETag; locally an ``os.replace`` under an exclusive ``flock`` of a sidecar file). Returns the new
    version, or None when the condition did not hold (someone else wrote it first)."""
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        return _local_write_if(path, data, version)
    bucket, _, key = path.partition("/")
    match = {"IfNoneMatch": "*"} if version is None else {"IfMatch": f'"{version}"'}
    try:
        resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **match)
    except (OSError, FileNotFoundError) as exc:
        if _s3_code(exc) in _CONDITION_FAILED or isinstance(exc, FileExistsError):
            return None
        raise
    return str(resp["ETag"]).strip('"')


def remove_if(uri: str, version: str, cfg: StorageConfig | None = None) -> bool:
    """Remove `uri` only if its current version is `version` (S3: a conditional DELETE, ``If-Match``); True when
    this call removed it."""
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        with _local_lock(path):
            try:
                with open(path, "rb") as fh:
                    if _local_version(fh.read()) != version:
                        return False
                os.unlink(path)
            except FileNotFoundError:
                return False
        return True
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{version}"')
    except FileNotFoundError:
        return False
    except OSError as exc:
        if _s3_code(exc) in _CONDITION_FAILED:
            return False
        raise
    return True


_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (its cause is botocore's ClientError)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {})
            return str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        seen = seen.__cause__ or seen.__context__
    return None


def _local_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


class _local_lock:  # noqa: N801 - used as a context manager, like a function
    """An exclusive flock on ``.{name}.lock`` next to `path`: the compare and the swap of a local conditional
    write happen under it."""

    def __init__(self, path: str) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        self.lock_path = os.path.join(folder, f".{name}.lock")

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing drops the flock


def _local_write_if(path: str, data: bytes, version: str | None) -> str | None:
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if version is None:
            try:
                os.link(tmp, path)  # atomic, and fails if the name exists: create-if-absent
            except FileExistsError:
                return None
            except OSError:  # a file system without hard links: check and rename under the lock instead
                with _local_lock(path):
                    if os.path.exists(path):
                        return None
                    os.replace(tmp, path)
            return _local_version(data)
        with _local_lock(path):
            try:
                with open(path, "rb") as fh:
                    if _local_version(fh.read()) != version:
                        return None
            except FileNotFoundError:
                return None
            os.replace(tmp, path)
            return _local_version(data)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def put_folder(local_dir: str, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local folder's files to `uri` (a folder, local or s3://)."""
    fs, path = filesystem(uri, cfg)
    if not is_remote(uri):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def remove(uri: str, cfg: StorageConfig | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, cfg)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
