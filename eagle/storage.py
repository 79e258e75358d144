"""One way to reach files: plain paths, ``file://`` and ``s3://`` through fsspec/s3fs (pyarrow for Ray Data).

Endpoint, region and credentials come from the job's StorageConfig, falling back to the standard AWS
environment variables and config files (botocore's own chain). Credentials are never logged or returned in
anything printable.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from eagle.config import StorageConfig

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


def join(base: str, *parts: str) -> str:
    """Join path parts under a URI, keeping its scheme."""
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def s3_options(cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for ``s3fs.S3FileSystem`` from config, then the AWS environment."""
    cfg = cfg or StorageConfig()
    endpoint = cfg.endpoint_url or _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    region = cfg.region or _env("AWS_REGION") or _env("AWS_DEFAULT_REGION")
    opts: dict[str, Any] = {
        "anon": cfg.anon,
        "config_kwargs": {"retries": {"max_attempts": cfg.max_attempts, "mode": "adaptive"}},
    }
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if cfg.profile:
        opts["profile"] = cfg.profile
    if cfg.access_key_id and cfg.secret_access_key:
        opts["key"] = cfg.access_key_id.get_secret_value()
        opts["secret"] = cfg.secret_access_key.get_secret_value()
        if cfg.session_token:
            opts["token"] = cfg.session_token.get_secret_value()
    return opts


def _freeze(cfg: StorageConfig | None) -> str:
    # Cache key for filesystems: the config's JSON including secrets (never printed) plus relevant env vars.
    cfg = cfg or StorageConfig()
    parts = [cfg.model_dump_json()] + [
        str(cfg.access_key_id and cfg.access_key_id.get_secret_value()),
        str(cfg.secret_access_key and cfg.secret_access_key.get_secret_value()),
    ]
    parts += [os.environ.get(v, "") for v in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                              "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")]
    return "\x00".join(parts)


_configs: dict[str, StorageConfig | None] = {}


@lru_cache(maxsize=16)
def _s3fs(key: str) -> fsspec.AbstractFileSystem:
    import s3fs

    cfg = _configs[key] or StorageConfig()
    fs = s3fs.S3FileSystem(**s3_options(cfg))
    fs.retries = cfg.max_attempts  # s3fs's own retry loop (class attribute, not an init argument)
    return fs


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    if is_remote(uri):
        key = _freeze(cfg)
        _configs[key] = cfg
        return _s3fs(key), strip_scheme(uri)
    return fsspec.filesystem("file"), strip_scheme(uri)


def pyarrow_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A native pyarrow filesystem (the fastest path for Ray Data reads/writes) and the path inside it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), strip_scheme(uri)
    opts = s3_options(cfg)
    kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=(cfg or StorageConfig()).max_attempts)}
    if opts.get("endpoint_url"):
        parsed = urlparse(opts["endpoint_url"])
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    kwargs["region"] = opts.get("client_kwargs", {}).get("region_name") or "us-east-1"
    if "key" in opts:
        kwargs.update(access_key=opts["key"], secret_key=opts["secret"], session_token=opts.get("token"))
    elif _env("AWS_ACCESS_KEY_ID") and _env("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=_env("AWS_ACCESS_KEY_ID"),
            secret_key=_env("AWS_SECRET_ACCESS_KEY"),
            session_token=_env("AWS_SESSION_TOKEN"),
        )
    if opts.get("anon"):
        kwargs["anonymous"] = True
    return pafs.S3FileSystem(**kwargs), strip_scheme(uri)


def open_uri(uri: str, mode: str = "rb", cfg: StorageConfig | None = None) -> IO[Any]:
    """Open a file for reading or writing; parent folders are created for local writes."""
    fs, path = filesystem(uri, cfg)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    with open_uri(uri, "rb", cfg) as fh:
        return fh.read()


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    with open_uri(uri, "wb", cfg) as fh:
        fh.write(data)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    fs.invalidate_cache(path)  # other processes write to the same prefixes: never answer from a stale listing
    return fs.exists(path)


def list_files(prefix: str, extensions: tuple[str, ...] | list[str] | None = None,
               cfg: StorageConfig | None = None) -> list[FileInfo]:
    """All files under `prefix` (recursive), sorted by URI, optionally filtered by extension (case-insensitive).

    Local folders and files reached through symlinks are listed under the linked name (datasets often live on
    shared storage); a link back into a folder already being walked is reported and not followed again."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    if not is_remote(prefix):
        found = _walk_local(strip_scheme(prefix))
        return sorted((f for f in found if not exts or f.uri.lower().endswith(exts)), key=lambda f: f.uri)
    fs, path = filesystem(prefix, cfg)
    fs.invalidate_cache(path)  # other processes write to the same prefixes: never answer from a stale listing
    if not fs.exists(path):
        return []
    out = []
    for name, info in fs.find(path, detail=True).items():
        if info.get("type") == "directory" or (exts and not name.lower().endswith(exts)):
            continue
        version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or "")
        out.append(FileInfo(uri=f"s3://{name}", size=int(info.get("size") or 0), version=str(version).strip('"')))
    return sorted(out, key=lambda f: f.uri)


def _walk_local(root: str) -> list[FileInfo]:
    """Files under a local folder, following symlinks; each real folder is entered once per branch."""
    if os.path.isfile(root):
        st = os.stat(root)
        return [FileInfo(uri=root, size=st.st_size, version=str(st.st_mtime))]
    out: list[FileInfo] = []
    ancestors: dict[str, set[tuple[int, int]]] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        seen = ancestors.get(os.path.dirname(folder), set()) | {(st.st_dev, st.st_ino)}
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


def remove(uri: str, cfg: StorageConfig | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, cfg)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
