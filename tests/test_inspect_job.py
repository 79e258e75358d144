"""End to end on a real local S3 endpoint and a local Ray: synthetic data with bad files mixed in → fit →
inspect with a tiny MLLM → exactly one row per input, clear errors, DuckDB over s3fs; re-runs and
incremental re-audits audit exactly what they should."""

from __future__ import annotations

import duckdb
import pytest
from conftest import TEST_SECRET
from e2e import job_config, output_rows, output_section, png
from PIL import Image

from eagle.io import storage
from eagle.io.inputs import list_inputs
from eagle.pipeline.fitting import fit_products
from eagle.pipeline.inspection import run_inspect
from eagle.testing.synth import image_rng, render_normal

pytestmark = pytest.mark.slow

def test_every_input_once_with_clear_errors_and_duckdb(audit_setup):
    cfg = job_config(audit_setup, run_id="first")
    summary = run_inspect(cfg)
    listed = list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist()
    rows = output_rows(cfg, "run_id = 'first'")
    assert sorted(r["image_uri"] for r in rows) == sorted(listed)  # exactly once each
    assert summary.audited == len(listed) == sum(summary.status.values())
    by_name = {r["image_uri"].rsplit("/", 1)[1]: r for r in rows}
    reasons = {"zz_zero.png": "empty file", "zz_text.png": "not an image", "zz_truncated.png": "truncated",
               "zz_bomb.png": "too large"}
    for name, reason in reasons.items():
        assert by_name[name]["status"] == "error" and reason in by_name[name]["error"], by_name[name]
    widget = [r for r in rows if r["product"] == "widget"]
    assert len(widget) == 1 and widget[0]["status"] == "error" and "no fitted expert" in widget[0]["error"]
    for name in audit_setup["odd"]:
        row = by_name[f"zz_{name}"]
        assert row["status"] == "ok" and row["expert_score"] is not None, row
    assert (by_name["zz_exif.jpg"]["width"], by_name["zz_exif.jpg"]["height"]) == (96, 48)  # upright
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["mllm_ran"] and r["answer"] in ("yes", "no", "unparsed") for r in ok)  # policy 'all'
    assert all(r["verdict"] in ("normal", "anomalous") and r["explanation"] for r in ok)
    assert all(r["config_hash"] == ok[0]["config_hash"] and r["expert_model_version"] for r in ok)
    con = duckdb.connect()
    fs = storage.filesystem(cfg.output.uri)[0]
    fs.invalidate_cache()
    con.register_filesystem(fs)
    grouped = con.sql(f"SELECT product, verdict, count(*) FROM read_parquet('{cfg.output.uri}/**/*.parquet', "
                      f"hive_partitioning = true) WHERE status = 'ok' GROUP BY ALL").fetchall()
    assert {p for p, _, _ in grouped} == {"grid", "nut"}
    assert sum(n for _, _, n in grouped) == len(ok)


@pytest.mark.parametrize("fmt", ["parquet", "iceberg"])
def test_same_run_id_again_adds_nothing(audit_setup, fmt):
    cfg = job_config(audit_setup, run_id="twice", mllm={"model": "none"},
                     output=output_section(audit_setup, fmt, f"twice-{fmt}"))
    first = run_inspect(cfg)
    again = run_inspect(cfg)
    assert again.audited == 0 and again.skipped == first.listed
    rows = output_rows(cfg, "run_id = 'twice'")
    assert len(rows) == len({r["image_uri"] for r in rows}) == first.listed
    # the S3 credentials handed to pyiceberg's FileIO land in no table file, manifest or catalog entry
    written = [f.uri for f in storage.list_files(cfg.output.uri)] + [cfg.output.catalog.get("uri", "").removeprefix("sqlite:///")]
    assert all(TEST_SECRET.encode() not in storage.read_bytes(uri) for uri in written if uri)


