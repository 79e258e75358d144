"""Ctrl-C ends an inspect run cleanly: exit 130, the run manifest says interrupted, the last line is the command
that resumes it, and that command completes the run with every image exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from eagle.cli.inspect_cmd import resume_command
from eagle.cli.interrupts import catch_signals
from eagle.config import load_config
from eagle.expert.training import fit_product
from eagle.testing.synth import generate


def test_resume_command_sets_the_run_id(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["jobs/inspect.py"])
    cmd = resume_command(["--input", "/a b", "--run-id", "old", "--mllm", "none", "--run-id=x"], "r1")
    assert cmd == f"{sys.executable} jobs/inspect.py --input '/a b' --mllm none --run-id r1"


def test_sigterm_and_sigint_become_keyboard_interrupts_with_their_exit_codes():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        caught = catch_signals()
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises as soon as the signal is delivered
        assert caught.exit_code() == 143
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert caught.exit_code() == 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_sigint_marks_the_run_interrupted_and_prints_a_working_resume_command(tmp_path: Path, repo_root: Path):
    data, models, out = tmp_path / "data", tmp_path / "models", tmp_path / "out"
    generate(str(data), products=("grid", "nut"), n_train=4, n_test_good=3, n_test_defect=2, size=64)
    expert = {"backbone": "resnet18", "weights": "random", "resize": 64, "crop": 64}
    cfg = load_config(overrides={"model_store": str(models), "expert": expert,
                                 "threshold": {"min_unselected_patches": 4}})
    for product in ("grid", "nut"):
        fit_product(str(data), product, cfg)
    images = sorted(str(p) for p in data.rglob("*.png") if "/test/" in str(p))
    args = [str(repo_root / "jobs" / "inspect.py"), "--input", str(data), "--model-store", str(models),
            "--output", str(out), "--mllm", "none", "inputs.exclude=['*/ground_truth/*', '*/train/*']",
            "ray.address=local", "ray.num_cpus=4", "expert.backbone=resnet18", "expert.weights=random"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        manifests: list[Path] = []
        while not manifests:  # interrupt once the run has started (its manifest says running)
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
            manifests = list((out / "_runs").glob("*.json")) if (out / "_runs").exists() else []
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    (manifest,) = manifests
    run_id = manifest.stem
    assert json.loads(manifest.read_text())["status"] == "interrupted"
    resume = stderr.strip().splitlines()[-1]
    assert resume.startswith(sys.executable) and resume.endswith(f"--run-id {run_id}")

    summary_json = tmp_path / "summary.json"
    done = subprocess.run(f"{resume} --summary-json {summary_json}", shell=True, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(manifest.read_text())["status"] == "completed"
    rows = duckdb.sql(f"SELECT image_uri, count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning = "
                      f"true) WHERE run_id = '{run_id}' GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [(uri, 1) for uri in images]  # every image exactly once across the two attempts
    summary = json.loads(summary_json.read_text())
    assert summary["run_id"] == run_id and summary["listed"] == len(images)
    assert summary["final_status"] == "completed" and summary["mode"] == "full" and summary["config_hash"]
    assert set(summary["counts_by_status"]) == {"ok"} and summary["models"]["mllm"]["model"] is None
    assert summary["skipped"] + summary["audited"] == len(images)
    assert f"run {run_id}: {len(images)} images listed" in done.stdout  # the summary, on stdout
