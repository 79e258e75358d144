"""Planning over earlier output: the compacted ledger, resume (a run's own rows and torn files), the
incremental rules, transient errors that must delete nothing, S3 Inventory input, and `--dry-run`."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle.config import ConfigError, InputConfig, RoutingConfig, load_config
from eagle.expert.ensemble import pinned_metas
from eagle.io import ledger, querying, results, storage
from eagle.io.inputs import list_inputs
from eagle.io.results import result_store
from eagle.io.runs import RunInfo, begin_run
from eagle.io.schema import to_table
from eagle.pipeline import planning
from eagle.pipeline.inspection import run_inspect, say_unreachable_band


def _row(uri: str, run: str, status: str = "ok", version: str = "v1", expert: str | None = "e1", when: int = 0,
         stage: str | None = None) -> dict:
    return {"image_uri": uri, "run_id": run, "status": status, "image_version": version, "error_stage": stage,
            "expert_model_version": expert, "mllm_model": "m", "config_hash": "h", "product": "p",
            "verdict": "normal" if status == "ok" else None,
            "audited_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=when)}


def _write(out: str, run: str, rows: list[dict], task: int = 0) -> str:
    uri = storage.join(out, "product=p", "audit_date=2026-01-01", f"{run}_a001_uuid_{task:06d}-0.parquet")
    with storage.open_uri(uri, "wb") as fh:
        pq.write_table(to_table(rows).drop_columns(["product", "audit_date"]), fh)
    return uri


def _tear(uri: str) -> None:
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 2])  # a crash mid-write


def _cfg(out: str, **extra):
    return load_config(overrides={"output": {"uri": out}, "model_store": "/models", "mllm": {"model": "m"},
                                  **extra}, env={})


def _plan(cfg, run_id: str, listing: dict[str, str], monkeypatch) -> tuple[set[str], set[str]]:
    """Plan run `run_id` over `listing` (image_uri → image_version, product p, its expert pinned at e1): (the
    images to audit, the images that failed before), read from the plan's files."""
    manifest = os.path.join(os.path.dirname(cfg.output.uri), f"manifest-{run_id}.parquet")
    pq.write_table(pa.table({"uri": list(listing), "product": ["p"] * len(listing),
                             "image_version": list(listing.values())}), manifest)
    monkeypatch.setattr(planning, "pin_expert_versions", lambda cfg, products: {"p": "e1"})
    cfg = cfg.model_copy(update={"inputs": cfg.inputs.model_copy(update={"manifest": manifest})})
    run = RunInfo(run_id=run_id, started_at="", audit_date="2026-01-02", config_hash="h", attempts=["t"])
    plan_dir = os.path.join(os.path.dirname(cfg.output.uri), f"plan-{run_id}")
    plan = planning.make_plan(querying.connect(), cfg, run, "h", plan_dir, result_store(cfg, listed=True), cpus=1.0)
    todo = set(pq.read_table(plan.todo_dir).column("image_uri").to_pylist()) if plan.todo_dir else set()
    return todo, set(pq.read_table(plan.failed_before).column("image_uri").to_pylist())


def test_ledger_holds_the_latest_row_per_image_and_merges_each_attempt_once(tmp_path):
    out = str(tmp_path)
    con = querying.connect()
    for run, when in (("r1", 0), ("r2", 1)):
        begin_run(out, run, "h")
        _write(out, run, [_row("a", run, when=when), _row(f"only-{run}", run, when=when)])
    assert ledger.pending_runs(out) == {"r1": 1, "r2": 1}
    ledger.merge_runs(con, result_store(_cfg(out)), ledger.pending_runs(out))
    rows = {r[0]: r[1] for r in con.execute(f"SELECT image_uri, run_id FROM ({ledger.ledger_sql(con, out)})")
            .fetchall()}
    assert rows == {"a": "r2", "only-r1": "r1", "only-r2": "r2"}  # one row per image, the latest wins
    assert ledger.pending_runs(out) == {}
    begin_run(out, "r1", "h")  # a resumed attempt of r1 is pending again
    assert ledger.pending_runs(out) == {"r1": 2}


