"""Dataset layouts: which images of a data root are training normals, which are test images, their labels and
masks — for every layout the project reads, in one place (fit, evaluate and inspect's product names use it).

Per layout, what a product folder holds; train = the images a fit uses, test = what evaluate scores:

* ``mvtec_ad`` (also ``mpdd``, the same layout): train ``train/good``; test ``test/good`` (normal) and
  ``test/<defect>``; masks ``ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``).
* ``mvtec_ad2``: train ``train/good`` (``validation/good`` is not used); test ``test_public/good`` and
  ``test_public/bad``; masks ``test_public/ground_truth/bad/<stem>_mask.png``.
* ``mvtec_loco``: train ``train/good``; test ``test/good``, ``test/logical_anomalies``,
  ``test/structural_anomalies``; masks ``ground_truth/<type>/<stem>/*.png`` (several per image, united).
* ``visa`` (as downloaded: ``Data/Images/{Normal,Anomaly}``, ``Data/Masks/Anomaly``, the root holding
  ``split_csv/1cls.csv``): train and test as the CSV's rows say (label normal / anomaly), masks per row.
* ``btech``: train ``train/ok``; test ``test/ok`` and ``test/ko``; masks ``ground_truth/ko/<stem>.png``.
* ``folder``: train ``normal/``; test ``normal_test/`` (optional) and ``abnormal/``; masks ``mask/`` (optional).

Products are the root's child folders (a root that is itself one product folder is that product). Local data
is parsed with anomalib 2.7's own parsers (``anomalib.data.datasets.image``: ``make_mvtec_ad_dataset``,
``make_mvtec2_dataset``, MVTec LOCO's ``make_dataset``, ``make_btech_dataset``, ``make_folder_dataset``; VisA:
the rules of anomalib's ``Visa.apply_cls1_split`` over ``split_csv/1cls.csv``, without copying files; MVTec
LOCO: its parser's rules over the listing, as anomalib's own fails under pandas 3); ``s3://`` data with the same
rules over the object listing (`rules_samples`), except ``folder``, which is refused there. A layout is
detected from the folder (`detect_layout`); ``--layout NAME`` forces one.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eagle.config import ConfigError, StorageConfig
from eagle.config.sections import IMAGE_EXTENSIONS
from eagle.io import storage

NORMAL = "good"
LAYOUTS = ("mvtec_ad", "mvtec_ad2", "mvtec_loco", "visa", "btech", "mpdd", "folder")
LOCAL_ONLY = ("folder",)
# anomalib 2.7's MVTec LOCO parser fails under the locked pandas 3 (it assigns lists of mask paths into a string
# column: "Invalid value for dtype 'str'"), so LOCO is read with the same rules over the listing, local too.
_BY_RULES = ("visa", "mvtec_loco")
# Folders of these layouts that sit between a product and its images: never products (inspect's naming).
SPLIT_FOLDERS = ("train", "test", "validation", "test_public", "test_private", "test_private_mixed")
LAYOUT_FOLDERS = (*SPLIT_FOLDERS, "good", "ground_truth", "images", "Data", "Images", "Masks", "Normal", "Anomaly",
                  "split_csv", "ok", "ko", "normal", "abnormal", "normal_test", "mask")
_FOLDER_DIRS = ("normal", "abnormal", "normal_test", "mask")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: its split (train or test), label and masks."""

    uri: str
    product: str
    split: str  # "train" or "test"
    defect: str  # "good" for normal images; else the defect type (the layout's class folder or label)
    masks: tuple[str, ...] = ()

    @property
    def anomalous(self) -> bool:
        return self.defect != NORMAL


def _rel(uri: str, root: str) -> str:
    base = storage.strip_scheme(root).rstrip("/")
    return storage.strip_scheme(uri)[len(base) + 1:]


def _listing(root: str, cfg: StorageConfig | None) -> list[str]:
    """Every file below `root`, relative to it."""
    return sorted(_rel(f.uri, root) for f in storage.list_files(root, None, cfg))


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def detect_layout(root: str, cfg: StorageConfig | None = None, files: Sequence[str] | None = None) -> str:
    """The layout of a data root, from its files (see the module table); ConfigError when none fits."""
    files = _listing(root, cfg) if files is None else files
    parts = [f.split("/") for f in files]
    if "split_csv/1cls.csv" in files:
        return "visa"
    if any("test_public" in p[:-1] for p in parts):
        return "mvtec_ad2"
    if any(len(p) >= 3 and p[-3] in ("logical_anomalies", "structural_anomalies") and p[-4:-3] == ["ground_truth"]
           for p in parts) or any(p[-2:-1] in (["logical_anomalies"], ["structural_anomalies"]) for p in parts):
        return "mvtec_loco"
    if any(p[-3:-1] == ["train", "ok"] for p in parts if _is_image(p[-1])):
        return "btech"
    if any(p[-3:-1] == ["train", "good"] for p in parts if _is_image(p[-1])):
        return "mvtec_ad"
    if any(p[-2:-1] == ["normal"] for p in parts if _is_image(p[-1])):
        return "folder"
    if any(p[-3:-2] == ["test"] for p in parts if _is_image(p[-1])):  # test images only (an evaluation root)
        return "mvtec_ad"
    raise ConfigError(f"{root}: no known dataset layout (none of {', '.join(LAYOUTS)}; e.g. MVTec AD's "
                      f"PRODUCT/train/good/*.png); check the path, or force one with --layout NAME")


