"""The README's first command: `python jobs/inspect.py` with no arguments runs the offline demo end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import duckdb
import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_offline_and_says_what_it_did(repo_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / "inspect.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "DEMO MODE" in proc.stdout and "TINY RANDOM MLLM" in proc.stderr  # labelled in output and log
    audit = tmp_path / "demo" / "audit"
    assert f"Output: {audit}" in proc.stdout and "import duckdb" in proc.stdout
    test_images = [p for p in (tmp_path / "demo" / "data").rglob("*.png") if "/test/" in str(p)]
    rows = duckdb.sql(f"SELECT image_uri, status, verdict, mllm_model FROM read_parquet('{audit}/**/*.parquet', "
                      f"hive_partitioning = true)").fetchall()
    assert sorted(r[0] for r in rows) == sorted(str(p) for p in test_images)
    assert all(r[1] == "ok" and r[2] in ("normal", "anomalous") for r in rows)
    assert all("tiny-mllm" in r[3] for r in rows)
    # quiet, useful logs: a few lines per step, one progress line per 30 s, no warnings, no colour codes
    log = proc.stderr.splitlines()
    assert len(log) <= 25, proc.stderr
    assert any("eagle.progress: progress:" in line and "of 32 images" in line for line in log)
    warnings = [line for line in log if re.search(r"warn", line, re.I)]
    assert not warnings, warnings
    # no Ray WARNING (token authentication stays on, RAY_AUTH_MODE=token said explicitly), no `E ...
    # core_worker.cc` line (a Ray Data actor stage on a local Ray does not restart), no band advice under a policy
    # that does not use the band (the demo routes not-confident-normal)
    alarms = [line for line in (proc.stdout + proc.stderr).splitlines()
              if re.search(r"WARNING|^\[?[^\]]*\bE \d+ \d+\]|^E |core_worker", line) or "band is empty" in line]
    assert not alarms, alarms
    assert "\x1b[" not in proc.stdout + proc.stderr
    assert "32 audited" in proc.stdout and "confidence: {" in proc.stdout  # the summary, on stdout
