"""Which images a job audits, as a listing with columns (image_uri, product, image_version, image_size_bytes),
from three sources, none of which goes through driver memory row by row:

* a prefix (local or s3://): split into its child prefixes, each listed by one task (`list_part`) that
  writes an Arrow/Parquet part; products derived with vectorised Arrow code;
* a manifest (Parquet or CSV with a 'uri' column, optionally 'product', 'image_version' (a change token such
  as an ETag; without one, incremental runs match images by URI) and 'image_size_bytes'): read by DuckDB;
* an S3 Inventory report (its ``manifest.json``; CSV or Parquet data files): read by DuckDB, no LIST at all.

The product of an image is the first path segment below its input prefix, so a dataset root in any layout of
`eagle.io.layouts` (MVTec AD / AD 2 / LOCO, VisA, BTech, MPDD, folder) works as is; for manifests and
inventories without a product column it is the nearest folder above the image that is neither one of those
layouts' split/class folders (``train``, ``test_public``, ``Data/Images/Anomaly``, ...) nor a defect folder
below a split.
"""

from __future__ import annotations

import json
import posixpath
import re

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from eagle.config import ConfigError, InputConfig
from eagle.io import storage
from eagle.io.layouts import LAYOUT_FOLDERS, SPLIT_FOLDERS
from eagle.io.querying import connect, sql_list, sql_str
from eagle.io.storage import StorageConfig

LISTING_SCHEMA = pa.schema([("image_uri", pa.string()), ("product", pa.string()),
                            ("image_version", pa.string()), ("image_size_bytes", pa.int64())])

# Folders of the dataset layouts that sit between a product and its images; never products themselves.
_SPLITS = SPLIT_FOLDERS
_NOT_PRODUCTS = LAYOUT_FOLDERS


def is_inventory(uri: str) -> bool:
    return posixpath.basename(uri.rstrip("/")) == "manifest.json"


def _prefix_product(base: str) -> str:
    """The product when images sit directly in (or in split folders of) the prefix: its nearest ancestor
    that is not a split folder."""
    while posixpath.basename(base) in _SPLITS:
        base = posixpath.dirname(base)
    return posixpath.basename(base) or "unknown"


def products_below(uris: pa.Array, prefix: str) -> pa.Array:
    """Vectorised: the first path segment of each URI below `prefix` (see module docstring)."""
    base = storage.strip_scheme(prefix).rstrip("/")
    scheme = "s3://" if storage.is_remote(prefix) else ""
    rel = pc.utf8_slice_codeunits(uris, len(scheme) + len(base) + 1)
    parts = pc.split_pattern(rel, "/")
    first = pc.list_element(parts, 0)
    usable = pc.and_(pc.greater(pc.list_value_length(parts), 1), pc.invert(pc.is_in(first, pa.array(_NOT_PRODUCTS))))
    if posixpath.basename(base) in _SPLITS:
        usable = pa.array([False] * len(uris))
    return pc.if_else(usable, first, _prefix_product(base))


def _excluded(uris: pa.Array, patterns: list[str]) -> pa.Array:
    """Vectorised fnmatch ('*' spans '/'): which URIs match any exclude pattern."""
    hit = pa.array([False] * len(uris))
    for p in patterns:
        regex = "^" + re.escape(p).replace(r"\*", ".*").replace(r"\?", ".") + "$"
        hit = pc.or_(hit, pc.match_substring_regex(uris, regex))
    return hit


def list_part(prefix: str, part: str, extensions: list[str], exclude: list[str], recursive: bool,
              cfg: StorageConfig | None = None) -> pa.Table:
    """The images under `part` (a child folder of the input `prefix`, or the prefix itself non-recursively)."""
    files = storage.list_files(part, tuple(extensions), cfg, recursive=recursive, within=prefix)
    uris = pa.array([f.uri for f in files], pa.string())
    table = pa.table({"image_uri": uris, "product": products_below(uris, prefix),
                      "image_version": pa.array([f.version for f in files], pa.string()),
                      "image_size_bytes": pa.array([f.size for f in files], pa.int64())}, schema=LISTING_SCHEMA)
    return table.filter(pc.invert(_excluded(uris, exclude))) if exclude and len(uris) else table


def parts_of(prefix: str, cfg: StorageConfig | None = None) -> list[tuple[str, bool]]:
    """How to split listing a prefix: each child folder recursively, plus the prefix's own files."""
    folders = storage.list_folders(prefix, cfg)
    return [(prefix, False)] + [(f, True) for f in folders]


def _uri_filter_sql(column: str, cfg: InputConfig) -> str:
    exts = " OR ".join(f"lower({column}) LIKE {sql_str('%' + e.lower())}" for e in cfg.extensions)
    excl = " AND ".join(f"NOT ({column} GLOB {sql_str(p)})" for p in cfg.exclude)
    return f"({exts})" + (f" AND {excl}" if excl else "")


def _folder_product_sql(uri: str) -> str:
    """SQL: the nearest folder above an image that is neither a layout folder nor a class folder directly below
    a split folder (manifests, inventories)."""
    dirs = f"string_split({uri}, '/')[1:-2]"  # every folder of the URI, without the file name
    not_product, split = sql_list(_NOT_PRODUCTS), sql_list(_SPLITS)
    named = (f"list_transform(range(1, len({dirs}) + 1), lambda i: CASE WHEN NOT list_contains({not_product}, "
             f"{dirs}[i]) AND (i = 1 OR NOT list_contains({split}, {dirs}[i - 1])) THEN {dirs}[i] END)")
    return f"coalesce(list_filter({named}, lambda x: x IS NOT NULL)[-1], 'unknown')"


