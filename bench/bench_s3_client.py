"""The S3 client's cost on a result file: writing and reading one Parquet file of output-like rows through the
job's client (s3fs behind pyarrow's fsspec handler, `eagle.io.storage.pyarrow_filesystem`) next to pyarrow's
native S3 filesystem, against a local S3 server (moto) on loopback.

    python bench/bench_s3_client.py --rows 100000 --repeat 3

The job routes every S3 request through one client so that retries, timeouts, whole-or-nothing writes and the
retry count apply to all of them; this shows what that costs against the native writer on the same server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eagle.io import storage  # noqa: E402


def _rows(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({"image_uri": [f"s3://archive/p/{i:08d}.png" for i in range(n)], "expert_score": rng.random(n),
                     "mask_png": [rng.bytes(400) for _ in range(n)],
                     "explanation": ["a short explanation of the verdict"] * n})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3)
        cfg = storage.StorageConfig(endpoint_url=f"http://127.0.0.1:{port}")
        storage.filesystem("s3://bench", cfg)[0].call_s3("create_bucket", Bucket="bench")
        table = _rows(args.rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        print(f"{args.rows} rows, {sink.getvalue().size / 2**20:.1f} MiB of Parquet; best of {args.repeat}")
        clients = {"job client (s3fs)": storage.pyarrow_filesystem("s3://bench", cfg)[0],
                   "pyarrow native S3": pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                                          region="us-east-1", access_key="bench",
                                                          secret_key="bench")}
        for name, fs in clients.items():
            writes, reads = [], []
            for i in range(args.repeat):
                path = f"bench/{i}-{name.split()[0]}.parquet"
                start = time.perf_counter()
                pq.write_table(table, path, filesystem=fs)
                writes.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert pq.read_table(path, filesystem=fs).num_rows == args.rows
                reads.append(time.perf_counter() - start)
            print(f"  {name:<20} write {min(writes):.2f} s   read {min(reads):.2f} s")
    finally:
        os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
