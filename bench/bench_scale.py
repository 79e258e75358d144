"""Driver cost of planning at archive scale: peak RSS and wall time of `jobs/inspect.py --dry-run` (full and
incremental) over a synthetic archive of N images in 40 products with R rows of history in the output.

    python bench/bench_scale.py --images 100000 --history 300000
    python bench/bench_scale.py --images 1000000 --history 3000000 --history 6000000
    python bench/bench_scale.py --images 100000 --format iceberg

The archive is a Parquet manifest (uri, product, image_version as an ETag); the history is R/N earlier runs
over every image, in the real output layout (product=/audit_date= partitions, files of up to 100k rows,
run manifests; with `--format iceberg`, one append per run to the `audits` table on a local SQLite catalog).
Nothing reads pixels: planning never does. The first planning over an output without a
ledger builds it from the whole history (a one-off migration, reported on its own line); the figures that
matter are the steady state after it. Each measurement is a fresh process (ru_maxrss of that child).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eagle.io.schema import OUTPUT_SCHEMA  # noqa: I001

PRODUCTS = [f"product{i:02d}" for i in range(40)]
ROWS_PER_FILE = 100_000


def build_archive(root: Path, n: int) -> Path:
    """A manifest of n images over 40 products, and a model store with one expert version per product."""
    ids = np.arange(n)
    products = np.array(PRODUCTS)[ids % len(PRODUCTS)]
    uris = pa.array([f"s3://archive/{p}/2026/{i:09d}.png" for p, i in zip(products, ids)])
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris, "product": pa.array(products),
                             "image_version": pa.array([f"etag{i:x}" for i in ids])}), manifest)
    for p in PRODUCTS:
        (root / "models" / p).mkdir(parents=True, exist_ok=True)
        (root / "models" / p / "LATEST").write_text("v1\n")
    return manifest


def build_history(root: Path, manifest: Path, rows: int, config_hash: str, fmt: str) -> Path:
    """rows/N earlier runs over every image, written as the inspect job writes them."""
    out = root / "audit"
    table = pq.read_table(manifest)
    n = table.num_rows
    runs = max(1, rows // n)
    names = [f.name for f in OUTPUT_SCHEMA]
    audits = None
    if fmt == "iceberg":
        from eagle.config import load_config
        from eagle.io import iceberg

        output = load_config(overrides={"output": {"uri": str(out), "format": fmt}}, env={}).output
        audits = iceberg.table(output, iceberg.AUDITS, create=True)
    for k in range(runs):
        run_id = f"hist{k:02d}"
        date = f"2026-{k % 12 + 1:02d}-01"
        (out / "_runs").mkdir(parents=True, exist_ok=True)
        (out / "_runs" / f"{run_id}.json").write_text(json.dumps(
            {"run_id": run_id, "started_at": f"{date}T00:00:00+00:00", "audit_date": date,
             "config_hash": config_hash, "attempts": [f"{date}T00:00:00+00:00"]}))
        parts = []
        for p in PRODUCTS:
            part = table.filter(pa.compute.equal(table.column("product"), p))
            cols = {"run_id": pa.array([run_id] * part.num_rows), "image_uri": part.column("uri"),
                    "image_version": part.column("image_version"), "status": pa.array(["ok"] * part.num_rows),
                    "expert_model_version": pa.array(["v1"] * part.num_rows),
                    "config_hash": pa.array([config_hash] * part.num_rows),
                    "audited_at": pa.array(np.full(part.num_rows, np.datetime64(f"{date}T00:00:00", "us")))
                    .cast(pa.timestamp("us", tz="UTC")),
                    "verdict": pa.array(["normal"] * part.num_rows)}
            if audits is not None:
                cols.update(product=part.column("product"), audit_date=pa.array([date] * part.num_rows))
                parts.append(pa.table({name: cols.get(name, pa.nulls(part.num_rows, OUTPUT_SCHEMA.field(name).type))
                                       for name in names}, schema=OUTPUT_SCHEMA))
                continue
            full = pa.table({name: cols.get(name, pa.nulls(part.num_rows, OUTPUT_SCHEMA.field(name).type))
                             for name in names if name not in ("product", "audit_date")})
            folder = out / f"product={p}" / f"audit_date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(0, full.num_rows, ROWS_PER_FILE):
                pq.write_table(full.slice(i, ROWS_PER_FILE), folder / f"{run_id}_a001_bench_{i // ROWS_PER_FILE:06d}-0.parquet")
        if audits is not None:
            audits.append(pa.concat_tables(parts), snapshot_properties={"eagle.run_id": run_id})
    return out


PLAN = """
import sys, time, resource
sys.path.insert(0, {root!r})
from eagle.config import load_config
from eagle.pipeline.inspection import run_inspect
cfg = load_config(overrides={{"inputs": {{"manifest": {manifest!r}}}, "model_store": {models!r},
                             "output": {{"uri": {out!r}, "format": {fmt!r}}}, "mllm": {{"model": "none"}}, "mode": {mode!r}}}, env={{}})
start = time.perf_counter()
plan = run_inspect(cfg, dry_run=True)
print(time.perf_counter() - start, plan.listed, plan.done, plan.todo)
"""


def measure(root: Path, manifest: Path, out: Path, mode: str, fmt: str) -> dict:
    code = PLAN.format(root=str(ROOT), manifest=str(manifest), models=str(root / "models"), out=str(out), mode=mode,
                       fmt=fmt)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # iceberg's first plan folds history into `latest` on Ray: a Ray of its own
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if status:
        raise SystemExit(f"planning failed:\n{stderr[-3000:]}")
    seconds, listed, done, todo = stdout.split()[-4:]
    return {"mode": mode, "wall_s": wall, "plan_s": float(seconds), "rss_mb": usage.ru_maxrss / 1024,
            "listed": int(listed), "done": int(done), "todo": int(todo)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--history", type=int, action="append", help="history rows (repeatable); default 3x images")
    ap.add_argument("--format", choices=("parquet", "iceberg"), default="parquet", help="output format")
    ap.add_argument("--root", help="work folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args()
    from eagle.config import config_hash, load_config

    chash = config_hash(load_config(overrides={"mllm": {"model": "none"}}, env={}))
    tmp = Path(args.root or tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        manifest = build_archive(tmp, args.images)
        print(f"N = {args.images:,} images in {len(PRODUCTS)} products (manifest {manifest.stat().st_size / 1e6:.0f} MB)")
        print(f"{'history rows':>12} {'files':>6} {'step':<24} {'wall s':>7} {'plan s':>7} {'peak RSS MB':>11} "
              f"{'listed':>9} {'done':>9} {'to audit':>9}")
        for rows in args.history or [3 * args.images]:
            out = build_history(tmp, manifest, rows, chash, args.format)
            files = sum(1 for _ in out.rglob("*.parquet"))
            for step, mode in (("first plan (builds ledger)", "full"), ("full", "full"),
                               ("incremental", "incremental")):
                m = measure(tmp, manifest, out, mode, args.format)
                print(f"{rows:>12,} {files:>6} {step:<24} {m['wall_s']:>7.1f} {m['plan_s']:>7.1f} {m['rss_mb']:>11.0f} "
                      f"{m['listed']:>9,} {m['done']:>9,} {m['todo']:>9,}", flush=True)
            shutil.rmtree(out)
    finally:
        if not args.root:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
