"""Versioned per-product expert artifacts in a model store (local path or s3://): safetensors + JSON, no pickle.

Layout::

    {store}/{product}/{version}/tensors.safetensors   the model's tensors (`ExpertModel.tensors`)
    {store}/{product}/{version}/meta.json             everything else (backbone, threshold, training scores, ...)
    {store}/{product}/LATEST.{model}                  the version of the newest fit of each expert model
    {store}/{product}/LATEST                          the product's default expert: the newest fit of the
                                                      first model a fit job was given

The version is a content hash of both files, so loading can check that neither changed by a single byte;
fitting the same data with the same config and libraries gives the same version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eagle.expert.experts import DEFAULT_MODEL, model_name
from eagle.io.storage import StorageConfig, exists, join, read_bytes, safe_segment, write_bytes

if TYPE_CHECKING:  # reading metadata (evaluation, version pinning) never loads torch
    import torch

FORMAT = "eagle-expert/1"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
# Version pointers, one file each in the product's folder: ``LATEST`` names its default expert, ``LATEST.<model>``
# each model's newest fit (the files keep their names; not to be confused with an output's `latest` results)
DEFAULT_POINTER = "LATEST"


def pointer_file(model: str | None = None) -> str:
    """The version pointer to a product's newest fit of `model` (None or 'auto': its default expert)."""
    return DEFAULT_POINTER if model in (None, "auto") else f"{DEFAULT_POINTER}.{_segment(model, 'model')}"


class ArtifactError(ValueError):
    """A missing, unreadable or tampered artifact."""


@dataclass(frozen=True)
class ExpertArtifact:
    """One loaded, verified artifact."""

    product: str
    version: str
    uri: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"]["value"])

    @property
    def score_max(self) -> float:
        return float(self.meta["threshold"]["score_max"])

    @property
    def memory_bank(self) -> torch.Tensor:
        return self.tensors["memory_bank"]


def _segment(name: str, what: str) -> str:
    try:
        return safe_segment(name, what)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None


def content_version(meta_bytes: bytes, tensor_bytes: bytes) -> str:
    """16 hex chars of SHA-256 over the format tag and the hashes of both files."""
    digest = hashlib.sha256(FORMAT.encode())
    digest.update(hashlib.sha256(meta_bytes).digest())
    digest.update(hashlib.sha256(tensor_bytes).digest())
    return digest.hexdigest()[:16]


def save_artifact(store: str, product: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  storage: StorageConfig | None = None, set_default: bool = True) -> str:
    """Write the artifact, then move ``LATEST.<model>`` and (`set_default`) ``LATEST`` to it (last, so readers
    never see a half-written version)."""
    from safetensors.torch import save as save_tensors

    _segment(product, "product")
    tensor_bytes = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    meta = {**meta, "format": FORMAT, "product": product,
            "files": {TENSORS_FILE: hashlib.sha256(tensor_bytes).hexdigest()}}
    meta_bytes = json.dumps(meta, sort_keys=True, indent=1, allow_nan=False).encode()
    version = content_version(meta_bytes, tensor_bytes)
    base = join(store, product, version)
    write_bytes(join(base, TENSORS_FILE), tensor_bytes, storage)
    write_bytes(join(base, META_FILE), meta_bytes, storage)
    pointers = [pointer_file(model_name(meta))] + ([DEFAULT_POINTER] if set_default else [])
    for pointer in pointers:
        write_bytes(join(store, product, pointer), f"{version}\n".encode(), storage)
    return version


def resolve_version(store: str, product: str, version: str = "latest",
                    storage: StorageConfig | None = None, model: str | None = None) -> str:
    """The concrete version for 'latest' or the version given. 'latest' reads the product's pointer for
    `model` (None or 'auto': ``LATEST``, its default expert; a name: ``LATEST.<name>``). A store written before
    there were several models has only ``LATEST``: it stands for PatchCore when it names a PatchCore artifact."""
    _segment(product, "product")
    if version != "latest":
        return _segment(version, "version")
    pointer = join(store, product, pointer_file(model))
    if exists(pointer, storage):
        return _segment(read_bytes(pointer, storage).decode().strip(), "version in LATEST")
    if model == DEFAULT_MODEL and exists(join(store, product, DEFAULT_POINTER), storage):
        found = resolve_version(store, product, storage=storage)
        if model_name(read_meta(store, product, found, storage)) == model:
            return found
    what = "fitted expert" if model in (None, "auto") else f"fitted {model} expert"
    raise ArtifactError(f"no {what} for product {product!r} in {store} ({pointer} missing)")


def load_artifact(store: str, product: str, version: str = "latest",
                  storage: StorageConfig | None = None, model: str | None = None) -> ExpertArtifact:
    """Read and verify an artifact; raises ArtifactError if it is missing or its content hash does not match."""
    from safetensors.torch import load as load_tensors

    version = resolve_version(store, product, version, storage, model)
    base = join(store, product, version)
    try:
        meta_bytes = read_bytes(join(base, META_FILE), storage)
        tensor_bytes = read_bytes(join(base, TENSORS_FILE), storage)
    except FileNotFoundError as err:
        raise ArtifactError(f"artifact {base} is incomplete: {err}") from None
    actual = content_version(meta_bytes, tensor_bytes)
    if actual != version:
        raise ArtifactError(f"artifact {base} fails its content check (files hash to {actual}, expected "
                            f"{version}): it was modified or damaged; refit the product or restore the files")
    meta = json.loads(meta_bytes)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"artifact {base} has format {meta.get('format')!r}; this code reads {FORMAT}")
    return ExpertArtifact(product=product, version=version, uri=base, meta=meta, tensors=load_tensors(tensor_bytes))


def read_meta(store: str, product: str, version: str = "latest",
              storage: StorageConfig | None = None) -> dict[str, Any]:
    """An artifact's ``meta.json`` alone (no tensors, no content check): for reports and evaluation."""
    version = resolve_version(store, product, version, storage)
    uri = join(store, product, version, META_FILE)
    if not exists(uri, storage):
        raise ArtifactError(f"artifact {join(store, product, version)} has no {META_FILE}")
    return {**json.loads(read_bytes(uri, storage)), "uri": uri}
