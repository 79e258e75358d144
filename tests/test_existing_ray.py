"""Jobs on a machine where a Ray is already running (`ray start --head`): they join it and say so, or start a
Ray of their own with ray.address=local. The data root's product folder is a symlink, as on shared storage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from eagle.testing.synth import generate

pytestmark = pytest.mark.slow

EXPERT = ["--backbone", "resnet18", "--weights", "random"]
OVERRIDES = ["expert.resize=64", "expert.crop=64", "threshold.min_unselected_patches=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head() -> str:
    """A Ray head started the way users start one (``ray start --head``, kept in the foreground with --block so
    that stopping it stops only this head, not every Ray on the machine as ``ray stop`` would). Yields ":PORT "
    as its address ends in the log."""
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (address_file.exists() and address_file.read_text().strip().endswith(f":{port}")):
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield f":{port} "
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: `ray start` stops its own node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if address_file.exists() and address_file.read_text().strip().endswith(f":{port}"):
            address_file.unlink()


def _job(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, *args], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_fit_and_inspect_join_a_running_ray_or_start_their_own(tmp_path: Path, repo_root: Path, ray_head: str):
    generate(str(tmp_path / "datasets"), products=("grid",), n_train=4, n_test_good=1, n_test_defect=1, size=64)
    root = tmp_path / "root"
    root.mkdir()
    (root / "weave").symlink_to(tmp_path / "datasets" / "grid", target_is_directory=True)
    store, out = str(tmp_path / "models"), str(tmp_path / "audit")

    fit = _job(repo_root, "jobs/fit.py", "--data", str(root), "--model-store", store, *EXPERT, *OVERRIDES)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert ray_head in fit.stderr and "joining the Ray already running on this machine at " in fit.stderr
    assert fit.stdout.splitlines()[1].split()[0] == "weave"  # the symlinked product was fitted

    joined = _job(repo_root, "jobs/inspect.py", "--input", str(root), "--model-store", store, "--output", out,
                  "--mllm", "none", "--run-id", "joined", *OVERRIDES)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert ray_head in joined.stderr and "joining the Ray already running on this machine at " in joined.stderr

    own = _job(repo_root, "jobs/inspect.py", "--input", str(root), "--model-store", store, "--output", out,
               "--mllm", "none", "--run-id", "own", "ray.address=local", "ray.num_cpus=4", *OVERRIDES)
    assert own.returncode == 0, own.stderr[-3000:]
    assert "starting a local Ray with 4 logical CPUs" in own.stderr and "joining" not in own.stderr

    rows = duckdb.sql(f"SELECT run_id, image_uri, status FROM read_parquet('{out}/**/*.parquet', "
                      f"hive_partitioning = true)").fetchall()
    listed = sorted(str(p) for p in root.glob("weave/*/*/*.png") if "ground_truth" not in p.parts)
    for run in ("joined", "own"):
        assert sorted(u for r, u, s in rows if r == run and s == "ok") == listed  # every image once
