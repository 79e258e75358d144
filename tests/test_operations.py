"""Operations: `ray job submit`, a killed driver resumed by run id, a killed actor, a flaky object store,
and credentials that never reach logs or output. Each run must leave every image exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TEST_SECRET
from e2e import job_config, output_rows, output_section
from faulty_proxy import FaultyProxy

from eagle.io import iceberg, storage
from eagle.io.inputs import list_inputs
from eagle.io.runs import output_files
from eagle.pipeline.inspection import run_inspect

pytestmark = pytest.mark.slow

INSPECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "inspect.py")


def _cli_args(setup: dict, output: str, run_id: str, *extra: str) -> list[str]:
    """Command-line form of the shared test config, with a fresh output prefix."""
    o = setup["overrides"]
    return ["--input", setup["data"], "--model-store", o["model_store"], "--output", output, "--run-id", run_id,
            'inputs.exclude=["*/ground_truth/*", "*/train/*"]', "inputs.max_image_pixels=50000000",
            "expert.backbone=resnet18", "expert.weights=random", "expert.resize=128", "expert.crop=112",
            "output.max_error_rate=0.9", *extra]


def _assert_exactly_once(setup: dict, output: str, run_id: str) -> list[dict]:
    cfg = job_config(setup, output={"uri": output})
    listed = sorted(list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist())
    rows = output_rows(cfg, f"run_id = '{run_id}'")
    assert sorted(r["image_uri"] for r in rows) == listed
    return rows


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_ray_job_submit_and_no_credentials_in_logs(audit_setup, ray_local, tmp_path):
    output = f"{audit_setup['root']}/submitted"
    env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")}
    env_vars.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_local,
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
           sys.executable, INSPECT, *_cli_args(audit_setup, output, "submitted", "--mllm", "none")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "run submitted:" in log and "status:" in log  # the job's summary reached the submitter
    rows = _assert_exactly_once(audit_setup, output, "submitted")
    assert {r["status"] for r in rows} == {"ok", "error"}
    # the secret key travelled in the runtime env; it must appear in no log, output row or manifest
    assert TEST_SECRET not in log
    for uri in output_files(output) + [f"{output}/_runs/submitted.json"]:
        assert TEST_SECRET.encode() not in storage.read_bytes(uri)


def _committed(cfg) -> bool:
    """Whether the run has committed rows: a result file (Parquet) or a snapshot of `audits` (Iceberg)."""
    if cfg.output.format == "parquet":
        return bool(output_files(cfg.output.uri))
    audits = iceberg.table(cfg.output, iceberg.AUDITS, cfg.storage)
    return audits is not None and audits.current_snapshot() is not None


@pytest.mark.parametrize("fmt", ["parquet", "iceberg"])
def test_killed_driver_resumes_exactly_once(audit_setup, ray_local, tmp_path, fmt):
    out = output_section(audit_setup, fmt, f"resumed-{fmt}", lease_ttl_s=3, min_rows_per_file=1, commit_rows=2)
    cfg = job_config(audit_setup, output=out)
    output = cfg.output.uri
    cmd = [sys.executable, INSPECT, *_cli_args(audit_setup, output, "resume", "--mllm", audit_setup["overrides"]
                                               ["mllm"]["model"], f"ray.address={_gcs_address()}",
                                               "mllm.dtype=float32", "mllm.max_new_tokens=24",
                                               "resources.decode.batch_size=2", "resources.expert.batch_size=2",
                                               "resources.finish.batch_size=2", "resources.mllm.batch_size=2",
                                               *(f"output.{k}={json.dumps(v)}" for k, v in out.items()))]
    log = tmp_path / "driver.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not _committed(cfg):
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run
    proc.wait()
    written_before = len(output_rows(cfg, "run_id = 'resume'"))
    time.sleep(3.5)  # the dead driver's lease expires (output.lease_ttl_s)
    summary = run_inspect(job_config(audit_setup, output=out, run_id="resume", mllm={"model": "none"}))
    assert 0 < written_before < summary.listed
    assert summary.skipped == written_before and summary.audited == summary.listed - written_before
    listed = sorted(list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist())
    assert sorted(r["image_uri"] for r in output_rows(cfg, "run_id = 'resume'")) == listed  # exactly once


def test_one_driver_per_run_id_and_resume_after_the_lease_expires(audit_setup, ray_local):
    output = f"{audit_setup['root']}/twins"
    args = _cli_args(audit_setup, output, "twin", "--mllm", audit_setup["overrides"]["mllm"]["model"],
                     f"ray.address={_gcs_address()}", "mllm.dtype=float32", "mllm.max_new_tokens=24",
                     "output.lease_ttl_s=6", "resources.expert.batch_size=1", "resources.decode.batch_size=1",
                     "resources.mllm.batch_size=1")  # slow enough to still hold the run when the twin starts
    first = subprocess.Popen([sys.executable, INSPECT, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    lease = f"{output}/_runs/_output.lease"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not storage.exists(lease):
        time.sleep(0.2)
    assert first.poll() is None, "the first driver ended before the second could start"
    second = subprocess.run([sys.executable, INSPECT, *args, "output.lease_wait_s=0"], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is being written by another driver (run twin, pid {first.pid} on " in second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # the holder dies without releasing its lease
    first.wait()
    assert storage.exists(lease)
    time.sleep(6.5)  # output.lease_ttl_s: the lease of the dead driver expires
    cfg = job_config(audit_setup, output={"uri": output, "lease_ttl_s": 6}, run_id="twin", mllm={"model": "none"})
    summary = run_inspect(cfg)
    assert summary.skipped + summary.audited == summary.listed
    _assert_exactly_once(audit_setup, output, "twin")
    assert not storage.exists(lease)  # released at the end


def test_killed_actor_is_replaced_exactly_once(audit_setup, ray_local):
    from ray.util.state import list_actors

    output = f"{audit_setup['root']}/actor-kill"
    cmd = [sys.executable, INSPECT, *_cli_args(audit_setup, output, "actorkill", "--mllm", "none",
                                               f"ray.address={_gcs_address()}", "resources.expert.batch_size=2",
                                               "resources.decode.batch_size=2")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        for actor in list_actors(filters=[("state", "=", "ALIVE")], address=_gcs_address(), detail=True):
            if "ExpertStage" in (actor.get("class_name") or "") + (actor.get("repr_name") or "") and actor.get("pid"):
                time.sleep(1.0)  # let it take work
                os.kill(actor["pid"], signal.SIGKILL)
                killed = actor["pid"]
                break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=900)
    assert killed, "never saw an expert actor to kill"
    assert proc.returncode == 0, out[-4000:]
    _assert_exactly_once(audit_setup, output, "actorkill")


def test_a_dead_mllm_actor_leaves_the_expert_verdict_and_every_image_once(audit_setup, ray_local):
    # the MLLM actor is killed while the run streams and may not restart: the routed rows it did not answer keep
    # the expert's verdict with the error, the rest are untouched, and every image is written once
    import threading

    from ray.util.state import list_actors

    killed: list[int] = []

    def kill_the_mllm_actor() -> None:
        deadline = time.time() + 600
        while not killed and time.time() < deadline:
            for actor in list_actors(filters=[("state", "=", "ALIVE")], address=_gcs_address(), detail=True):
                if "MLLMStage" in (actor.get("class_name") or "") and actor.get("pid"):
                    time.sleep(0.5)  # loaded and ready; the first routed rows are seconds away (expert start-up)
                    os.kill(actor["pid"], signal.SIGKILL)
                    killed.append(actor["pid"])
                    return
            time.sleep(0.2)

    output = f"{audit_setup['root']}/mllm-kill"
    cfg = job_config(audit_setup, output={**audit_setup["overrides"]["output"], "uri": output}, run_id="mllmkill",
                     routing={"policy": "not-confident-normal"},
                     confidence={"low_factor": 0.7}, resources={"mllm": {"max_restarts": 0}})
    killer = threading.Thread(target=kill_the_mllm_actor, daemon=True)
    killer.start()
    summary = run_inspect(cfg)
    killer.join(timeout=5)
    assert killed, "never saw an MLLM actor to kill"
    rows = _assert_exactly_once(audit_setup, output, "mllmkill")
    ok = [r for r in rows if r["status"] == "ok"]
    routed = [r for r in ok if r["confidence"] != "confident_normal"]
    lost = [r for r in routed if r["error_stage"] == "mllm"]
    assert lost and all("MLLM generation failed, expert verdict kept" in r["error"] for r in lost)
    assert all(r["verdict"] == r["expert_verdict"] and not r["mllm_ran"] for r in lost)
    assert all(r["mllm_ran"] for r in routed if r not in lost)  # answered before the kill
    assert not any(r["error"] for r in ok if r not in routed)  # the CPU branch never saw the MLLM
    assert summary.mllm_calls == len(routed) - len(lost)


def test_flaky_object_store_is_survived(audit_setup, s3_server, ray_local):
    # every request of the job goes through the proxy: listings, image and artifact reads, the lease, the
    # plan, the Parquet writes and the ledger; one in ten of each method fails (503 SlowDown, 500, dropped
    # before or after the server saw it)
    output = f"{audit_setup['root']}/flaky"
    with FaultyProxy(s3_server, every=10) as proxy:
        cfg = job_config(audit_setup, output={"uri": output}, run_id="flaky", mllm={"model": "none"},
                         storage={"endpoint_url": proxy.url})
        summary = run_inspect(cfg)
    assert all(proxy.injected.values()), proxy.injected  # faults of every kind happened
    assert {"GET", "HEAD", "PUT"} <= set(proxy.by_method), proxy.by_method  # on reads and on writes
    rows = _assert_exactly_once(audit_setup, output, "flaky")
    failed = {r["image_uri"].rsplit("/", 1)[1] for r in rows if r["status"] == "error" and r["product"] != "widget"}
    assert failed == {f"zz_{name}" for name in audit_setup["bad"]}  # no image failed because of the faults
    assert summary.audited == len(rows)
    # failed requests are counted from whichever process met them (the driver, decode tasks, expert actors,
    # write tasks) and the summary prints them; the count is exact for 5xx (tests/test_storage_faults.py), but
    # here the lease release and the final manifest come after the summary, and dropped connections may be
    # resent by the HTTP client unseen
    counted = summary.storage_retries
    assert 0 < sum(counted.values()) <= proxy.faults, (counted, proxy.injected)
    assert counted["read"] and counted["write"], counted
    assert any(line.startswith("  storage retries") for line in summary.lines())


def test_write_failure_exits_3_in_bounded_time_and_resume_completes_once(audit_setup, s3_server, ray_local):
    output = f"{audit_setup['root']}/writefail"
    bucket = audit_setup["root"].removeprefix("s3://")
    # every write of a result file fails (PUT/POST/DELETE under the product partitions, which also stops the
    # abort of partial uploads); the lease, manifest, plan and all reads go through
    with FaultyProxy(s3_server, every=1, methods={"PUT", "POST", "DELETE"}, kinds=("slowdown", "reset"),
                     paths=rf"/{bucket}/writefail/product(=|%3D)") as proxy:
        cmd = [sys.executable, INSPECT, *_cli_args(audit_setup, output, "wf", "--mllm", "none",
                                                   f"ray.address={_gcs_address()}", f"storage.endpoint_url={proxy.url}",
                                                   "storage.max_attempts=2", "storage.connect_timeout_s=2",
                                                   "storage.read_timeout_s=5")]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        took = time.time() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-4000:]
    assert "the run stopped on an object-store error (after retries)" in log
    assert f"{bucket}/writefail/product=" in log and "--run-id wf" in log  # names the object and the way on
    assert took < 240, took  # 2 attempts x 2 rounds per request, no endless retrying
    assert proxy.faults >= 2
    cfg = job_config(audit_setup, output={"uri": output}, run_id="wf", mllm={"model": "none"})
    summary = run_inspect(cfg)  # the store behaves again: the same run id completes it
    rows = _assert_exactly_once(audit_setup, output, "wf")
    assert summary.skipped + summary.audited == summary.listed == len(rows)
    import boto3

    uploads = boto3.client("s3", endpoint_url=s3_server).list_multipart_uploads(Bucket=bucket, Prefix="writefail/")
    assert not uploads.get("Uploads")  # partial uploads aborted, not left billing
