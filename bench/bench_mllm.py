"""MLLM stage on a tiny random Qwen2.5-VL: batched vs one-by-one throughput, and the cost of guidance.

One run, single-threaded CPU, every generation forced to the same length (min_new_tokens = max_new_tokens)
so the variants do the same work. Prints a table; ratios are what carries over, not absolute numbers (a tiny
model is dominated by per-call overheads that a 7B model on a GPU is not).

    OMP_NUM_THREADS=1 python bench/bench_mllm.py [--images 16] [--new-tokens 16] [--family qwen2_5_vl]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from eagle.config import load_config
from eagle.mllm import MLLMRequest, MLLMRunner
from eagle.tiny_mllm import FAMILIES, build_tiny_mllm
from eagle.types import Box


def requests(n: int) -> list[MLLMRequest]:
    """Half uncertain-anomalous with a box (two images, guided), half confident-normal (one image)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (112 + 28 * (i % 3), 140, 3), dtype=np.uint8)
        if i % 2 == 0:
            out.append(MLLMRequest(image, "bolt", "anomalous", "uncertain", [Box(10, 10, 60, 60, 1.0)]))
        else:
            out.append(MLLMRequest(image, "bolt", "normal", "confident_normal"))
    return out


def runner(path: str, new_tokens: int, *overrides: str) -> MLLMRunner:
    cfg = load_config(overrides=[
        f"mllm.model={path}", "mllm.dtype=float32", "mllm.min_pixels=3136", "mllm.max_pixels=50176",
        f"mllm.max_new_tokens={new_tokens}", *overrides,
    ])
    r = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance)
    r.model.generation_config.min_new_tokens = new_tokens  # equal work in every variant
    return r


def timed(r: MLLMRunner, reqs: list[MLLMRequest], batch: int) -> float:
    """Seconds to audit `reqs` in chunks of `batch` (best of two, after one warm-up chunk)."""
    r.run(reqs[:batch])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(reqs), batch):
            r.run(reqs[i:i + batch])
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    reqs = requests(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_mllm(args.family, tmp)
        variants = {
            "stock sdpa, no guidance": runner(path, args.new_tokens, "guidance.enabled=false",
                                              "guidance.record_attention=false"),
            "guided (uncertain half)": runner(path, args.new_tokens, "guidance.record_attention=false"),
            "guided + record attention": runner(path, args.new_tokens),
            "guided all rows + record": runner(path, args.new_tokens, "guidance.rows=all"),
        }
        rows = []
        base = variants["stock sdpa, no guidance"]
        one = timed(base, reqs, 1)
        rows.append(("stock sdpa, no guidance", 1, one))
        for batch in (4, 8):
            rows.append(("stock sdpa, no guidance", batch, timed(base, reqs, batch)))
        batched = rows[-1][2]
        for name, r in list(variants.items())[1:]:
            rows.append((name, 8, timed(r, reqs, 8)))

    print(f"\n{args.family} tiny model, {args.images} images, {args.new_tokens} new tokens each, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'variant':28s} {'batch':>5s} {'seconds':>8s} {'images/s':>9s} {'vs one-by-one':>14s} {'vs stock b8':>12s}")
    for name, batch, sec in rows:
        print(f"{name:28s} {batch:5d} {sec:8.3f} {args.images / sec:9.1f} {one / sec:13.2f}x {sec / batched:11.2f}x")


if __name__ == "__main__":
    main()