def manifest_sql(uri: str, columns: list[str], cfg: InputConfig) -> str:
    """SQL for a Parquet/CSV manifest as a listing (`columns`: the manifest's column names)."""
    if "uri" not in columns:
        raise ConfigError(f"manifest {uri} has no 'uri' column (columns: {', '.join(columns)})")
    reader = "read_parquet" if uri.lower().endswith(".parquet") else "read_csv"
    product = "coalesce(CAST(product AS VARCHAR), {0})" if "product" in columns else "{0}"
    product = product.format(_folder_product_sql("uri"))
    version = "coalesce(CAST(image_version AS VARCHAR), '')" if "image_version" in columns else "''"
    size = "CAST(image_size_bytes AS BIGINT)" if "image_size_bytes" in columns else "NULL::BIGINT"
    return (f"SELECT CAST(uri AS VARCHAR) AS image_uri, {product} AS product, {version} AS image_version, "
            f"{size} AS image_size_bytes FROM {reader}({sql_str(uri)})")


def manifest_source_sql(con: duckdb.DuckDBPyConnection, cfg: InputConfig,
                        storage_cfg: StorageConfig | None = None) -> str:
    """SQL for ``inputs.manifest`` as a listing: an S3 Inventory ``manifest.json`` or a Parquet/CSV manifest."""
    uri = cfg.manifest
    if is_inventory(uri):
        return inventory_sql(uri, cfg, storage_cfg)
    reader = "read_parquet" if uri.lower().endswith(".parquet") else "read_csv"
    columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}({sql_str(uri)})").fetchall()]
    return manifest_sql(uri, columns, cfg)


def inventory_sql(uri: str, cfg: InputConfig, storage_cfg: StorageConfig | None = None) -> str:
    """SQL for an S3 Inventory report (``manifest.json`` → its CSV or Parquet data files) as a listing."""
    manifest = json.loads(storage.read_bytes(uri, storage_cfg))
    bucket = manifest["destinationBucket"].rsplit(":", 1)[-1]
    files = [f"s3://{bucket}/{f['key']}" for f in manifest["files"]]
    if storage.is_remote(uri) and not uri.startswith(f"s3://{bucket}/"):
        raise ConfigError(f"inventory {uri}: data files are in bucket {bucket}, not next to the manifest")
    if not storage.is_remote(uri):  # a downloaded report: data files sit beside manifest.json's bucket folder
        root = posixpath.dirname(posixpath.dirname(posixpath.dirname(storage.strip_scheme(uri))))
        files = [posixpath.join(root, f["key"]) for f in manifest["files"]]
    fmt = manifest.get("fileFormat", "CSV").upper()
    if fmt == "CSV":
        names = [c.strip() for c in manifest["fileSchema"].split(",")]
        cols = "{" + ", ".join(f"{sql_str(n)}: 'VARCHAR'" for n in names) + "}"
        source = f"read_csv({sql_list(files)}, header = false, columns = {cols})"
        bucket_col, key, size, etag = "Bucket", "url_decode(Key)", "Size", "ETag"
    elif fmt == "PARQUET":
        source = f"read_parquet({sql_list(files)})"
        bucket_col, key, size, etag = "bucket", "key", "size", "e_tag"
    else:
        raise ConfigError(f"inventory {uri}: format {fmt} is not supported (use CSV or Parquet reports)")
    image = f"'s3://' || {bucket_col} || '/' || {key}"
    return (f"SELECT image_uri, {_folder_product_sql('image_uri')} AS product, image_version, image_size_bytes "
            f"FROM (SELECT {image} AS image_uri, trim(CAST({etag} AS VARCHAR), '\"') AS image_version, "
            f"CAST({size} AS BIGINT) AS image_size_bytes FROM {source}) WHERE {_uri_filter_sql('image_uri', cfg)}")


def product_of(uri: str, prefix: str) -> str:
    """The product of one image listed under `prefix` (`products_below` for a single URI)."""
    return products_below(pa.array([uri], pa.string()), prefix)[0].as_py()


def list_inputs(cfg: InputConfig, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """The whole listing in this process, deduplicated (first source wins) and sorted by (product, uri): for
    small inputs, tools and tests. Jobs plan with eagle.pipeline.planning, which lists in parallel and never
    holds the listing in memory."""
    if not cfg.uris and not cfg.manifest:
        raise ConfigError("no inputs: give inputs.uris (--input) or inputs.manifest")
    tables = [list_part(prefix, part, cfg.extensions, cfg.exclude, recursive, storage_cfg)
              for prefix in cfg.uris for part, recursive in parts_of(prefix, storage_cfg)]
    if cfg.manifest:
        con = connect(storage_cfg)
        tables.append(con.sql(manifest_source_sql(con, cfg, storage_cfg)).to_arrow_table().cast(LISTING_SCHEMA))
    table = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    uris = table.column("image_uri")
    first = pc.index_in(uris, value_set=uris)  # position of each URI's first occurrence
    table = table.filter(pc.equal(first, pa.array(range(table.num_rows), pa.int32())))
    check_products(pc.unique(table.column("product")).to_pylist())
    return table.take(pc.sort_indices(table, [("product", "ascending"), ("image_uri", "ascending")]))


def check_products(products: list[str]) -> None:
    """Product names become path segments (Hive partitions, model-store folders): refuse anything that could
    leave its prefix ('..', '/', odd characters) before a single file is written."""
    bad = []
    for p in products:
        try:
            storage.safe_segment(p, "product")
        except ValueError:
            bad.append(p)
    if bad:
        raise ConfigError(f"unsafe product name(s) {sorted(bad)[:5]}: use letters, digits, '.', '_' and '-' "
                          f"(no '..'); fix the manifest's 'product' column or the folder names")
