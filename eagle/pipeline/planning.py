"""Planning a run: what is listed, what this run (or, incrementally, an earlier one) already did, and what to
audit, at a cost that follows this run's listing, never the history.

The listing lands as Parquet parts (prefixes: one Ray task per child folder) or is read where it lies
(manifests, S3 Inventory); DuckDB joins it, out of core, with this run's own rows (resume) and the compacted
ledger (incremental), and writes what it decided as Parquet files under the plan's folder (`Plan`): the rows to
audit, sorted by product, as files of `rows_per_block` rows (one Ray block each, so blocks stay
product-homogeneous and the driver never holds a row), and the images that failed before. It also pins each
product's expert version for the run.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from eagle.config import ConfigError, JobConfig
from eagle.io import ledger, storage
from eagle.io.inputs import check_products, list_part, manifest_source_sql, parts_of
from eagle.io.querying import sql_list, sql_str
from eagle.io.results import ResultStore
from eagle.io.runs import INTERNAL_SUFFIX, RUNS_DIR, RunInfo
from eagle.pipeline.ray_setup import ray_options

log = logging.getLogger(__name__)

LISTING_COLUMNS = "image_uri, product, image_version, image_size_bytes"
_EMPTY_LISTING = ("SELECT NULL::VARCHAR AS image_uri, NULL::VARCHAR AS product, NULL::VARCHAR AS image_version, "
                  "NULL::BIGINT AS image_size_bytes WHERE false")


@dataclass
class ProductCounts:
    product: str
    listed: int
    done: int
    todo: int


@dataclass
class Plan:
    """What planning decided for a run attempt: read by the stream and the summary. Relations that grow with the
    listing are Parquet files under `plan_dir` (removed after the run), not held in memory; a dry run writes
    none of them (both None)."""

    run: RunInfo
    plan_dir: str
    todo_dir: str | None  # the rows to audit (LISTING_COLUMNS), by product; None when there is nothing to do
    failed_before: str | None  # one file: `image_uri` of the listed images whose latest result was an error
    versions: dict[str, str]  # each product's pinned expert version (products without a model left out)
    products: list[ProductCounts] = field(default_factory=list)  # per product: listed, done, to audit
    block_rows: int = 0  # rows per todo file at most

    @property
    def listed(self) -> int:
        return sum(p.listed for p in self.products)

    @property
    def done(self) -> int:
        return sum(p.done for p in self.products)

    @property
    def todo(self) -> int:
        return sum(p.todo for p in self.products)

    def lines(self) -> list[str]:
        """Per product: listed, already done, to audit (what `--dry-run` prints)."""
        width = max([7, *(len(p.product) for p in self.products)])
        out = [f"{'product':<{width}} {'listed':>10} {'done':>10} {'to audit':>10}"]
        out += [f"{p.product:<{width}} {p.listed:>10} {p.done:>10} {p.todo:>10}" for p in self.products]
        out.append(f"{'total':<{width}} {self.listed:>10} {self.done:>10} {self.todo:>10}")
        return out


def todo_chunks(plan: Plan, cfg: JobConfig, rows: int | None = None) -> list[list[str]]:
    """The todo files in chunks of about `rows` rows (whole files; None: one chunk), in plan order."""
    files = sorted(f.uri for f in storage.list_files(plan.todo_dir, (INTERNAL_SUFFIX,), cfg.storage))
    step = len(files) if rows is None else max(1, rows // max(1, plan.block_rows))
    return [files[i:i + step] for i in range(0, len(files), max(1, step))]


def todo_dataset(files: list[str], cfg: JobConfig):
    """Rows to audit as a Ray Dataset, one block per todo file (Ray's Parquet reader would merge small
    files into one read task, and with it the whole run into one block)."""
    import ray

    items = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    # One file per task. Its own small CPU share keeps Ray from fusing it with the decode stage: fused, the
    # decode stage's batch size would count *files* and bundle that many into one task (one block per run).
    return items.map_batches(_read_todo, fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow",
                             num_cpus=0.1)


def _read_todo(batch: pa.Table, cfg: JobConfig) -> pa.Table:
    tables = []
    for uri in batch.column("file").to_pylist():
        fs, path = storage.pyarrow_filesystem(uri, cfg.storage)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def plan_dir(output: str, run_id: str, attempt: int) -> str:
    return storage.join(output, RUNS_DIR, run_id, f"a{attempt:03d}")


def _list_part_task(prefix: str, part: str, recursive: bool, cfg: JobConfig, out_uri: str) -> str | None:
    table = list_part(prefix, part, cfg.inputs.extensions, cfg.inputs.exclude, recursive, cfg.storage)
    if not table.num_rows:
        return None
    fs, path = storage.pyarrow_filesystem(out_uri, cfg.storage)
    if not storage.is_remote(out_uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    return out_uri


def list_prefixes(cfg: JobConfig, out_dir: str, in_process: bool = False) -> list[str]:
    """List every input prefix in parallel Ray tasks, one per child folder (in this process when Ray is not
    running, or `in_process`); returns the Parquet parts written under `out_dir`."""
    import ray

    parts = [(prefix, part, recursive, storage.join(out_dir, f"part-{i:06d}{INTERNAL_SUFFIX}"))
             for i, (prefix, part, recursive) in enumerate(
                 (prefix, part, recursive)
                 for prefix in cfg.inputs.uris for part, recursive in parts_of(prefix, cfg.storage))]
    if in_process or not ray.is_initialized():
        return [uri for p in parts if (uri := _list_part_task(*p[:3], cfg, p[3]))]
    task = ray.remote(_list_part_task).options(**ray_options(cfg.resources.decode, actor=False), max_retries=3,
                                               retry_exceptions=True)
    return [uri for uri in ray.get([task.remote(*p[:3], cfg, p[3]) for p in parts]) if uri]


def listing_sql(con: duckdb.DuckDBPyConnection, cfg: JobConfig, out_dir: str, in_process: bool = False) -> str:
    """SQL for this run's whole listing (duplicates not yet removed); `in_process`: see `list_prefixes`."""
    if not cfg.inputs.uris and not cfg.inputs.manifest:
        raise ConfigError("no inputs: give inputs.uris (--input) or inputs.manifest")
    parts = list_prefixes(cfg, storage.join(out_dir, "listing"), in_process) if cfg.inputs.uris else []
    sources = [f"SELECT {LISTING_COLUMNS} FROM read_parquet({sql_list(parts)})"] if parts else []
    if cfg.inputs.manifest:
        sources.append(manifest_source_sql(con, cfg.inputs, cfg.storage))
    return " UNION ALL ".join(sources) if sources else _EMPTY_LISTING


