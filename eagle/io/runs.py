"""The run ledger in the output prefix: run manifests, and reading back what earlier runs wrote.

Exactly-once per run rests on three facts:
  * a write task's file name depends only on (run id, attempt, write uuid, task index), so a retried task
    overwrites its own file instead of adding one (`eagle.pipeline.writing.RunFilenames`);
  * a re-run with the same run id starts a new attempt that audits only the images that have no row of
    that run yet (`done_in_run`), so a resumed run adds exactly the missing rows;
  * a file left unreadable by a crash mid-write is deleted before the done-set is computed, so its images
    are audited again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eagle.io import storage
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"


@dataclass
class RunInfo:
    """A run's identity, kept in ``{output}/_runs/{run_id}.json`` so a resume reuses its audit date."""

    run_id: str
    started_at: str
    audit_date: str
    config_hash: str
    attempts: list[str] = field(default_factory=list)

    @property
    def attempt(self) -> int:
        return len(self.attempts)


def begin_run(output_uri: str, run_id: str, config_hash: str, cfg: StorageConfig | None = None) -> RunInfo:
    """Create the run manifest, or load it and register a new attempt when the run id already exists."""
    uri = storage.join(output_uri, RUNS_DIR, f"{run_id}.json")
    now = dt.datetime.now(dt.UTC)
    if storage.exists(uri, cfg):
        info = RunInfo(**json.loads(storage.read_bytes(uri, cfg)))
        if info.config_hash != config_hash:
            log.warning("run %s resumes with a different config hash (%s, was %s); rows record their own hash",
                        run_id, config_hash, info.config_hash)
    else:
        info = RunInfo(run_id=run_id, started_at=now.isoformat(), audit_date=now.date().isoformat(),
                       config_hash=config_hash)
    info.attempts.append(now.isoformat())
    storage.write_bytes(uri, json.dumps(asdict(info), indent=2).encode(), cfg)
    return info


def parquet_files(output_uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Every Parquet file under the output prefix (run manifests and hidden files excluded)."""
    files = storage.list_files(output_uri, (".parquet",), cfg)
    return [f.uri for f in files if f"/{RUNS_DIR}/" not in f.uri and not posixpath.basename(f.uri).startswith(".")]


def _partition_values(uri: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in uri.split("/") if "=" in part)


def read_rows(output_uri: str, columns: list[str], cfg: StorageConfig | None = None,
              drop_corrupt: bool = False) -> pa.Table:
    """Selected columns of every output row, Hive partition values filled in. Unreadable files are skipped
    (and deleted when `drop_corrupt`, which only a writer about to redo their images should ask for)."""
    tables = []
    for uri in parquet_files(output_uri, cfg):
        fs, path = storage.pyarrow_filesystem(uri, cfg)
        parts = _partition_values(uri)
        try:
            file_cols = pq.read_schema(path, filesystem=fs).names
            table = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in file_cols])
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("unreadable output file %s (%s)%s", uri, exc, "; deleting it" if drop_corrupt else "")
            if drop_corrupt:
                storage.remove(uri, cfg)
            continue
        for col in columns:
            if col not in table.column_names:
                value = parts.get(col)
                table = table.append_column(col, pa.array([value] * table.num_rows, pa.string()))
        tables.append(table.select(columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")


LEDGER_COLUMNS = ["image_uri", "run_id", "image_version", "status", "error_stage", "expert_model_version",
                  "mllm_model", "config_hash", "product", "audited_at"]


def read_ledger(output_uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """What earlier runs wrote, as far as deciding what to audit needs: read once per run, before writing.
    Files torn by a crash are deleted here, so their images count as not done."""
    return read_rows(output_uri, LEDGER_COLUMNS, cfg, drop_corrupt=True)


def done_in_run(rows: pa.Table, run_id: str) -> set[str]:
    """Image URIs that already have a row in this run (ok or error): a resume must not redo them."""
    mine = rows.filter(pc.equal(rows.column("run_id"), run_id))
    return set(mine.column("image_uri").to_pylist())


def up_to_date(rows: pa.Table, listing: pa.Table, versions: dict[str, str], mllm_model: str | None,
               config_hash: str) -> tuple[set[str], set[str]]:
    """(up to date, failed before) for an incremental run, judged on each listed image's latest row.

    Up to date: the latest row used the same image version (manifest images without one match on URI), and —
    where it got that far — the same expert artifact version for its product, the same MLLM and config hash.
    A failure is redone only when something it depended on changed (a changed file, a newly fitted expert, a
    new config) or when it failed while reading (possibly transient). "Failed before": listed images whose
    latest row is an error; the caller keeps them out of the run's error budget.
    """
    current = dict(zip(listing.column("image_uri").to_pylist(), listing.column("image_version").to_pylist()))
    latest: dict[str, dict] = {}
    for r in sorted(rows.to_pylist(), key=lambda r: str(r["audited_at"])):
        if r["image_uri"] in current:
            latest[r["image_uri"]] = r
    done, failed = set(), set()
    for uri, r in latest.items():
        same_image = not current[uri] or current[uri] == r["image_version"]
        same_models = (r["expert_model_version"] == versions.get(r["product"]) and r["mllm_model"] == mllm_model
                       and r["config_hash"] == config_hash)
        if r["status"] == "ok":
            if same_image and same_models:
                done.add(uri)
            continue
        failed.add(uri)
        stage = r["error_stage"]
        if same_image and (stage == "decode" or (stage in ("expert", "mllm") and same_models)):
            done.add(uri)
    return done, failed