def check_layout(layout: str | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def _product_roots(root: str, files: Sequence[str], markers: tuple[str, ...]) -> dict[str, str]:
    """Product name -> its folder relative to root ('' when the root is the product folder): the folders that
    contain one of `markers` (folder names such as 'train' or 'Data') one level below them."""
    products: dict[str, str] = {}
    for f in files:
        p = f.split("/")
        if len(p) > 1 and p[0] in markers:
            products[posixpath.basename(storage.strip_scheme(root).rstrip("/")) or "root"] = ""
        elif len(p) > 2 and p[1] in markers:
            products[p[0]] = p[0]
    return products


_SPLITTED = ("train", "test")
_MARKERS = {"mvtec_ad": _SPLITTED, "mpdd": _SPLITTED, "mvtec_ad2": ("train", "test_public"), "mvtec_loco": _SPLITTED,
            "btech": _SPLITTED, "visa": ("Data",), "folder": ("normal", "abnormal")}


def load_samples(root: str, layout: str | None = None, cfg: StorageConfig | None = None,
                 products: Iterable[str] | None = None) -> tuple[str, list[Sample]]:
    """(layout, every train and test image of the root's products) in the given or detected layout."""
    files = _listing(root, cfg)
    layout = check_layout(layout) or detect_layout(root, cfg, files)
    if storage.is_remote(root) and layout in LOCAL_ONLY:
        raise ConfigError(f"layout {layout} is read from local folders only (anomalib's parser); copy {root} to a "
                          f"local folder, or use a manifest for inspect")
    wanted = set(products) if products is not None else None
    found = _product_roots(root, files, _MARKERS[layout])
    if layout == "visa":
        found = {p: p for p in _visa_categories(root, cfg)} | found
    samples: list[Sample] = []
    for product, folder in sorted(found.items()):
        if wanted is not None and product not in wanted:
            continue
        if storage.is_remote(root) or layout in _BY_RULES:
            samples += rules_samples(root, layout, product, folder, [f for f in files if _under(f, folder)], cfg)
        else:
            samples += anomalib_samples(root, layout, product, folder)
    return layout, samples


def _under(path: str, folder: str) -> bool:
    return not folder or path.startswith(folder + "/")


def _visa_categories(root: str, cfg: StorageConfig | None) -> list[str]:
    return sorted({row[0] for row in _visa_rows(root, cfg)})


def _visa_rows(root: str, cfg: StorageConfig | None) -> list[list[str]]:
    text = storage.read_bytes(storage.join(root, "split_csv", "1cls.csv"), cfg).decode()
    rows = list(csv.reader(io.StringIO(text)))[1:]  # header: object, split, label, image, mask
    return [r for r in rows if len(r) >= 4]


# ------------------------------------------------------------------------------------ anomalib (local)
def anomalib_samples(root: str, layout: str, product: str, folder: str) -> list[Sample]:
    """A local product folder parsed by anomalib's own parser for the layout."""
    from pathlib import Path

    path = Path(storage.strip_scheme(root)) / folder if folder else Path(storage.strip_scheme(root))
    exts = tuple(e for x in IMAGE_EXTENSIONS for e in (x, x.upper()))
    try:
        frame = _parse(layout, path, exts)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # anomalib: "Found 0 images", MisMatchError
        # (ValueError), a defective image without its mask (TypeError)
        raise ConfigError(f"{path} is not a {layout} product folder (anomalib's parser: {exc}); check --data, or "
                          f"--layout") from None
    resolved, base = path.resolve(), storage.join(root, folder) if folder else root

    def under(found: str) -> str:
        """anomalib resolves the root (symlinks too): the file under the name the caller gave."""
        p = Path(found)
        return storage.join(base, p.relative_to(resolved).as_posix()) if p.is_relative_to(resolved) else found

    if not (frame.label_index == 0).any():
        raise ConfigError(f"{path} is not a {layout} product folder (anomalib's parser finds no normal images); "
                          f"check --data, or --layout")
    out = []
    for row in frame.itertuples(index=False):
        if row.split not in ("train", "test"):
            continue  # validation images: neither fitted on nor evaluated
        masks = row.mask_path if isinstance(row.mask_path, list) else [row.mask_path] if row.mask_path else []
        normal = int(row.label_index) == 0
        defect = NORMAL if normal else "bad" if layout == "folder" or str(row.label) == NORMAL else str(row.label)
        if row.split == "train" and not normal:
            continue
        out.append(Sample(under(row.image_path), product, row.split, defect,
                          tuple(under(m) for m in masks if isinstance(m, str) and m) if not normal else ()))
    return sorted(out, key=lambda s: s.uri)


def _parse(layout: str, path: Any, exts: tuple[str, ...]) -> Any:
    """anomalib's DataFrame (columns split, label, label_index, image_path, mask_path) of one product folder."""
    from anomalib.data.datasets.image import btech, mvtecad, mvtecad2
    from anomalib.data.datasets.image import folder as folder_ds

    if layout in ("mvtec_ad", "mpdd"):
        frame = mvtecad.make_mvtec_ad_dataset(path, extensions=exts)
    elif layout == "mvtec_ad2":
        frame = mvtecad2.make_mvtec2_dataset(path, extensions=exts)
    elif layout == "btech":
        frame = btech.make_btech_dataset(path)
    elif layout == "folder":
        present = {d: path / d for d in _FOLDER_DIRS if (path / d).is_dir()}
        frame = folder_ds.make_folder_dataset(normal_dir=present["normal"], abnormal_dir=present.get("abnormal"),
                                              normal_test_dir=present.get("normal_test"),
                                              mask_dir=present.get("mask"), extensions=exts)
    else:
        raise ConfigError(f"layout {layout}: no local parser")
    return frame


# ------------------------------------------------------------------------------- rules over a listing
def rules_samples(root: str, layout: str, product: str, folder: str, files: Sequence[str],
                  cfg: StorageConfig | None = None) -> list[Sample]:
    """The same rules as anomalib's parsers, over a listing (`files`: paths relative to `root`): for
    object stores, and for VisA (whose split is a CSV)."""
    base = storage.join(root, folder) if folder else root
    rel = [f[len(folder) + 1:] if folder else f for f in files]
    present = set(rel)
    uri = lambda p: storage.join(base, p)  # noqa: E731
    out: list[Sample] = []
    if layout == "visa":
        for obj, split, label, image, *mask in _visa_rows(root, cfg):
            if obj != product or split not in ("train", "test"):
                continue
            defect = NORMAL if label == "normal" else "bad"
            if split == "train" and defect != NORMAL:
                continue
            masks = (storage.join(root, mask[0]),) if defect != NORMAL and mask and mask[0] else ()
            out.append(Sample(storage.join(root, image), product, split, defect, masks))
        return sorted(out, key=lambda s: s.uri)
    if layout == "mvtec_loco":  # anomalib's make_dataset: masks ground_truth/<type>/<image stem>/*.png
        for f in rel:
            p = f.split("/")
            if not _is_image(p[-1]) or len(p) != 3 or p[0] not in ("train", "test") or \
                    (p[0] == "train" and p[1] != NORMAL):
                continue
            stem = posixpath.splitext(p[2])[0]
            masks = tuple(uri(m) for m in rel if m.startswith(f"ground_truth/{p[1]}/{stem}/") and _is_image(m))
            out.append(Sample(uri(f), product, p[0], p[1], masks if p[1] != NORMAL else ()))
        return sorted(out, key=lambda s: s.uri)
    train_class, test_folder, normal = {"btech": ("ok", "test", "ok"), "mvtec_ad2": ("good", "test_public", "good")
                                        }.get(layout, ("good", "test", "good"))
    for f in rel:
        p = f.split("/")
        if not _is_image(p[-1]) or len(p) != 3:
            continue
        split, label, name = p
        stem = posixpath.splitext(name)[0]
        if split == "train" and label == train_class:
            out.append(Sample(uri(f), product, "train", NORMAL))
        elif split == test_folder and label != "ground_truth":
            if label == normal:
                out.append(Sample(uri(f), product, "test", NORMAL))
                continue
            if layout == "mvtec_ad2":
                candidates = [f"test_public/ground_truth/{label}/{stem}_mask.png"]
            elif layout == "btech":
                candidates = [f"ground_truth/{label}/{stem}.png"]
            else:
                candidates = [f"ground_truth/{label}/{stem}_mask.png", f"ground_truth/{label}/{stem}.png"]
            masks = tuple(uri(c) for c in candidates if c in present)[:1]
            out.append(Sample(uri(f), product, "test", label, masks))
    return sorted(out, key=lambda s: s.uri)


def train_uris(root: str, product: str, layout: str | None = None, cfg: StorageConfig | None = None) -> list[str]:
    """The product's training images (normal, train split) in the layout. With the layout given, only the
    product's folder is listed when it has one (every layout but VisA, whose split is the root's CSV)."""
    folder = storage.join(root, product)
    if layout is not None and layout != "visa" and storage.exists(folder, cfg):
        root = folder
    return [s.uri for s in load_samples(root, layout, cfg, [product])[1] if s.split == "train"]


def list_products(root: str, layout: str | None = None, cfg: StorageConfig | None = None) -> list[str]:
    """Products with training images."""
    return sorted({s.product for s in load_samples(root, layout, cfg)[1] if s.split == "train"})
