"""Many nights of scheduled re-audits with their faults: the scenario of tests/test_nights.py (tests/nights.py),
repeated weekly for `--nights` nights (default 50) over a growing archive on a local S3 server (moto) and a
local Ray. Each week: a plain night, a SIGTERM mid-run and its retry, a SIGKILL of the process group mid-run and
an immediate retry, a lease left by a dead driver then a maintenance run, two overlapping drivers (the second
refused, run again later), and a night with 10% S3 faults. Every night is checked as it ends (completed, each
due image exactly once, no earlier row lost) and `latest` at the end; the last line gives the figures.

    python bench/bench_nights.py --nights 50
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                  AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_REGION", None)

from e2e import free_port  # noqa: E402
from nights import Nights, fit_pool, pool_size  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nights", type=int, default=50)
    args = p.parse_args()
    import boto3
    import ray
    import torch

    torch.set_num_threads(1)
    port = free_port()
    endpoint = os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="nights-"))
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)):
            assert time.time() < deadline, "the S3 server did not come up"
            time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="nights")
        env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")}
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        pool = fit_pool(work / "pool", "s3://nights/models", pool_size(args.nights))
        scenario = Nights("s3://nights", pool, "s3://nights/models", ray.get_runtime_context().gcs_address, work)
        figures = scenario.run(args.nights)
        print(figures.line())
        return 0 if figures.duplicates == figures.lost_rows == 0 else 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