def test_resume_reads_its_own_run_and_drops_only_its_own_torn_files(tmp_path, monkeypatch):
    out = str(tmp_path / "audit")
    cfg = _cfg(out)
    _write(out, "r1", [_row("a", "r1"), _row("b", "r1", status="error", stage="decode")])
    mine_torn = _write(out, "r1", [_row("d", "r1")], task=1)
    other_torn = _write(out, "r0", [_row("c", "r0")])
    _tear(mine_torn)
    _tear(other_torn)
    todo, _ = _plan(cfg, "r1", {u: "v1" for u in "abcd"}, monkeypatch)
    assert todo == {"c", "d"}  # error rows count as done
    assert not os.path.exists(mine_torn)  # its image d is audited again
    assert os.path.exists(other_torn)  # another run's file is never deleted


def test_incremental_rules_on_the_latest_row(tmp_path, monkeypatch):
    out = str(tmp_path / "audit")
    cfg = _cfg(out, mode="incremental")
    _write(out, "r1", [
        _row("same", "r1"), _row("changed", "r1"), _row("old-model", "r1", expert="e0"),
        _row("corrupt", "r1", status="error", stage="decode", expert=None),
        _row("unreadable", "r1", status="error", stage="read", expert=None),
        _row("unfitted", "r1", status="error", stage="expert", expert=None),
        _row("fixed-later", "r1", status="error", stage="decode", expert=None), _row("broke-later", "r1"),
    ])
    _write(out, "r2", [_row("fixed-later", "r2", when=1),
                       _row("broke-later", "r2", status="error", stage="decode", expert=None, when=1)])
    con = querying.connect()
    ledger.merge_runs(con, result_store(cfg), {"r1": 1, "r2": 1})
    uris = ["same", "changed", "old-model", "new", "corrupt", "unreadable", "unfitted", "fixed-later",
            "broke-later"]
    listing = {u: "v2" if u == "changed" else "v1" for u in uris}
    todo, failed = _plan(cfg, "r3", listing, monkeypatch)
    current = set(uris) - todo
    # unchanged successes and unchanged decode failures are skipped; read failures are retried, and so is a
    # product whose expert now exists; the latest row decides
    assert current == {"same", "corrupt", "fixed-later", "broke-later"}
    assert failed == {"corrupt", "unreadable", "unfitted", "broke-later"}
    # a new config hash or MLLM redoes every success; undecodable files depend on neither
    for other in (_cfg(out, mode="incremental", mllm={"model": "other"}),):
        todo, _ = _plan(other, "r3", listing, monkeypatch)
        assert set(uris) - todo == {"corrupt", "broke-later"}


def test_a_transient_read_error_while_planning_deletes_nothing(tmp_path, monkeypatch):
    out = str(tmp_path)
    mine = _write(out, "r1", [_row("a", "r1")])
    other = _write(out, "r0", [_row("b", "r0")])

    def flaky(*args, **kwargs):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 28, Timeout was reached")

    monkeypatch.setattr(results.pq, "read_metadata", flaky)
    with pytest.raises(OSError, match="cannot read output file"):
        results.run_files(out, "r1", drop_torn=True)
    with pytest.raises(OSError):
        ledger.merge_runs(querying.connect(), result_store(_cfg(out)), {"r0": 1})
    assert os.path.exists(mine) and os.path.exists(other)


