"""Maintenance of an output (jobs/maintain.py): compact small files, expire old Iceberg snapshots, remove
orphan files. It runs under the output's lease (`eagle.io.lease`), so no driver writes or plans meanwhile.

**Parquet results.** A run's small files in one partition folder (flush-interval writes, small runs) are merged
into one file of the same run (``{run_id}_a{attempt}_compact-{hash}_…``: resumes and the ledger still find a run's
rows by its file names). Never a row lost or doubled, even if killed at any point:

1. an intent ``_runs/_compactions/{hash}.json`` names the sources, the target and the row count;
2. the target is written whole (a local file uploaded in one piece) and its row count checked;
3. only then are the sources removed, and last the intent.

An intent left by a killed run is finished by the next maintenance run or driver that takes the lease
(`finish_compactions`): a complete target → its sources are removed; no or a bad target → the target is removed
and the sources stay. Between 2 and 3 a reader outside the lease (an ad-hoc query) may see a run's rows twice
for the seconds the removal takes. The compacted ledger (`_ledger/ledger.pq`) is one file rewritten whole by
each merge, so it never needs compacting.

**Iceberg tables** (`audits`, `latest`): a product's data files, when there are several small ones, are rewritten
as one overwrite commit of the same rows (pyiceberg 0.12 has no rewrite_data_files); snapshots older than a
given age are expired (the current one never); files under a table's location that no remaining snapshot or
metadata file references and that are older than a given age are removed.

**Orphans** of Parquet outputs: plan folders of earlier attempts and dry runs under ``_runs/`` (a driver writes
a new plan per attempt), and unfinished multipart uploads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from eagle.config.sections import OutputConfig
from eagle.io import iceberg, storage
from eagle.io.runs import LEDGER_DIR, RUNS_DIR
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

COMPACTIONS_DIR = "_compactions"  # under _runs/: intents of compactions under way
_RESULT_NAME = re.compile(r"^(?P<run>.+?)_a(?P<attempt>\d{3,})_")


@dataclass
class MaintenanceReport:
    parquet_files: tuple[int, int] = (0, 0)  # result files before, after
    parquet_rows: tuple[int, int] = (0, 0)
    iceberg_files: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> data files before, after
    snapshots: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> snapshots before, after
    orphans_removed: int = 0
    finished_interrupted: int = 0

    def lines(self) -> list[str]:
        out = []
        if self.finished_interrupted:
            out.append(f"finished {self.finished_interrupted} compaction(s) a killed run had left")
        if self.parquet_files != (0, 0):
            out.append(f"parquet result files: {self.parquet_files[0]} -> {self.parquet_files[1]} "
                       f"({self.parquet_rows[1]} rows)")
        for name, (before, after) in self.iceberg_files.items():
            out.append(f"iceberg {name}: data files {before} -> {after}, snapshots {self.snapshots[name][0]} -> "
                       f"{self.snapshots[name][1]}")
        out.append(f"orphan files removed: {self.orphans_removed}")
        return out


def _never() -> None:
    return None


# ------------------------------------------------------------------------------------------ Parquet results
def _intents_dir(output: str) -> str:
    return storage.join(output, RUNS_DIR, COMPACTIONS_DIR)


def _result_files(output: str, cfg: StorageConfig | None) -> list[storage.FileInfo]:
    return [f for f in storage.list_files(output, (".parquet",), cfg)
            if not any(f"/{d}/" in f.uri for d in (RUNS_DIR, LEDGER_DIR))
            and not posixpath.basename(f.uri).startswith(".")]


def _rows(uri: str, cfg: StorageConfig | None) -> int:
    fs, path = storage.pyarrow_filesystem(uri, cfg)
    return pq.read_metadata(path, filesystem=fs).num_rows


def finish_compactions(output: str, cfg: StorageConfig | None = None) -> int:
    """Finish the compactions a killed maintenance run left (call it holding the output's lease, before reading
    results); returns how many. Sources are removed only once the target is complete, so either outcome keeps
    every row exactly once."""
    done = 0
    for intent in storage.list_files(_intents_dir(output), (".json",), cfg, recursive=False):
        spec = json.loads(storage.read_bytes(intent.uri, cfg))
        target, sources, rows = spec["target"], spec["sources"], spec["rows"]
        complete = False
        if storage.exists(target, cfg):
            try:
                complete = _rows(target, cfg) == rows
            except Exception as exc:  # noqa: BLE001 - unreadable: treated as not written
                log.warning("compacted file %s is unreadable (%s)", target, exc)
        if complete:
            for source in sources:
                storage.remove(source, cfg)
            log.info("finished an interrupted compaction into %s (%d rows)", target, rows)
        else:
            storage.remove(target, cfg)
            log.info("rolled back an interrupted compaction into %s: its %d source files stay", target, len(sources))
        storage.remove(intent.uri, cfg)
        done += 1
    return done


def compact_parquet(output: str, cfg: StorageConfig | None = None, small_bytes: int = 32 << 20,
                    target_bytes: int = 256 << 20, check: Callable[[], None] = _never) -> tuple[int, int, int]:
    """Merge each run's small result files per partition folder; returns (files before, files after, rows).
    `check` runs before each change (the lease's check: a maintenance run that lost it stops)."""
    files = _result_files(output, cfg)
    groups: dict[tuple[str, str], list[storage.FileInfo]] = defaultdict(list)
    for f in files:
        m = _RESULT_NAME.match(posixpath.basename(f.uri))
        if m and f.size < small_bytes:
            groups[(posixpath.dirname(f.uri), m.group("run"))].append(f)
    for (folder, run), small in sorted(groups.items()):
        chunk: list[storage.FileInfo] = []
        for f in sorted(small, key=lambda f: f.uri) + [None]:  # type: ignore[list-item]
            if f is not None and sum(x.size for x in chunk) + f.size <= target_bytes:
                chunk.append(f)
                continue
            if len(chunk) >= 2:
                _compact_chunk(output, folder, run, [x.uri for x in chunk], cfg, check)
            chunk = [f] if f is not None else []
    after = _result_files(output, cfg)
    rows = sum(_rows(f.uri, cfg) for f in after)
    return len(files), len(after), rows


def _compact_chunk(output: str, folder: str, run: str, sources: list[str], cfg: StorageConfig | None,
                   check: Callable[[], None]) -> None:
    tables = []
    for uri in sources:
        fs, path = storage.pyarrow_filesystem(uri, cfg)
        try:
            tables.append(pq.read_table(path, filesystem=fs))
        except Exception as exc:  # noqa: BLE001 - a torn file: leave the whole chunk as it is
            log.warning("not compacting %d files of run %s in %s: %s is unreadable (%s)", len(sources), run, folder,
                        uri, exc)
            return
    table = pa.concat_tables(tables, promote_options="default")
    digest = hashlib.sha256("\n".join(sorted(sources)).encode()).hexdigest()[:16]
    attempt = max(int(_RESULT_NAME.match(posixpath.basename(u)).group("attempt")) for u in sources)
    target = posixpath.join(folder, f"{run}_a{attempt:03d}_compact-{digest}_000000-0.parquet")
    intent = storage.join(_intents_dir(output), f"{digest}.json")
    check()
    storage.write_bytes(intent, json.dumps({"target": target, "sources": sources, "rows": table.num_rows},
                                           indent=1).encode(), cfg)
    with tempfile.TemporaryDirectory(prefix="eagle-compact-") as tmp:
        local = os.path.join(tmp, "part.parquet")
        pq.write_table(table, local, compression="zstd")
        fs, path = storage.filesystem(target, cfg)
        fs.put_file(local, path)  # whole or not at all
    if _rows(target, cfg) != table.num_rows:
        raise OSError(f"compacted file {target} does not hold the {table.num_rows} rows written")
    check()
    for uri in sources:
        storage.remove(uri, cfg)
    storage.remove(intent, cfg)
    log.info("run %s in %s: %d files -> 1 (%d rows)", run, folder, len(sources), table.num_rows)


def remove_parquet_orphans(output: str, cfg: StorageConfig | None = None) -> int:
    """Plan folders under _runs/ (every attempt writes its own; none is live while the lease is held) and
    unfinished multipart uploads; returns how many were removed."""
    removed = 0
    for folder in storage.list_folders(storage.join(output, RUNS_DIR), cfg):
        if posixpath.basename(folder.rstrip("/")) == COMPACTIONS_DIR:
            continue
        removed += len(storage.list_files(folder, None, cfg))
        storage.remove(folder, cfg, recursive=True)
    try:
        removed += storage.abort_uploads(output, "", cfg)
    except Exception as exc:  # noqa: BLE001 - a lifecycle rule also removes them
        log.warning("could not list or abort unfinished uploads under %s: %s", output, exc)
    return removed


# ------------------------------------------------------------------------------------------ Iceberg tables
def _data_files(tbl) -> int:  # noqa: ANN001 - a pyiceberg Table
    return tbl.inspect.files().num_rows if tbl.current_snapshot() is not None else 0


def compact_iceberg(out: OutputConfig, cfg: StorageConfig | None, name: str, small_bytes: int = 32 << 20,
                    check: Callable[[], None] = _never) -> tuple[int, int]:
    """Rewrite each product's small data files of table `name` as one overwrite of the same rows; returns
    (data files before, after)."""
    from pyiceberg.expressions import EqualTo

    tbl = iceberg.table(out, name, cfg)
    if tbl is None or tbl.current_snapshot() is None:
        return 0, 0
    files = tbl.inspect.files().to_pylist()
    before = len(files)
    small: dict[str, int] = defaultdict(int)
    for f in files:
        if f["content"] == 0 and f["file_size_in_bytes"] < small_bytes:
            small[(f.get("partition") or {}).get("product") or ""] += 1
    for product, count in sorted(small.items()):
        if count < 2 or not product:
            continue
        rows = tbl.scan(row_filter=EqualTo("product", product)).to_arrow()
        check()
        tbl.overwrite(rows, overwrite_filter=EqualTo("product", product),
                      snapshot_properties={"eagle.maintenance": "compact"})
        tbl = iceberg.table(out, name, cfg)
        log.info("iceberg %s, product %s: %d small files -> rewritten (%d rows)", name, product, count, rows.num_rows)
    return before, _data_files(tbl)


def expire_snapshots(out: OutputConfig, cfg: StorageConfig | None, name: str, older_than: dt.datetime,
                     check: Callable[[], None] = _never) -> tuple[int, int]:
    """Expire the snapshots of table `name` older than `older_than` (never the current one); returns (before,
    after)."""
    tbl = iceberg.table(out, name, cfg)
    if tbl is None:
        return 0, 0
    before = len(tbl.snapshots())
    expire = tbl.maintenance.expire_snapshots().older_than(older_than)
    if getattr(expire, "_snapshot_ids_to_expire", True):
        check()
        expire.commit()
    return before, len(iceberg.table(out, name, cfg).snapshots())


def _norm(path: str) -> str:
    return path.removeprefix("file://") if path.startswith("file://") else path


def remove_iceberg_orphans(out: OutputConfig, cfg: StorageConfig | None, name: str, min_age_s: float,
                           check: Callable[[], None] = _never) -> int:
    """Remove files under table `name`'s location that no snapshot or kept metadata file references and that
    are older than `min_age_s`; returns how many."""
    tbl = iceberg.table(out, name, cfg)
    if tbl is None:
        return 0
    keep = {_norm(tbl.metadata_location)}
    keep |= {_norm(e.metadata_file) for e in tbl.metadata.metadata_log}
    for snapshot in tbl.snapshots():
        keep.add(_norm(snapshot.manifest_list))
    if tbl.snapshots():
        keep |= {_norm(p) for p in tbl.inspect.all_manifests().column("path").to_pylist()}
        keep |= {_norm(p) for p in tbl.inspect.all_files().column("file_path").to_pylist()}
    keep |= {_norm(s.statistics_path) for s in tbl.metadata.statistics}
    location = _norm(tbl.location())
    fs, root = storage.filesystem(location, cfg)
    if not fs.exists(root):
        return 0
    now = dt.datetime.now(dt.UTC)
    removed = 0
    for path, info in fs.find(root, detail=True).items():
        uri = f"s3://{path}" if storage.is_remote(location) else path
        if uri in keep:
            continue
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        if isinstance(modified, (int, float)):
            modified = dt.datetime.fromtimestamp(modified, dt.UTC)
        if modified is None or (now - modified).total_seconds() < min_age_s:
            continue
        check()
        fs.rm(path)
        removed += 1
    return removed
