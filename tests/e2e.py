"""Shared end-to-end set-up: a synthetic dataset with bad and odd files on the local S3 server, fitted experts,
and helpers to build job configs and read output rows back through DuckDB."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
from PIL import Image

from eagle.config import JobConfig, load_config
from eagle.io import storage
from eagle.pipeline import ray_setup
from eagle.pipeline.fitting import fit_products
from eagle.testing.synth import generate, image_rng, render_normal

PRODUCTS = ("grid", "nut")


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _odd_files(normal: np.ndarray) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(files that must become error rows with a reason, odd but valid files that must be audited)."""
    good_png = png(Image.fromarray(normal))
    rotated = Image.fromarray(normal[:, : normal.shape[1] // 2])  # a 2:1 tall image stored wide, EXIF-rotated
    exif = rotated.getexif()
    exif[0x0112] = 6
    bad = {
        "zero.png": b"",
        "text.png": b"not an image at all\n",
        "truncated.png": good_png[: len(good_png) // 3],
        "bomb.png": png(Image.new("L", (9000, 9000))),
    }
    odd = {
        "sixteen.png": png(Image.fromarray(normal[..., 0].astype(np.uint16) * 257)),
        "cmyk.jpg": png(Image.fromarray(normal).convert("CMYK"), "JPEG", quality=95),
        "palette.png": png(Image.fromarray(normal).convert("P", palette=Image.Palette.ADAPTIVE)),
        "alpha.png": png(Image.fromarray(normal).convert("RGBA")),
        "gray.png": png(Image.fromarray(normal).convert("L")),
        "exif.jpg": png(rotated, "JPEG", exif=exif, quality=95),
    }
    return bad, odd


def make_audit_setup(s3_server: str, tiny_model: str) -> dict:
    import boto3

    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}"
    data = f"{root}/data"
    generate(data, products=PRODUCTS, n_train=8, n_test_good=2, n_test_defect=1, size=96, seed=3)
    normal = render_normal("nut", image_rng(9, "nut", "extra", 0), 96)
    bad, odd = _odd_files(normal)
    for name, payload in {**bad, **odd}.items():
        storage.write_bytes(f"{data}/nut/test/good/zz_{name}", payload)
    storage.write_bytes(f"{data}/widget/test/good/000.png", png(Image.fromarray(normal)))  # no fitted model
    overrides = {
        "inputs": {"uris": [data], "exclude": ["*/ground_truth/*", "*/train/*"],
                   "max_image_pixels": 50_000_000},
        "model_store": f"{root}/models",
        "output": {"uri": f"{root}/audit", "max_error_rate": 0.9},
        "expert": {"backbone": "resnet18", "weights": "random", "resize": 128, "crop": 112},
        "mllm": {"model": tiny_model, "dtype": "float32", "max_new_tokens": 8,
                 "min_pixels": 56 * 56, "max_pixels": 112 * 112},
        "routing": {"policy": "all"},
        "resources": {"expert": {"batch_size": 4}, "mllm": {"batch_size": 4}, "decode": {"batch_size": 8}},
    }
    cfg = load_config(overrides=overrides)
    fitted = fit_products(data, PRODUCTS, cfg)
    assert all(not isinstance(v, Exception) for v in fitted.values()), fitted
    return {"root": root, "data": data, "overrides": overrides, "bad": bad, "odd": odd, "cfg": cfg,
            "catalogs": tempfile.mkdtemp(prefix="eagle-catalogs-")}


def job_config(setup: dict, **extra) -> JobConfig:
    return load_config(overrides={**setup["overrides"], **extra})


def output_section(setup: dict, fmt: str, name: str = "audit", **extra) -> dict:
    """The shared test config's output section for `fmt` at ``{root}/{name}``; iceberg's SQL catalog in a local
    SQLite file of its own (a SQLite file cannot live on S3)."""
    out = {**setup["overrides"]["output"], "uri": f"{setup['root']}/{name}", **extra}
    if fmt == "iceberg":
        out.update(format="iceberg", catalog={"type": "sql", "uri": f"sqlite:///{setup['catalogs']}/{name}.db"})
    return out


def output_rows(cfg: JobConfig, where: str = "true") -> list[dict]:
    """Result rows of either output format, through DuckDB (Iceberg: the audits table scanned to Arrow)."""
    con = duckdb.connect()
    if cfg.output.format == "iceberg":
        from eagle.io import iceberg
        from eagle.io.schema import OUTPUT_SCHEMA

        table = iceberg.table(cfg.output, iceberg.AUDITS, cfg.storage)
        audits = table.scan().to_arrow() if table else OUTPUT_SCHEMA.empty_table()  # noqa: F841 - used by name
        rel = con.sql(f"SELECT * FROM audits WHERE {where}")
    else:
        fs, _ = storage.filesystem(cfg.output.uri, cfg.storage)
        fs.invalidate_cache()
        con.register_filesystem(fs)
        rel = con.sql(f"SELECT * FROM read_parquet('{cfg.output.uri}/**/*.parquet', hive_partitioning = true) "
                      f"WHERE {where}")
    return [dict(zip(rel.columns, r)) for r in rel.fetchall()]




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_head(env: dict[str, str], dashboard: bool = False) -> Iterator[tuple[int, int | None]]:
    """A Ray head started as users start one (``ray start --head``), with `env`; yields (GCS port, dashboard
    port). Kept in the foreground with --block so that stopping it stops only this head, not every Ray on the
    machine as ``ray stop`` would; its address file is removed afterwards."""
    ray = str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port() if dashboard else None
    # where `ray start` records the address: under $RAY_TMPDIR when the caller keeps its Rays apart that way
    address_file = Path(env.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    ui = [f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1"] if dashboard else ["--include-dashboard=false"]
    # every port of its own: another Ray on this machine (a session's ray.init) holds the defaults, and a job
    # agent that cannot bind 52365 leaves `ray job submit` answering "No available agent" for good
    ports = [f"--{name}-port={free_port()}" for name in ("ray-client-server", "dashboard-agent-listen",
                                                          "dashboard-agent-grpc", "runtime-env-agent",
                                                          "metrics-export")]
    proc = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", *ui, *ports,
                             "--disable-usage-stats"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (address_file.exists() and address_file.read_text().strip().endswith(f":{port}")):
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield port, dash
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # --block: `ray start` stops its own node's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if address_file.exists() and address_file.read_text().strip().endswith(f":{port}"):
            address_file.unlink()


class Driver:
    """`jobs/inspect.py` in its own session (process group) and its own RAY_TMPDIR."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
               "RAY_TMPDIR": self.tmp, **(env or {})}
        env.pop("RAY_ADDRESS", None)
        self.stderr_path = cwd / f"stderr-{os.path.basename(self.tmp)}.log"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                         stderr=err, text=True, start_new_session=True)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float = 600) -> int:
        self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Live processes of this driver's Ray (their command lines name its temp folder, or their parent's
        does): pid and command line."""
        out = []
        for pid in ray_setup.session_processes(self.tmp):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append(f"{pid} {cmdline}")
            except OSError:  # gone meanwhile
                pass
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        ray_setup.reap_session(self.tmp)  # only this test's own Ray processes
        shutil.rmtree(self.tmp, ignore_errors=True)