def _decisions_sql(cfg: JobConfig, chash: str) -> str:
    """Per listed image: already in this run (resume); current per the ledger (incremental); failed before.

    Current: the ledger's latest row used the same image version (manifest images without one match on URI)
    and — where it got that far — the same expert version for its product, the same MLLM and config hash. A
    failure is redone only when something it depended on changed, or when it failed while reading (possibly
    transient)."""
    mllm = "NULL" if cfg.mllm.model is None else sql_str(cfg.mllm.model)
    same_models = (f"(g.expert_model_version IS NOT DISTINCT FROM v.version AND g.mllm_model IS NOT DISTINCT FROM "
                   f"{mllm} AND g.config_hash = {sql_str(chash)})")
    current = (f"(g.image_uri IS NOT NULL AND (l.image_version = '' OR l.image_version = g.image_version) AND "
               f"((g.status = 'ok' AND {same_models}) OR (g.status = 'error' AND (g.error_stage = 'decode' OR "
               f"(g.error_stage IN ('expert', 'mllm') AND {same_models})))))")
    return (f"SELECT l.*, m.image_uri IS NOT NULL AS in_run, coalesce({current}, false) AS current, "
            f"coalesce(g.status = 'error', false) AS failed_before "
            f"FROM listing l LEFT JOIN mine m ON m.image_uri = l.image_uri "
            f"LEFT JOIN ledger g ON g.image_uri = l.image_uri LEFT JOIN versions v ON v.product = g.product")


def _decide(con: duckdb.DuckDBPyConnection, cfg: JobConfig, run_id: str, chash: str, store: ResultStore,
            pending: dict[str, int] | None = None) -> str:
    """Table `decided` (the `listing` and `versions` tables with `_decisions_sql`'s flags); returns the SQL
    condition for rows to audit. Torn rows of this run (a crash mid-write) are deleted: their images are
    redone; other runs' rows are only read. `pending` (a dry run): runs the ledger does not hold yet, merged
    in memory instead, and nothing is deleted."""
    mine = store.run_rows_sql(con, [run_id], ["image_uri"], drop_torn=pending is None)
    con.execute(f"CREATE OR REPLACE TEMP VIEW mine AS SELECT DISTINCT image_uri FROM ({mine})")
    con.execute(f"CREATE OR REPLACE TEMP VIEW ledger AS {ledger.merged_sql(con, store, pending or {})}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE decided AS {_decisions_sql(cfg, chash)}")
    return "NOT in_run" + (" AND NOT current" if cfg.mode == "incremental" else "")