@pytest.mark.parametrize("fmt", ["parquet", "iceberg"])
def test_incremental_audits_new_images_and_refit_product_only(audit_setup, fmt):
    base = {"mllm": {"model": "none"}, "mode": "incremental", "output": output_section(audit_setup, fmt, f"inc-{fmt}")}
    cfg = job_config(audit_setup, run_id="inc0", **base)
    run_inspect(cfg)  # baseline for this model/config
    data = audit_setup["data"]
    new = [f"{data}/grid/test/good/new_{fmt}_{i}.png" for i in range(5)]
    for i, uri in enumerate(new):
        storage.write_bytes(uri, png(Image.fromarray(render_normal("grid", image_rng(77, "grid", fmt, i), 96))))
    run_inspect(job_config(audit_setup, run_id="inc1", **base))
    audited = {r["image_uri"] for r in output_rows(cfg, "run_id = 'inc1'")}
    assert audited == set(new)  # unchanged images, good or bad, are not redone

    # a new artifact version for one product (another threshold method) re-audits that product only
    refit = job_config(audit_setup, threshold={"method": {"parquet": "mad", "iceberg": "quantile"}[fmt]})
    assert not isinstance(fit_products(data, ["grid"], refit)["grid"], Exception)
    run_inspect(job_config(audit_setup, run_id="inc2", **base))
    rows = output_rows(cfg, "run_id = 'inc2'")
    grid_listed = [u for u in list_inputs(refit.inputs).column("image_uri").to_pylist() if "/grid/" in u]
    assert sorted(r["image_uri"] for r in rows) == sorted(grid_listed)


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl", "llava_onevision"])
def test_each_tiny_mllm_family_audits_every_image_once(audit_setup, tiny_mllm, family):
    run_id = f"family-{family}"
    model = tiny_mllm(family)
    cfg = job_config(audit_setup, run_id=run_id, mllm={**audit_setup["overrides"]["mllm"], "model": model})
    summary = run_inspect(cfg)
    listed = list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist()
    rows = output_rows(cfg, f"run_id = '{run_id}'")
    assert sorted(r["image_uri"] for r in rows) == sorted(listed) and summary.audited == len(listed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["mllm_ran"] and r["mllm_model"] == model for r in ok)
    assert all(r["answer"] in ("yes", "no", "unparsed") and r["verdict"] in ("normal", "anomalous") for r in ok)
    for r in ok:  # a share exactly where the expert gave the MLLM a region (an anomalous verdict with boxes)
        boxed = r["expert_verdict"] == "anomalous" and bool(r["boxes"])
        assert (r["image_attention_share"] is not None) == boxed and (not boxed or 0 <= r["image_attention_share"] <= 1)


def test_only_routed_rows_enter_the_mllm_pool(audit_setup):
    # the stream splits after the expert: confident-normal rows and error rows finish on the CPU, the routed rows
    # go to the MLLM actors; both join again before the write. (Random backbone weights score every test image
    # below its threshold: a band from 0.7x the threshold routes about half of them.)
    cfg = job_config(audit_setup, run_id="split", routing={"policy": "not-confident-normal"},
                     confidence={"low_factor": 0.7},
                     output={**audit_setup["overrides"]["output"], "uri": f"{audit_setup['root']}/split"})
    summary = run_inspect(cfg)
    listed = list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist()
    rows = output_rows(cfg, "run_id = 'split'")
    assert sorted(r["image_uri"] for r in rows) == sorted(listed)  # exactly once each
    ok = [r for r in rows if r["status"] == "ok"]
    routed = [r for r in ok if r["confidence"] != "confident_normal"]
    assert routed and len(routed) < len(ok)  # both branches carry rows
    assert any(r["status"] == "error" for r in rows)  # error rows pass the CPU branch
    assert summary.stage_input_rows["mllm"] == len(routed) == summary.mllm_calls
    assert all(r["mllm_ran"] for r in routed) and not any(r["mllm_ran"] for r in ok if r not in routed)
    assert summary.stage_input_kb["mllm"] < 4  # decision columns only: no pixels
    assert summary.stage_input_rows["finish"] == len(listed)
