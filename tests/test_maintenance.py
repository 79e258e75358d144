"""jobs/maintain.py: small result files compacted per run and partition with every row kept exactly once (also
when killed mid-way: the next maintenance run or driver finishes or rolls back), Iceberg data files compacted,
old snapshots expired, orphan files removed; refused while a driver holds the output's lease."""

from __future__ import annotations

import datetime as dt
import os

import pyarrow.parquet as pq
import pytest

from eagle.cli import maintain_cmd
from eagle.cli.exit_codes import BUSY, OK
from eagle.config import load_config
from eagle.io import iceberg, maintenance, querying, results, storage
from eagle.io.lease import OutputLease
from eagle.io.runs import output_files
from eagle.io.schema import to_table


def _row(uri: str, run: str, product: str, hour: int) -> dict:
    return {"image_uri": uri, "run_id": run, "status": "ok", "image_version": "v1", "expert_model_version": "e1",
            "mllm_model": "m", "config_hash": "h", "product": product, "verdict": "normal", "expert_score": hour / 10,
            "audited_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=hour)}


def _small_files(output: str, runs=("r1", "r2"), per_run: int = 4, products=("bottle", "cable")) -> int:
    """Result files as flush-interval writes leave them: each run, in each partition, several small files."""
    n = 0
    for run in runs:
        for product in products:
            for k in range(per_run):
                rows = [_row(f"s3://in/{product}/{run}-{k}-{i}.png", run, product, k) for i in range(3)]
                name = f"{run}_a001_w{k:02d}_{k:06d}-0.parquet"
                uri = storage.join(output, f"product={product}", "audit_date=2026-01-01", name)
                with storage.open_uri(uri, "wb") as fh:
                    pq.write_table(to_table(rows).drop_columns(["product", "audit_date"]), fh)
                n += 1
    return n


def _all_rows(output: str) -> list[tuple]:
    con = querying.connect()
    sql = results.rows_sql(output_files(output), ["image_uri", "run_id", "product", "audit_date", "expert_score",
                                                  "audited_at"])
    return sorted(con.sql(sql).fetchall())


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/out"


def test_parquet_compaction_keeps_every_row_once_and_is_idempotent(output, capsys):
    written = _small_files(output)
    storage.write_bytes(storage.join(output, "_runs", "r1", "a001", "todo-000.pq"), b"an old plan")  # orphan
    before = _all_rows(output)
    per_run = {r: len(results.run_files(output, r)) for r in ("r1", "r2")}
    assert len(output_files(output)) == written == 16 and per_run == {"r1": 8, "r2": 8}
    assert maintain_cmd.main(["--output", output]) == OK
    assert "parquet result files: 16 -> 4 (48 rows)" in capsys.readouterr().out
    assert _all_rows(output) == before  # the same rows, none lost, none doubled
    assert len(output_files(output)) == 4  # one per run and partition
    for run in ("r1", "r2"):  # a run's rows are still found by its file names (resume, ledger)
        files = results.run_files(output, run)
        assert len(files) == 2 and sum(pq.read_metadata(storage.strip_scheme(f), filesystem=storage.pyarrow_filesystem(
            f)[0]).num_rows for f in files) == 24
    assert not storage.exists(storage.join(output, "_runs", "r1"))  # the orphan plan is gone
    assert not storage.list_files(storage.join(output, "_runs", maintenance.COMPACTIONS_DIR))
    assert not storage.exists(storage.join(output, "_runs", "_output.lease"))  # released
    assert maintain_cmd.main(["--output", output]) == OK  # again: nothing to do
    assert _all_rows(output) == before and len(output_files(output)) == 4


@pytest.mark.parametrize("killed", ["after_target", "before_target"])
def test_a_compaction_killed_mid_way_is_finished_by_the_next_driver(tmp_path, monkeypatch, killed):
    output = str(tmp_path / "out")
    _small_files(output, runs=("r1",), products=("bottle",))
    before = _all_rows(output)

    class Killed(BaseException):
        pass

    if killed == "after_target":  # the compacted file is written, the sources not yet removed
        monkeypatch.setattr(maintenance.storage, "remove", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    else:  # the upload of the compacted file never completes
        monkeypatch.setattr(maintenance.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        maintenance.compact_parquet(output)
    monkeypatch.undo()
    if killed == "after_target":
        assert len(_all_rows(output)) == 2 * len(before)  # a reader outside the lease sees doubles until ...
    assert storage.list_files(storage.join(output, "_runs", maintenance.COMPACTIONS_DIR))  # the intent is left
    # ... the next driver over the output finishes it as soon as it holds the lease, before it reads anything
    from eagle.pipeline.inspection import take_output_lease

    cfg = load_config(overrides={"output": {"uri": output}}, env={})
    take_output_lease(cfg, "next-night").release()
    assert _all_rows(output) == before
    assert len(output_files(output)) == (1 if killed == "after_target" else 4)
    assert not storage.list_files(storage.join(output, "_runs", maintenance.COMPACTIONS_DIR))


def test_maintenance_refuses_while_a_driver_holds_the_output(tmp_path, capsys):
    output = str(tmp_path / "out")
    _small_files(output)
    files = sorted(output_files(output))
    with OutputLease(output, "night-3", ttl_s=60):
        assert maintain_cmd.main(["--output", output, "output.lease_wait_s=0.5"]) == BUSY
    assert "being written by another driver (run night-3" in capsys.readouterr().err
    assert sorted(output_files(output)) == files  # nothing changed


def _append(tbl, rows: list[dict]) -> None:
    tbl.append(to_table(rows).select([f.name for f in tbl.schema().as_arrow()]))


def test_iceberg_files_compacted_snapshots_expired_orphans_removed(tmp_path, capsys):
    output = str(tmp_path / "audit")
    cfg = load_config(overrides={"output": {"uri": output, "format": "iceberg"}}, env={})
    tables = {name: iceberg.table(cfg.output, name, create=True) for name in (iceberg.AUDITS, iceberg.LATEST)}
    for night in range(4):  # four nights, two products: many small files and snapshots in both tables
        rows = [_row(f"img-{p}-{i}", f"r{night}", p, night) for p in ("bottle", "cable") for i in range(3)]
        _append(tables[iceberg.AUDITS], rows)
        _append(tables[iceberg.LATEST], rows[:2])
    tables = {n: iceberg.table(cfg.output, n) for n in tables}
    before = {n: sorted(map(str, t.scan().to_arrow().to_pylist())) for n, t in tables.items()}
    files_before = {n: len(t.inspect.files()) for n, t in tables.items()}
    snaps_before = {n: len(t.snapshots()) for n, t in tables.items()}
    location = storage.strip_scheme(tables[iceberg.AUDITS].location())
    orphan = os.path.join(location, "data", "orphan-from-a-failed-write.parquet")
    os.makedirs(os.path.dirname(orphan), exist_ok=True)
    with open(orphan, "wb") as fh:
        fh.write(b"PAR1 left by a write that never committed")
    assert files_before == {iceberg.AUDITS: 8, iceberg.LATEST: 4} and snaps_before[iceberg.AUDITS] == 4

    argv = ["--output", output, "output.format=iceberg", "--snapshot-max-age-hours", "0", "--orphan-min-age-hours",
            "0"]
    assert maintain_cmd.main(argv) == OK
    report = capsys.readouterr().out
    tables = {n: iceberg.table(cfg.output, n) for n in tables}
    after = {n: sorted(map(str, t.scan().to_arrow().to_pylist())) for n, t in tables.items()}
    assert after == before  # the same rows in both tables, `latest` included
    assert {n: len(t.inspect.files()) for n, t in tables.items()} == {iceberg.AUDITS: 2, iceberg.LATEST: 1}
    assert {n: len(t.snapshots()) for n, t in tables.items()} == {iceberg.AUDITS: 1, iceberg.LATEST: 1}
    assert not os.path.exists(orphan) and "orphan files removed: " in report
    referenced = [storage.strip_scheme(p) for p in tables[iceberg.AUDITS].inspect.files().column("file_path").to_pylist()]
    assert all(os.path.exists(p) for p in referenced)  # nothing still referenced was removed
    assert "iceberg audits: data files 8 -> 2, snapshots " in report and " -> 1" in report
