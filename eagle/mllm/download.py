"""Checkpoints in object storage: an s3:// model prefix is downloaded once per content version into a local
cache that ``from_pretrained`` reads."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from eagle.io.storage import StorageConfig, filesystem, is_remote, list_files, strip_scheme


def _default_cache() -> Path:
    return Path(os.environ.get("EAGLE_MODEL_CACHE") or Path.home() / ".cache" / "eagle" / "models")


def resolve_model_source(model: str, storage: StorageConfig | None = None, cache_dir: str | None = None) -> str:
    """A path or hub id `from_pretrained` accepts. An s3:// prefix is downloaded once per content version.

    The local copy lives under `cache_dir` (default $EAGLE_MODEL_CACHE or ~/.cache/eagle/models) in a folder
    named by the prefix and its listing (names, sizes, ETags), so a changed checkpoint is fetched again.
    """
    if not is_remote(model):
        return model
    prefix = model.rstrip("/") + "/"
    files = list_files(prefix, cfg=storage)
    if not files:
        raise FileNotFoundError(f"no model files under {model}")
    listing = "\n".join(f"{f.uri}\t{f.size}\t{f.version}" for f in files)
    local = Path(cache_dir or _default_cache()) / hashlib.sha256(listing.encode()).hexdigest()[:20]
    if (local / ".complete").exists():
        return str(local)
    fs, _ = filesystem(prefix, storage)
    tmp = local.with_name(f"{local.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        dest = tmp / f.uri[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(strip_scheme(f.uri), str(dest))
    (tmp / ".complete").touch()
    try:
        tmp.rename(local)
    except OSError:  # another process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)
