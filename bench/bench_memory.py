"""Peak memory of the inspect job's driver and of each Ray worker/actor process, for two input volumes.

Tiny synthetic images (64x64, expert resize 64 / crop 64, resnet18 random weights), MLLM off (the expert's
verdict is final). Test images are cheap pixel variants of a few rendered ones (every file distinct). Each
volume runs in a fresh Python process with a fresh local Ray, so peaks do not carry over. A sampling thread
in that driver reads /proc every 0.2 s for every process below it (Ray's GCS, raylet, workers, actors):
peak RSS is the kernel's high-water mark (VmHWM, exact even between samples), peak anon is the largest
anonymous resident memory seen by a sample (RSS without shared pages such as Ray's object store mapping and
shared libraries). Workers are grouped by the Ray process titles they showed (ray::MapWorker(...ExpertStage)
etc.). Target: every peak flat within 15% between the volumes.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 python bench/bench_memory.py
    python bench/bench_memory.py --sizes 1000,10000 --batch 64    # ~20 min on the shared 2-core machine
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SIZE = 64
PRODUCTS = ("grid", "marble", "nut")


# ---------------------------------------------------------------------------------------------- /proc
def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().split(b"\0")[0].decode(errors="replace")


def _descendants(root: int) -> list[int]:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


class Sampler(threading.Thread):
    """Per descendant pid: titles seen, peak VmHWM, peak RssAnon."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.procs: dict[int, dict] = {}

    def sample(self) -> None:
        for pid in _descendants(os.getpid()):
            try:
                st, title = _status(pid), _title(pid)
            except (OSError, ValueError):
                continue
            p = self.procs.setdefault(pid, {"titles": set(), "hwm": 0, "anon": 0})
            p["titles"].add(title)
            p["hwm"] = max(p["hwm"], st.get("VmHWM", 0))
            p["anon"] = max(p["anon"], st.get("RssAnon", 0))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.interval)


def _group(titles: set[str]) -> str:
    text = " ".join(titles)
    for key, name in (("ExpertStage", "expert actor"), ("MLLMStage", "mllm actor"), ("raylet", "raylet"),
                      ("gcs_server", "gcs_server")):
        if key in text:
            return name
    if "MapBatches" in text or "Write" in text:
        return "task workers (decode/finish/stamp/write)"
    if "ray::" in text:
        return "idle workers"
    return "other ray processes"


# ---------------------------------------------------------------------------------------------- data
def variants(root: str, n: int) -> str:
    """`n` distinct test PNGs (a pixel stamped with the index) of the rendered test images, spread over products."""
    import numpy as np
    from PIL import Image

    out = os.path.join(root, f"data-{n}")
    if os.path.exists(os.path.join(out, ".done")):
        return out
    bases = []
    for product in PRODUCTS:
        folder = os.path.join(root, "data", product, "test")
        for kind in sorted(os.listdir(folder)):
            for name in sorted(os.listdir(os.path.join(folder, kind))):
                bases.append((product, kind, np.array(Image.open(os.path.join(folder, kind, name)))))
    for i in range(n):
        product, kind, image = bases[i % len(bases)]
        image = image.copy()
        image[0, 0, ...] = i % 256
        image[0, 1, ...] = (i // 256) % 256
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
        path = os.path.join(out, product, "test", kind, f"{i:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())
    open(os.path.join(out, ".done"), "w").close()
    return out


def _cfg(root: str, run_id: str, data: str, batch: int):
    from bench_pipeline import job_config

    return job_config(root, run_id, mllm=False, size=SIZE, decode_batch=batch, expert_batch=batch,
                      extra={"inputs": {"uris": [data]}})


def child_prep(root: str) -> None:
    from bench_pipeline import prepare

    prepare(root, train=10, good=4, defect=2, size=SIZE, mllm=False, fit_size=SIZE)


def child_run(root: str, n: int, batch: int) -> dict:
    import ray

    from eagle.pipeline.inspection import run_inspect
    from eagle.pipeline.ray_setup import init_ray

    data = variants(root, n)
    cfg = _cfg(root, f"mem{n}", data, batch)
    shutil.rmtree(cfg.output.uri, ignore_errors=True)  # a rerun with --root must not resume the old run
    sampler = Sampler()
    sampler.start()
    init_ray(cfg)
    summary = run_inspect(cfg)
    sampler.sample()
    sampler.stop.set()
    sampler.join()
    groups: dict[str, dict] = {}
    for p in sampler.procs.values():
        g = groups.setdefault(_group(p["titles"]), {"n": 0, "hwm": 0, "anon": 0})
        g["n"] += 1
        g["hwm"] = max(g["hwm"], p["hwm"])
        g["anon"] = max(g["anon"], p["anon"])
    me = _status(os.getpid())
    groups["driver"] = {"n": 1, "hwm": me["VmHWM"], "anon": me["RssAnon"]}
    ray.shutdown()
    return {"n": n, "seconds": summary.seconds, "status": summary.status, "groups": groups}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,3000", help="comma-separated image counts")
    p.add_argument("--batch", type=int, default=64, help="decode and expert batch size")
    p.add_argument("--root", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.child == "prep":
        return child_prep(args.root)
    if args.child:
        print("RESULT " + json.dumps(child_run(args.root, int(args.child), args.batch)))
        return
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or tmp.name
    me = [sys.executable, os.path.abspath(__file__), "--root", root, "--batch", str(args.batch)]
    t0 = time.perf_counter()
    subprocess.run(me + ["--child", "prep"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prep_s = time.perf_counter() - t0
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        variants(root, n)
        gen_s = time.perf_counter() - t0
        out = subprocess.run(me + ["--child", str(n)], check=True, capture_output=True, text=True).stdout
        res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        res["gen_s"] = gen_s
        results.append(res)
    a, b = results[0], results[-1]
    mib = 2**20
    print(f"\n{SIZE}x{SIZE} images, expert resnet18 random weights (resize/crop {SIZE}), MLLM none, batch "
          f"{args.batch}, local Ray num_cpus=8 on {os.cpu_count()} cores; setup (synth + fit) {prep_s:.0f} s")
    for r in results:
        print(f"{r['n']:6d} images: job {r['seconds']:.1f} s ({r['n'] / r['seconds']:.1f} images/s), status "
              f"{r['status']}, writing the variants took {r['gen_s']:.1f} s")
    print(f"\n{'process (peak over the group)':38s} {'procs':>9s} "
          f"{'peak RSS MiB':>17s} {'ratio':>6s} {'peak anon MiB':>17s} {'ratio':>6s}")
    print(f"{'':38s} {a['n']:>4d}/{b['n']:<4d} {a['n']:>8d} {b['n']:>8d} {'':6s} {a['n']:>8d} {b['n']:>8d}")
    names = ["driver"] + sorted((set(a["groups"]) | set(b["groups"])) - {"driver"})
    for name in names:
        ga, gb = a["groups"].get(name), b["groups"].get(name)
        if not ga or not gb:
            print(f"{name:38s} only in {'the first' if ga else 'the second'} run")
            continue
        print(f"{name:38s} {ga['n']:>4d}/{gb['n']:<4d} {ga['hwm'] / mib:8.0f} {gb['hwm'] / mib:8.0f} "
              f"{gb['hwm'] / ga['hwm']:6.2f} {ga['anon'] / mib:8.0f} {gb['anon'] / mib:8.0f} {gb['anon'] / ga['anon']:6.2f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