def _inventory(bucket: str, fmt: str, keys: list[str]) -> None:
    """An S3 Inventory report for `bucket` in the same bucket: data file + manifest.json, as AWS writes them."""
    from urllib.parse import quote

    base = f"s3://{bucket}/inventory/{bucket}/daily/2026-11-30T01-00Z"
    rows = [{"Bucket": bucket, "Key": k, "Size": str(10 + i), "LastModifiedDate": "2026-11-29T10:00:00.000Z",
             "ETag": f"etag{i}"} for i, k in enumerate(keys)]
    if fmt == "CSV":
        buf = io.StringIO()
        writer = csv.writer(buf, quoting=csv.QUOTE_ALL)
        for r in rows:
            writer.writerow([r["Bucket"], quote(r["Key"]), r["Size"], r["LastModifiedDate"], r["ETag"]])
        data, name = gzip.compress(buf.getvalue().encode()), "data/part-0.csv.gz"
    else:
        table = pa.table({"bucket": [r["Bucket"] for r in rows], "key": [r["Key"] for r in rows],
                          "size": [int(r["Size"]) for r in rows], "e_tag": [r["ETag"] for r in rows]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        data, name = sink.getvalue(), "data/part-0.parquet"
    key = f"inventory/{bucket}/daily/data/{name.rsplit('/', 1)[1]}"
    storage.write_bytes(f"s3://{bucket}/{key}", data)
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "fileFormat": fmt,
                "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag", "files": [{"key": key, "size": len(data)}]}
    storage.write_bytes(f"{base}/manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_input_on_the_local_s3_server(s3_bucket, fmt):
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["plant/bolt/test/scratch/001.png", "plant/bolt/train/good/a b.png", "plant/nut/x/2.JPG",
            "plant/bolt/ground_truth/scratch/001_mask.png", "plant/readme.txt"]
    _inventory(bucket, fmt, keys)
    manifest = f"s3://{bucket}/inventory/{bucket}/daily/2026-11-30T01-00Z/manifest.json"
    table = list_inputs(InputConfig(manifest=manifest))
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(f"s3://{bucket}/{k}" for k in keys[:3])  # masks and non-images left out
    assert rows[f"s3://{bucket}/plant/bolt/train/good/a b.png"]["product"] == "bolt"  # keys url-decoded
    assert rows[f"s3://{bucket}/plant/nut/x/2.JPG"]["product"] == "x"  # the image's folder
    assert rows[f"s3://{bucket}/plant/bolt/test/scratch/001.png"]["image_version"] == "etag0"


def test_dry_run_plans_per_product_and_writes_nothing(tmp_path):
    from eagle.testing.synth import generate

    data, out = str(tmp_path / "data"), str(tmp_path / "audit")
    generate(data, products=("grid", "nut"), n_train=1, n_test_good=2, n_test_defect=1, size=64)
    cfg = load_config(overrides={"inputs": {"uris": [data], "exclude": ["*/ground_truth/*", "*/train/*"]},
                                 "output": {"uri": out}, "model_store": str(tmp_path / "models"),
                                 "mllm": {"model": "none"}, "run_id": "dry"}, env={})
    plan = run_inspect(cfg, dry_run=True)
    listed = list_inputs(cfg.inputs).to_pylist()
    assert [(p.product, p.listed, p.done, p.todo) for p in plan.products] == [
        (product, n, 0, n) for product, n in sorted(
            {r["product"]: sum(1 for x in listed if x["product"] == r["product"]) for r in listed}.items())]
    assert plan.lines()[-1].split() == ["total", str(len(listed)), "0", str(len(listed))]
    assert not os.path.exists(out) or not [f for f in storage.list_files(out)
                                           if "/_ledger/" not in f.uri]  # no manifest, plan or rows left


def test_an_empty_listing_is_refused_unless_allowed(tmp_path):
    (tmp_path / "empty").mkdir()
    overrides = {"inputs": {"uris": [str(tmp_path / "empty")]}, "output": {"uri": str(tmp_path / "audit")},
                 "model_store": str(tmp_path / "models"), "mllm": {"model": "none"}, "run_id": "dry"}
    with pytest.raises(ConfigError, match="the inputs list no images .*pass --allow-empty"):
        run_inspect(load_config(overrides=overrides, env={}), dry_run=True)
    overrides["inputs"]["allow_empty"] = True
    assert run_inspect(load_config(overrides=overrides, env={}), dry_run=True).listed == 0


def test_a_routing_policy_that_can_route_nothing_says_so_up_front(tmp_path, caplog):
    store = str(tmp_path / "models")
    for product, threshold in (("grid", 0.5), ("nut", 0.3)):  # grid: threshold above score_max 0.4
        meta = {"format": "eagle-expert/1", "threshold": {"value": threshold, "score_max": 0.4, "method": "mad"}}
        storage.write_bytes(storage.join(store, product, "v1", "meta.json"), json.dumps(meta).encode())
    cfg = load_config(overrides={"model_store": store, "routing": {"policy": "uncertain"}}, env={})
    with caplog.at_level(logging.INFO, "eagle.pipeline.inspection"):
        say_unreachable_band(cfg, pinned_metas(store, {"grid": "v1", "nut": "v1"}))
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records] == [("WARNING", "grid")]
    assert "routing.policy=uncertain sends none of its images" in caplog.text
    caplog.clear()
    for policy in ("all", "not-confident-normal"):  # policies that do not use the band: no advice
        with caplog.at_level(logging.INFO, "eagle.pipeline.inspection"):
            say_unreachable_band(cfg.model_copy(update={"routing": RoutingConfig(policy=policy)}),
                                 pinned_metas(store, {"grid": "v1"}))
        assert caplog.records == []
