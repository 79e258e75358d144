"""Jobs on a machine where a Ray is already running (`ray start --head`): they join it and say so, or start a
Ray of their own with ray.address=local. The data root's product folder is a symlink, as on shared storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from e2e import running_head

from eagle.testing.synth import generate

pytestmark = pytest.mark.slow

EXPERT = ["--backbone", "resnet18", "--weights", "random"]
OVERRIDES = ["expert.resize=64", "expert.crop=64", "threshold.min_unselected_patches=4"]


@pytest.fixture()
def ray_head() -> str:
    """A Ray head started the way users start one; yields ":PORT " as its address ends in the log."""
    with running_head({**os.environ, "RAY_AUTH_MODE": "disabled"}) as (port, _):
        yield f":{port} "


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