def rows_per_block(cfg: JobConfig, todo: int, cpus: float) -> int:
    """Blocks of thousands of rows at scale; small runs still spread over the cluster's CPUs."""
    spread = math.ceil(todo / max(1.0, 2 * cpus))
    return max(1, min(cfg.inputs.rows_per_block, max(cfg.resources.decode.batch_size, spread)))


def pin_expert_versions(cfg: JobConfig, products: list[str]) -> dict[str, str]:
    """Pin each product's expert version for the whole run (products without a model are left out): with
    ``expert.model`` auto each product's default expert, else its latest fit of that model; with
    ``expert.ensemble.models`` every member's (`eagle.expert.ensemble.pin`). The expert stage builds whichever model
    each pinned artifact names."""
    from eagle.expert.artifact import ArtifactError
    from eagle.expert.ensemble import pin

    versions = {}
    for product in products:
        try:
            versions[product] = pin(cfg.model_store, product, cfg.expert, cfg.storage)
        except ArtifactError as exc:
            log.warning("%s: its images become error rows", exc)
    return versions


def make_plan(con: duckdb.DuckDBPyConnection, cfg: JobConfig, run: RunInfo, chash: str, out_dir: str,
              store: ResultStore, cpus: float, dry_run_pending: dict[str, int] | None = None) -> Plan:
    """Decide what this run attempt audits: list, pin expert versions, and write the plan's files under
    `out_dir` (see `Plan`). A dry run (`dry_run_pending`: the runs the ledger does not hold yet, see `_decide`)
    only counts them: it lists in this process into `out_dir` (a local temporary folder) and writes nothing
    else."""
    dry_run = dry_run_pending is not None
    con.execute(f"CREATE OR REPLACE TEMP TABLE listing AS SELECT DISTINCT ON (image_uri) * FROM "
                f"({listing_sql(con, cfg, out_dir, in_process=dry_run)})")
    products = [r[0] for r in con.execute("SELECT DISTINCT product FROM listing ORDER BY 1").fetchall()]
    if not products and not cfg.inputs.allow_empty:
        sources = [*cfg.inputs.uris, *([cfg.inputs.manifest] if cfg.inputs.manifest else [])]
        raise ConfigError(f"the inputs list no images ({', '.join(sources)}; extensions "
                          f"{', '.join(cfg.inputs.extensions)}, excluding {', '.join(cfg.inputs.exclude) or 'nothing'})"
                          f": check --input and inputs.exclude; pass --allow-empty if an empty input is expected")
    check_products(products)
    versions = pin_expert_versions(cfg, products)
    con.execute("CREATE OR REPLACE TEMP TABLE versions (product VARCHAR, version VARCHAR)")
    if versions:
        con.executemany("INSERT INTO versions VALUES (?, ?)", list(versions.items()))
    redo = _decide(con, cfg, run.run_id, chash, store, dry_run_pending)
    counts = con.execute(f"SELECT product, count(*), count(*) FILTER (WHERE NOT ({redo})) FROM decided "
                         f"GROUP BY product ORDER BY product").fetchall()
    plan = Plan(run=run, plan_dir=out_dir, todo_dir=None, failed_before=None, versions=versions,
                products=[ProductCounts(p, n, d, n - d) for p, n, d in counts])
    if dry_run:
        return plan
    with tempfile.TemporaryDirectory(prefix="eagle-plan-") as tmp:
        name = f"failed_before{INTERNAL_SUFFIX}"
        con.execute(f"COPY (SELECT image_uri FROM decided WHERE failed_before) TO {sql_str(os.path.join(tmp, name))} "
                    f"(FORMAT parquet)")
        plan.failed_before = storage.join(out_dir, name)
        if plan.todo:
            plan.todo_dir = storage.join(out_dir, "todo")
            block = plan.block_rows = rows_per_block(cfg, plan.todo, cpus)
            query = f"SELECT {LISTING_COLUMNS} FROM decided WHERE {redo} ORDER BY product, image_uri"
            os.makedirs(os.path.join(tmp, "todo"))
            # one file per block, streamed from DuckDB (its own COPY cannot cut row groups under 2048 rows)
            reader = con.sql(query).to_arrow_reader(block)
            for i, batch in enumerate(reader):
                pq.write_table(pa.Table.from_batches([batch]),
                               os.path.join(tmp, "todo", f"block-{i:07d}{INTERNAL_SUFFIX}"))
            log.info("planned %d rows to audit in %d blocks of up to %d rows", plan.todo, i + 1, block)
        storage.put_folder(tmp, out_dir, cfg.storage)
    return plan
