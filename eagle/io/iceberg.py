"""The Iceberg catalog and tables of the iceberg output format (eagle.io.results.IcebergStore reads and writes
them):

    {namespace}.audits   every row of every run, appended once per run attempt (one snapshot each, tagged
                         ``eagle.run_id``); partitioned per `output.partition_by`: product → identity(product),
                         audit_date → day(audited_at), run_id → identity(run_id)
    {namespace}.latest   one row per image: its newest result, except that a failure does not replace an
                         earlier success (as eagle/io/sql/latest.sql); upserted by image_uri after each run
                         (eagle.io.results.IcebergStore.merge), partitioned by product

Both are created on first use with OUTPUT_SCHEMA; a column added to it later reaches tables created before
through Ray's write, which evolves the table's schema (older rows read it as null). This module only talks to
the catalog, so it loads no Ray.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from eagle.config import ConfigError
from eagle.config.sections import OutputConfig
from eagle.io import storage
from eagle.io.schema import OUTPUT_SCHEMA
from eagle.io.storage import StorageConfig

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

CATALOG_NAME = "eagle"  # pyiceberg also reads PYICEBERG_CATALOG__EAGLE__* variables and ~/.pyiceberg.yaml
AUDITS, LATEST = "audits", "latest"
CATALOG_DIR = "_iceberg"
# Full (untruncated) run_id bounds in each data file's statistics: a scan for one run opens only its files.
_TABLE_PROPERTIES = {"write.metadata.metrics.column.run_id": "full"}


def catalog_properties(out: OutputConfig, cfg: StorageConfig | None = None) -> dict[str, str]:
    """pyiceberg catalog properties: `output.catalog` over the defaults (warehouse at output.uri, S3 FileIO
    settings from the storage section). With no catalog configured (neither `output.catalog` nor pyiceberg's
    own environment variables or ~/.pyiceberg.yaml), a local output gets a SQLite-file SQL catalog and an
    s3:// output is a config error. Holds credentials: never log it."""
    from pyiceberg.utils.config import Config

    configured = bool(out.catalog or Config().get_catalog_config(CATALOG_NAME))
    if storage.is_remote(out.uri):
        if not configured:
            raise ConfigError("output.format iceberg with an s3:// output needs output.catalog (a REST, Glue or "
                              "Hive catalog, or type: sql with a database uri): a SQLite file cannot live on S3")
        s = storage.s3_settings(cfg)
        found = {"s3.endpoint": s.endpoint, "s3.region": s.region or "us-east-1", "s3.access-key-id": s.key,
                 "s3.secret-access-key": s.secret, "s3.session-token": s.token}
        return {"warehouse": out.uri, **{k: v for k, v in found.items() if v}, **out.catalog}
    root = os.path.abspath(storage.strip_scheme(out.uri))
    props = {"warehouse": f"file://{root}"}
    if not configured:
        os.makedirs(os.path.join(root, CATALOG_DIR), exist_ok=True)
        props.update(type="sql", uri=f"sqlite:///{os.path.join(root, CATALOG_DIR, 'catalog.db')}")
    return {**props, **out.catalog}


def load_catalog(out: OutputConfig, cfg: StorageConfig | None = None) -> Catalog:
    from pyiceberg.catalog import load_catalog as _load

    return _load(CATALOG_NAME, **catalog_properties(out, cfg))


def identifier(out: OutputConfig, name: str) -> str:
    return f"{out.namespace}.{name}"


def _partition_fields(name: str, partition_by: Sequence[str]) -> list[tuple[str, Any, str]]:
    from pyiceberg.transforms import DayTransform, IdentityTransform

    spec = {"product": ("product", IdentityTransform(), "product"),
            "audit_date": ("audited_at", DayTransform(), "audit_day"),
            "run_id": ("run_id", IdentityTransform(), "run_id")}
    # `latest` holds one row per image: by product only (a date or run partition would move rows between runs)
    return [spec[p] for p in partition_by if name == AUDITS or p == "product"]


def table(out: OutputConfig, name: str, cfg: StorageConfig | None = None, create: bool = False) -> Table | None:
    """The `audits` or `latest` table; with `create`, created on first use (None when absent otherwise)."""
    from pyiceberg.exceptions import NoSuchTableError, TableAlreadyExistsError

    catalog, ident = load_catalog(out, cfg), identifier(out, name)
    try:
        return catalog.load_table(ident)
    except NoSuchTableError:
        if not create:
            return None
    catalog.create_namespace_if_not_exists(out.namespace)
    try:
        with catalog.create_table_transaction(ident, schema=OUTPUT_SCHEMA, properties=_TABLE_PROPERTIES) as txn:
            with txn.update_spec() as spec:
                for source, transform, field in _partition_fields(name, out.partition_by):
                    spec.add_field(source, transform, field)
    except TableAlreadyExistsError:  # another driver created it in the meantime
        pass
    return catalog.load_table(ident)
