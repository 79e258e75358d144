"""Output store mechanics: run manifests and attempts, retry-stable file names, the latest-per-image view
and the output schema. Planning over earlier output: tests/test_planning.py."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle.io import storage
from eagle.io.latest_view import latest_table, write_latest
from eagle.io.results import file_stem
from eagle.io.runs import begin_run, end_run, read_runs
from eagle.io.schema import OUTPUT_SCHEMA, to_table


def _row(uri: str, run: str, status: str = "ok", version: str = "v1", expert: str = "e1", when: int = 0,
         verdict: str = "normal", product: str = "p", stage: str | None = None) -> dict:
    return {"image_uri": uri, "run_id": run, "status": status, "image_version": version, "error_stage": stage,
            "expert_model_version": expert, "mllm_model": "m", "config_hash": "h", "product": product,
            "verdict": verdict if status == "ok" else None,
            "audited_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=when)}


def _write(base: str, name: str, rows: list[dict], product: str = "p") -> str:
    uri = storage.join(base, f"product={product}", "audit_date=2026-01-01", name)
    table = to_table(rows).drop_columns(["product", "audit_date"])
    with storage.open_uri(uri, "wb") as fh:
        pq.write_table(table, fh)
    return uri


def test_run_manifest_attempts(tmp_path):
    out = str(tmp_path)
    first = begin_run(out, "r1", "h1")
    again = begin_run(out, "r1", "h1")
    assert (first.attempt, again.attempt) == (1, 2)
    assert again.audit_date == first.audit_date and again.started_at == first.started_at


def test_run_manifest_status_and_mode(tmp_path):
    out = str(tmp_path)
    end_run(out, "never-started", "interrupted")  # no manifest: nothing written
    assert not (tmp_path / "_runs").exists()
    assert begin_run(out, "r1", "h", mode="incremental").status == "running"
    end_run(out, "r1", "interrupted")
    assert [(r.run_id, r.mode, r.status) for r in read_runs(out)] == [("r1", "incremental", "interrupted")]
    begin_run(out, "r1", "h")  # the resume: running again, in the mode it runs now
    end_run(out, "r1", "completed")
    (r1,) = read_runs(out)
    assert (r1.attempt, r1.mode, r1.status) == (2, "full", "completed")
    with pytest.raises(ValueError, match="unknown run status"):
        end_run(out, "r1", "done")


def test_filenames_stable_per_task_and_distinct_per_attempt():
    assert file_stem("r1", 1, "uuid_000003") == file_stem("r1", 1, "uuid_000003")  # a retried task
    assert file_stem("r1", 1, "uuid_000003") != file_stem("r1", 1, "uuid_000004")
    assert file_stem("r1", 1, "u_000003") != file_stem("r1", 2, "u_000003")
    assert "." not in file_stem("r1", 1, "uuid_000003")


def test_latest_prefers_newest_success(tmp_path):
    out = str(tmp_path / "audit")
    _write(out, "r1.parquet", [_row("a", "r1", when=0, verdict="normal"), _row("b", "r1", when=0)])
    _write(out, "r2.parquet", [_row("a", "r2", when=5, verdict="anomalous"), _row("b", "r2", status="error", when=5),
                               _row("c", "r2", status="error", when=5)])
    table = latest_table(out)
    by_uri = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(by_uri) == {"a", "b", "c"}
    assert by_uri["a"]["run_id"] == "r2" and by_uri["a"]["verdict"] == "anomalous"
    assert by_uri["b"]["run_id"] == "r1" and by_uri["b"]["status"] == "ok"  # a later failure does not hide it
    assert by_uri["c"]["status"] == "error"
    target = str(tmp_path / "latest" / "latest.parquet")
    assert write_latest(out, target) == 3
    assert pq.read_table(target).num_rows == 3


def test_schema_table_round_trip():
    table = to_table([{"image_uri": "x", "boxes": [{"x1": 1, "y1": 2, "x2": 3, "y2": 4, "score": 0.5}]}])
    assert table.schema == OUTPUT_SCHEMA
    assert table.column("boxes").to_pylist()[0][0]["x2"] == 3
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table([{"width": "not a number"}])


def _iceberg_run(cfg, run_id: str, rows: list[dict]) -> None:
    """What a run does after its stages: write the rows, then fold them into `latest` and the ledger."""
    import ray

    from eagle.io import querying
    from eagle.io.results import result_store
    from eagle.io.runs import RunInfo

    run = RunInfo(run_id=run_id, started_at="", audit_date="2026-01-01", config_hash="h", attempts=["t"])
    store = result_store(cfg)
    assert store.write([ray.put(to_table(rows))], run, "w_000000")
    store.merge(querying.connect(), {run_id: 1})


def test_iceberg_round_trip_two_runs(tmp_path, ray_local):
    from pyiceberg.expressions import EqualTo

    from eagle.config import load_config
    from eagle.io import iceberg, ledger, querying
    from eagle.io.results import result_store

    cfg = load_config(overrides={"output": {"uri": str(tmp_path / "audit"), "format": "iceberg"}}, env={})
    _iceberg_run(cfg, "r1", [_row("a", "r1"), _row("b", "r1"), _row("c", "r1", product="q")])
    _iceberg_run(cfg, "r2", [_row("a", "r2", when=24, verdict="anomalous"), _row("b", "r2", status="error", when=24),
                             _row("d", "r2", when=24)])
    assert (tmp_path / "audit" / iceberg.CATALOG_DIR / "catalog.db").exists()  # the local default catalog

    con = querying.connect()
    latest = iceberg.table(cfg.output, iceberg.LATEST).scan().to_arrow()
    rows = {r[0]: r[1:] for r in con.sql("SELECT image_uri, run_id, status, verdict FROM latest").fetchall()}
    assert rows == {"a": ("r2", "ok", "anomalous"), "b": ("r1", "ok", "normal"),  # a failure keeps the success
                    "c": ("r1", "ok", "normal"), "d": ("r2", "ok", "normal")}
    assert latest.num_rows == 4

    audits = iceberg.table(cfg.output, iceberg.AUDITS)
    appends = [s for s in audits.snapshots() if s.summary.additional_properties.get("eagle.run_id")]
    assert [s.summary.additional_properties["eagle.run_id"] for s in appends] == ["r1", "r2"]
    first = audits.scan(snapshot_id=appends[0].snapshot_id).to_arrow()  # time travel: what r1 said
    assert sorted(first.column("image_uri").to_pylist()) == ["a", "b", "c"]
    assert set(first.column("run_id").to_pylist()) == {"r1"}
    assert audits.scan().to_arrow().num_rows == 6
    fields = {f.name: str(f.transform) for f in audits.spec().fields}
    assert fields == {"product": "identity", "audit_day": "day"}
    assert audits.scan(row_filter=EqualTo("product", "q")).to_arrow().num_rows == 1

    store = result_store(cfg)  # a run's own rows, for resume and its summary
    run_rows = con.sql(store.run_rows_sql(con, ["r2"], ["image_uri", "status"])).fetchall()
    assert sorted(run_rows) == [("a", "ok"), ("b", "error"), ("d", "ok")]
    in_ledger = dict(con.sql(f"SELECT image_uri, run_id FROM ({ledger.ledger_sql(con, cfg.output.uri)})").fetchall())
    assert in_ledger == {"a": "r2", "b": "r2", "c": "r1", "d": "r2"}  # the ledger keeps the newest row


def test_iceberg_catalog_from_config(tmp_path, monkeypatch):
    from eagle.config import ConfigError, load_config
    from eagle.io import iceberg

    def cfg(uri: str, **output):
        return load_config(overrides={"output": {"uri": uri, "format": "iceberg", **output},
                                      "storage": {"endpoint_url": "http://127.0.0.1:9000"}}, env={})

    local = cfg(str(tmp_path / "audit"))
    props = iceberg.catalog_properties(local.output, local.storage)
    assert props == {"warehouse": f"file://{tmp_path}/audit", "type": "sql",
                     "uri": f"sqlite:///{tmp_path}/audit/_iceberg/catalog.db"}
    with pytest.raises(ConfigError, match="needs output.catalog"):  # a SQLite file cannot live on S3
        remote = cfg("s3://plant-a/audit")
        iceberg.catalog_properties(remote.output, remote.storage)
    remote = cfg("s3://plant-a/audit", catalog={"type": "rest", "uri": "https://catalog.example.com"})
    props = iceberg.catalog_properties(remote.output, remote.storage)
    assert props["type"] == "rest" and props["warehouse"] == "s3://plant-a/audit"
    assert props["s3.endpoint"] == "http://127.0.0.1:9000"
    monkeypatch.setenv("PYICEBERG_CATALOG__EAGLE__TYPE", "glue")  # a catalog from pyiceberg's own environment
    assert "type" not in iceberg.catalog_properties(cfg("s3://plant-a/audit").output)
    assert "type" not in iceberg.catalog_properties(local.output)  # no SQLite default over it


def test_an_iceberg_table_from_before_a_new_column_gains_it(tmp_path, ray_local):
    # tables created by an earlier version (here: without expert_members) gain the column with the next write; the
    # rows they hold read the new column as null
    from eagle.config import load_config
    from eagle.io import iceberg

    cfg = load_config(overrides={"output": {"uri": str(tmp_path / "audit"), "format": "iceberg"}}, env={})
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "expert_members"])
    catalog = iceberg.load_catalog(cfg.output)
    catalog.create_namespace_if_not_exists(cfg.output.namespace)
    for name in (iceberg.AUDITS, iceberg.LATEST):
        old = catalog.create_table(iceberg.identifier(cfg.output, name), schema=old_schema)
        old.append(to_table([_row("a", "r0")]).drop_columns(["expert_members"]))
    _iceberg_run(cfg, "r1", [_row("b", "r1") | {"expert_members": [
        {"model": "patchcore", "version": "v", "score": 1.5, "threshold": 2.0}]}])
    for name in (iceberg.AUDITS, iceberg.LATEST):
        rows = {r["image_uri"]: r["expert_members"] for r in iceberg.table(cfg.output, name).scan().to_arrow()
                .select(["image_uri", "expert_members"]).to_pylist()}
        assert rows == {"a": None, "b": [{"model": "patchcore", "version": "v", "score": 1.5, "threshold": 2.0}]}
