"""Shared fixtures: a real S3 endpoint on 127.0.0.1 (moto's server), a local Ray sized for 2 cores.

Tiny models run single-threaded: two cores thrash otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TEST_KEY_ID = "testing-key-id"
TEST_SECRET = "testing-secret-Zq9"  # distinctive, so leak tests can grep for it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"S3 test server did not come up on port {port}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free loopback port; the AWS env vars point at it for the whole session."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=TEST_KEY_ID,
                      AWS_SECRET_ACCESS_KEY=TEST_SECRET, AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_REGION", None)
    try:
        _wait_port(port)
        yield endpoint
    finally:
        # moto's server has been seen to ignore SIGTERM: kill the whole process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket; returns ``s3://NAME``. Created without a region (moto rejects one)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[str]:
    """A local Ray with a dashboard (for `ray job submit` and the state API); yields the dashboard URL.

    8 logical CPUs on 2 cores, so fractional actor pools cannot starve read tasks. Depends on the S3 server so
    that workers inherit its endpoint and keys (they must be set before ``ray.init``).
    """
    import ray

    port = _free_port()
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")}
        ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=False, runtime_env={"env_vars": env})
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- tiny MLLMs
# Built once per session into a temp dir (a few seconds each); load them through AutoProcessor /
# AutoModelForImageTextToText. Random weights: their words are noise, the machinery is what gets tested.
@pytest.fixture(scope="session")
def tiny_mllm(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """Builds the tiny random checkpoint of a family (eagle.testing.tiny_mllm.FAMILIES) once; returns its dir."""
    from eagle.testing.tiny_mllm import build_tiny_mllm

    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = build_tiny_mllm(family, str(tmp_path_factory.mktemp(f"tiny_{family}")))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen25vl(tiny_mllm: Callable[[str], str]) -> str:
    """A tiny random Qwen2.5-VL (8 decoder layers, locally trained tokenizer); returns the saved dir."""
    return tiny_mllm("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen3vl(tiny_mllm: Callable[[str], str]) -> str:
    """A tiny random Qwen3-VL (6 decoder layers, deepstack, locally trained tokenizer); returns the saved dir."""
    return tiny_mllm("qwen3_vl")


@pytest.fixture(scope="session")
def audit_setup(s3_server: str, ray_local: str, tiny_qwen25vl: str) -> dict:
    """Synthetic data (with bad files) on S3 and experts fitted for it; shared by the end-to-end tests."""
    from e2e import make_audit_setup

    return make_audit_setup(s3_server, tiny_qwen25vl)
