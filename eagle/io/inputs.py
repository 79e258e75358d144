"""Which images a job audits: list prefixes (recursively) or read a manifest, and name each image's product.

The listing is a pyarrow table (uri, product, image_version, image_size_bytes), sorted by product then URI so
that Ray blocks stay product-homogeneous and an actor's bounded cache of memory banks does not thrash.
"""

from __future__ import annotations

import fnmatch
import io
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from eagle.config import ConfigError, InputConfig, StorageConfig
from eagle.io import storage

LISTING_SCHEMA = pa.schema([("image_uri", pa.string()), ("product", pa.string()),
                            ("image_version", pa.string()), ("image_size_bytes", pa.int64())])

# MVTec-AD / VisA folders that sit between a product and its images; never products themselves.
_SPLITS = {"train", "test", "validation"}
_NOT_PRODUCTS = _SPLITS | {"good", "ground_truth", "images", "Data"}


def product_of(uri: str, prefix: str) -> str:
    """First path segment below `prefix`, so an MVTec-layout root works as is. When the prefix already points
    into one product (images directly in it, or the prefix is its train/test folder) the product is the
    prefix's nearest ancestor that is not a split folder."""
    base = storage.strip_scheme(prefix).rstrip("/")
    path = storage.strip_scheme(uri)
    rel = posixpath.relpath(path, base) if path.startswith(base + "/") else posixpath.basename(path)
    parts = rel.split("/")
    if len(parts) > 1 and parts[0] not in _NOT_PRODUCTS and posixpath.basename(base) not in _SPLITS:
        return parts[0]
    while posixpath.basename(base) in _SPLITS:
        base = posixpath.dirname(base)
    return posixpath.basename(base) or "unknown"


def _excluded(uri: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(uri, p) for p in patterns)


def list_prefix(prefix: str, extensions: list[str], exclude: list[str],
                cfg: StorageConfig | None = None) -> pa.Table:
    files = [f for f in storage.list_files(prefix, tuple(extensions), cfg) if not _excluded(f.uri, exclude)]
    return pa.table({
        "image_uri": [f.uri for f in files],
        "product": [product_of(f.uri, prefix) for f in files],
        "image_version": [f.version for f in files],
        "image_size_bytes": [f.size for f in files],
    }, schema=LISTING_SCHEMA)


def read_manifest(uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """A Parquet or CSV manifest with a 'uri' column and optionally 'product'."""
    data = storage.read_bytes(uri, cfg)
    table = pq.read_table(io.BytesIO(data)) if uri.lower().endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    if "uri" not in table.column_names:
        raise ConfigError(f"manifest {uri} has no 'uri' column (columns: {', '.join(table.column_names)})")
    uris = [str(u) for u in table.column("uri").to_pylist()]
    products = (table.column("product").cast(pa.string()).to_pylist() if "product" in table.column_names
                else [product_of(u, posixpath.dirname(posixpath.dirname(u))) for u in uris])
    return pa.table({
        "image_uri": uris,
        "product": [p or "unknown" for p in products],
        "image_version": [""] * len(uris),  # filled when the image is read (content hash)
        "image_size_bytes": pa.nulls(len(uris), pa.int64()),
    }, schema=LISTING_SCHEMA)


def _is_safe(product: str) -> bool:
    try:
        return bool(storage.safe_segment(product, "product"))
    except ValueError:
        return False


def check_products(products: list[str]) -> None:
    """Product names become path segments (Hive partitions, model-store folders): refuse anything that could
    leave its prefix ('..', '/', odd characters) before a single file is written."""
    bad = sorted({p for p in products if not _is_safe(p)})
    if bad:
        raise ConfigError(f"unsafe product name(s) {bad[:5]}: use letters, digits, '.', '_' and '-' "
                          f"(no '..'); fix the manifest's 'product' column or the folder names")


def list_inputs(cfg: InputConfig, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """All input images, deduplicated by URI, sorted by (product, uri); product names are validated."""
    tables = [list_prefix(p, cfg.extensions, cfg.exclude, storage_cfg) for p in cfg.uris]
    if cfg.manifest:
        tables.append(read_manifest(cfg.manifest, storage_cfg))
    if not tables:
        raise ConfigError("no inputs: give inputs.uris (--input) or inputs.manifest")
    table = pa.concat_tables(tables)
    seen: set[str] = set()
    first = [not (u in seen or seen.add(u)) for u in table.column("image_uri").to_pylist()]
    table = table.filter(pa.array(first, pa.bool_()))
    check_products(pc.unique(table.column("product")).to_pylist())
    return table.take(pc.sort_indices(table, [("product", "ascending"), ("image_uri", "ascending")]))
