"""Run manifests in the output prefix, and reading back what earlier runs wrote.

Exactly-once per run rests on three facts:
  * a write task's file name depends only on (run id, attempt, write uuid, task index), so a retried task
    overwrites its own file instead of adding one (`eagle.io.results.file_stem`);
  * a re-run with the same run id starts a new attempt that audits only the images that have no row of
    that run yet (eagle.pipeline.planning), so a resumed run adds exactly the missing rows;
  * a file of the resumed run left unreadable by a crash mid-write is deleted before planning
    (eagle.io.results.run_files), so its images are audited again; other runs' files are never deleted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from eagle.config import JobConfig
from eagle.io import storage
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"  # run manifests ({run_id}.json) and plans ({run_id}/a{attempt}/)
LEDGER_DIR = "_ledger"  # the compacted ledger (eagle.io.ledger)
# Parquet files the job keeps for itself (ledger, plans) end in .pq, so `**/*.parquet` globs over the output
# see results only; Spark, Trino and Athena also skip the `_`-folders they sit in.
INTERNAL_SUFFIX = ".pq"


# A run's status in its manifest: running (an attempt is under way, or its driver died), then what the last
# attempt ended as. Manifests written before the field existed read as "unknown".
RUN_STATUSES = ("running", "completed", "failed", "interrupted", "unknown")


@dataclass
class RunInfo:
    """A run's identity, kept in ``{output}/_runs/{run_id}.json`` so a resume reuses its audit date."""

    run_id: str
    started_at: str
    audit_date: str
    config_hash: str
    attempts: list[str] = field(default_factory=list)
    mode: str = "unknown"  # full or incremental, as the last attempt ran ("unknown" in older manifests)
    status: str = "unknown"  # one of RUN_STATUSES
    settings: dict = field(default_factory=dict)  # run_settings() of the last attempt (empty in older manifests)

    @property
    def attempt(self) -> int:
        return len(self.attempts)


def mllm_family(model: str | None) -> str | None:
    """The model family (config.json's model_type) of a local MLLM folder; None for a hub id or an s3:// prefix
    (not read here) and without an MLLM."""
    if not model or storage.is_remote(model):
        return None
    try:
        with open(posixpath.join(posixpath.expanduser(model), "config.json")) as fh:
            return json.load(fh).get("model_type")
    except (OSError, ValueError):
        return None


def run_settings(cfg: JobConfig) -> dict:
    """What a run was asked to do, for its manifest, its summary and the evaluation's provenance: the routing
    policy, the MLLM (model, family) and guidance, the expert models."""
    return {"routing": cfg.routing.policy, "mllm_model": cfg.mllm.model, "mllm_family": mllm_family(cfg.mllm.model),
            "guidance": bool(cfg.mllm.model) and cfg.guidance.enabled, "expert_model": cfg.expert.model,
            "expert_ensemble": list(cfg.expert.ensemble.models)}


def new_run_id() -> str:
    """A fresh run id: UTC start time and a random suffix (sorts by start time)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def manifest_uri(output_uri: str, run_id: str) -> str:
    return storage.join(output_uri, RUNS_DIR, f"{run_id}.json")


def begin_run(output_uri: str, run_id: str, config_hash: str, cfg: StorageConfig | None = None,
              mode: str = "full", settings: dict | None = None) -> RunInfo:
    """Create the run manifest, or load it and register a new attempt when the run id already exists; the
    manifest says ``running`` until `end_run`."""
    uri = manifest_uri(output_uri, run_id)
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
    info.mode, info.status = mode, "running"
    info.settings = settings or info.settings
    storage.write_bytes(uri, json.dumps(asdict(info), indent=2).encode(), cfg)
    return info


def end_run(output_uri: str, run_id: str, status: str, cfg: StorageConfig | None = None) -> None:
    """Record how the run's current attempt ended (completed, failed or interrupted); a no-op when the run
    never got a manifest (it stopped before planning)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {RUN_STATUSES}")
    uri = manifest_uri(output_uri, run_id)
    if not storage.exists(uri, cfg):
        return
    info = RunInfo(**json.loads(storage.read_bytes(uri, cfg)))
    info.status = status
    storage.write_bytes(uri, json.dumps(asdict(info), indent=2).encode(), cfg)


def read_runs(output_uri: str, cfg: StorageConfig | None = None) -> list[RunInfo]:
    """Every run manifest under the output prefix, oldest first."""
    folder = storage.join(output_uri, RUNS_DIR)
    infos = [RunInfo(**json.loads(storage.read_bytes(f.uri, cfg)))
             for f in storage.list_files(folder, (".json",), cfg, recursive=False)]
    return sorted(infos, key=lambda r: r.started_at)


def output_files(output_uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """Every result file under the output prefix (run manifests, plans, the ledger and hidden files left out).
    With files of ~100k rows this is a few LIST pages even for years of history."""
    files = storage.list_files(output_uri, (".parquet",), cfg)
    return [f.uri for f in files if not any(f"/{d}/" in f.uri for d in (RUNS_DIR, LEDGER_DIR))
            and not posixpath.basename(f.uri).startswith(".")]


def _partition_values(uri: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in uri.split("/") if "=" in part)


def read_rows(output_uri: str, columns: list[str], cfg: StorageConfig | None = None) -> pa.Table:
    """Selected columns of every output row, Hive partition values filled in, in memory: for evaluations and
    benches of test-sized outputs. Unreadable files are skipped with a warning, never deleted."""
    tables = []
    for uri in output_files(output_uri, cfg):
        fs, path = storage.pyarrow_filesystem(uri, cfg)
        parts = _partition_values(uri)
        try:
            file_cols = pq.read_schema(path, filesystem=fs).names
            table = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in file_cols])
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("skipping unreadable output file %s (%s)", uri, exc)
            continue
        for col in columns:
            if col not in table.column_names:
                value = parts.get(col)
                table = table.append_column(col, pa.array([value] * table.num_rows, pa.string()))
        tables.append(table.select(columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="permissive")
