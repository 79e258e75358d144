"""Credentials never travel in a runtime env: a job connected to a running cluster with keys in its own
environment leaves no secret in Ray's job table (dashboard API, `ray list jobs --detail`), its logs or its
output, while the cluster's workers still read and write S3 with credentials of their own (here a shared
credentials file, as an instance profile or a mounted Secret would provide on a real cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_KEY_ID, TEST_SECRET
from e2e import job_config, output_rows, running_head

from eagle.io import storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_no_secret_in_the_job_table_while_workers_read_s3(audit_setup, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {TEST_KEY_ID}\naws_secret_access_key = {TEST_SECRET}\n")
    cluster_env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    head_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    cluster_env.update(RAY_AUTH_MODE="disabled", AWS_SHARED_CREDENTIALS_FILE=str(credentials), RAY_TMPDIR=head_tmp)
    cluster_env.pop("RAY_ADDRESS", None)  # it would override `--address` below
    output = f"{audit_setup['root']}/no-secrets"
    o = audit_setup["overrides"]
    with running_head(cluster_env, dashboard=True) as (port, dashboard):
        driver_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": f"127.0.0.1:{port}"}
        driver_env.pop("AWS_SHARED_CREDENTIALS_FILE", None)  # the driver has keys in its environment only
        assert driver_env["AWS_SECRET_ACCESS_KEY"] == TEST_SECRET
        job = subprocess.run(
            [sys.executable, "jobs/inspect.py", "--input", audit_setup["data"], "--model-store", o["model_store"],
             "--output", output, "--run-id", "nosecret", "--mllm", "none", "inputs.max_image_pixels=50000000",
             'inputs.exclude=["*/ground_truth/*", "*/train/*"]', "expert.resize=128", "expert.crop=112",
             "output.max_error_rate=0.9"],
            cwd=ROOT, env=driver_env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:]
        assert "not sending AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY to the cluster" in job.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=30) as resp:
            jobs_api = resp.read().decode()
        listed = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "jobs", "--detail",
                                 "--address", f"http://127.0.0.1:{dashboard}"],
                                env=cluster_env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        # the job table does show the job's runtime env (its non-secret settings), just not the secrets
        assert os.environ["AWS_ENDPOINT_URL"] in jobs_api and os.environ["AWS_ENDPOINT_URL"] in listed.stdout
        logs = "".join(p.read_text(errors="replace") for p in Path(head_tmp, "ray", "session_latest", "logs").glob("*")
                       if p.is_file())
        assert logs, "the cluster's logs were not found"
    shutil.rmtree(head_tmp, ignore_errors=True)
    for where, text in (("dashboard /api/jobs/", jobs_api), ("ray list jobs --detail", listed.stdout),
                        ("the job's output", job.stdout + job.stderr), ("the cluster's logs", logs)):
        assert TEST_SECRET not in text, f"the secret appears in {where}"
    rows = output_rows(job_config(audit_setup, output={"uri": output}), "run_id = 'nosecret'")
    assert rows and any(r["status"] == "ok" for r in rows)  # workers read the images and wrote the rows
    assert not any("could not read" in (r["error"] or "") for r in rows)
    for uri in storage.list_files(output):
        assert TEST_SECRET.encode() not in storage.read_bytes(uri.uri)
