"""jobs/inspect.py's command line: flags map onto config keys, overrides may stand anywhere, errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eagle.cli import inspect_cmd


@pytest.fixture(scope="module")
def cli():
    return inspect_cmd


def test_flags_and_intermixed_overrides(cli):
    args = cli.parse_args(["--input", "s3://b/a", "expert.k=7", "--input", "/data/list.csv", "--output", "/o",
                           "--mllm", "none", "--route", "uncertain", "--run-id", "r1", "--mode", "incremental",
                           "resources.mllm.batch_size=2"])
    assert args.overrides == ["expert.k=7", "resources.mllm.batch_size=2"]
    flags = cli._flag_overrides(args)
    assert flags == {"inputs": {"uris": ["s3://b/a"], "manifest": "/data/list.csv"}, "output": {"uri": "/o"},
                     "mllm": {"model": "none"}, "routing": {"policy": "uncertain"}, "run_id": "r1",
                     "mode": "incremental"}


def test_only_demo_options_run_the_demo(cli):
    demo = ([], ["--demo-dir", "d"], ["--demo-mllm", "internvl"], ["--demo-mllm", "llava_onevision", "--demo-dir", "d"])
    for argv in demo:
        assert cli._demo_only(argv, cli.parse_args(argv)), argv
    for argv in (["--demo-dir", "d", "--input", "/x"], ["run_id=x"], ["--demo-mllm", "internvl", "--mllm", "none"]):
        assert not cli._demo_only(argv, cli.parse_args(argv)), argv
    with pytest.raises(SystemExit):
        cli.parse_args(["--demo-mllm", "gpt"])


def test_bad_config_exits_2_with_the_key(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / "inspect.py"), "--input", str(tmp_path),
                           "--model-store", str(tmp_path), "--output", str(tmp_path), "expert.batchsize=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "expert.batchsize: unknown key" in proc.stderr


def test_unreachable_storage_exits_3(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / "inspect.py"), "--input", "s3://no-such/x",
                           "--model-store", str(tmp_path), "--output", str(tmp_path / "out"), "--mllm", "none",
                           "storage.endpoint_url=http://127.0.0.1:9", "storage.max_attempts=1"],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "cannot list inputs" in proc.stderr


@pytest.mark.parametrize("job", ["inspect", "fit", "maintain"])
def test_print_config_shows_the_effective_config_and_starts_nothing(repo_root, tmp_path, job):
    config = tmp_path / "job.yaml"
    config.write_text("output: {max_error_rate: 0.2}\n")
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / f"{job}.py"), "--print-config", "--config",
                           str(config), "resources.expert.num_gpus=1"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                             "RAY_ADDRESS": "ray://head:10001", "PYTHONPATH": str(repo_root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for setting in ("  max_error_rate: 0.2", "    num_gpus: 1.0", "  address: ray://head:10001"):  # file, override, env
        assert lines[lines.index(setting) - 1].lstrip().startswith("# "), setting  # described above
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"] and not proc.stderr  # nothing written or started
