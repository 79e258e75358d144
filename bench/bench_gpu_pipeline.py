"""The whole job on one GPU machine: fit and inspect through Ray, the expert and the MLLM pool on the GPU, decode
and finish on its CPUs, over synthetic images with ``not-confident-normal`` routing.

Measures end-to-end images/s (all in, and the steady state between the first and the last written batch), GPU
utilisation while the inspect job runs (``nvidia-smi dmon`` in the background: mean and busy share of SM %,
peak memory), rows entering each stage and object-store KB per image (the job's summary), the routed share and
the fit's wall time. Random weights everywhere: the figures are cost, not accuracy.

The MLLM is Qwen2.5-VL-7B-shaped with random weights (``--shape 7b``, as ``bench/bench_mllm.py`` builds it: the
tiny checkpoint's locally trained tokenizer and real Qwen2-VL image processor, the 7B's layer shapes), saved
once as a checkpoint the MLLM actors load (~16 GB in bfloat16); ``--shape tiny`` uses the tiny random model.

    python bench/bench_gpu_pipeline.py --device cuda --size 1024 --copies 16 --out OUT      # bench/gpu.sh
    python bench/bench_gpu_pipeline.py --cpu-smoke --out OUT                               # tiny, on a CPU
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
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pipeline  # noqa: E402  (sets the offline/Ray environment defaults before torch and Ray load)
import torch  # noqa: E402

from eagle.config import JobConfig, deep_merge, load_config  # noqa: E402

PRODUCTS = ("grid", "marble", "nut")


def mllm_checkpoint(root: str, shape: str, device: str) -> str:
    """The MLLM the actors load: the tiny random Qwen2.5-VL, or the 7B-shaped one saved beside it."""
    from eagle.testing.tiny_mllm import build_tiny_mllm

    tiny = os.path.join(root, "tiny-mllm")
    if not os.path.exists(os.path.join(tiny, "config.json")):
        build_tiny_mllm("qwen2_5_vl", tiny)
    if shape == "tiny":
        return tiny
    big = os.path.join(root, "mllm-7b")
    if os.path.exists(os.path.join(big, "config.json")):
        return big
    from bench_mllm import seven_b_model

    from eagle.mllm.runner import MLLMRunner

    cfg = load_config(overrides=[f"mllm.model={tiny}", "mllm.dtype=bfloat16"])
    runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device="cpu")
    model = seven_b_model(runner, "qwen2_5_vl", device, torch.bfloat16)
    model.save_pretrained(big)
    runner.processor.save_pretrained(big)
    del model, runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return big


def job_config(root: str, run_id: str, args: argparse.Namespace, mllm: str) -> JobConfig:
    gpu = args.device.startswith("cuda")
    expert: dict[str, Any] = {"backbone": args.backbone, "weights": "random", "dtype": "auto",
                              "patchcore": {"search": args.search}}
    if args.crop:
        expert.update(resize=args.crop, crop=args.crop)
    mllm_cfg: dict[str, Any] = {"model": mllm, "dtype": "bfloat16" if gpu else "float32",
                                "max_new_tokens": args.new_tokens, "stop": args.stop, "cache": args.cache,
                                "compile": args.compile}
    if args.shape == "tiny":
        mllm_cfg.update(min_pixels=56 * 56, max_pixels=112 * 112)
    cpus = os.cpu_count() or 2
    overrides: dict[str, Any] = {
        "run_id": run_id,
        "inputs": {"uris": [os.path.join(root, "data")], "exclude": ["*/ground_truth/*", "*/train/*"]},
        "model_store": os.path.join(root, "models"),
        "output": {"uri": os.path.join(root, f"audit-{run_id}")},
        "expert": expert,
        "mllm": mllm_cfg,
        "routing": {"policy": args.route},
        "resources": {
            "decode": {"batch_size": 16, "num_cpus": 1 if gpu else 0.25},
            "expert": {"batch_size": args.expert_batch, "num_gpus": 0.25 if gpu else 0, "num_cpus": 1 if gpu else 0.5,
                       "min_actors": 1, "max_actors": 1},
            "mllm": {"batch_size": args.mllm_batch, "num_gpus": 0.7 if gpu else 0, "num_cpus": 1 if gpu else 0.5,
                     "min_actors": 1, "max_actors": 1},
            "finish": {"batch_size": args.finish_batch, "num_cpus": 0.5 if gpu else 0.25},
        },
        "ray": {"num_cpus": max(8, cpus), "address": "local"},
    }
    return load_config(overrides=deep_merge(overrides, {}), env={})


class GpuMonitor:
    """``nvidia-smi dmon`` (SM %, memory %) once a second into a file, for the time the job runs."""

    def __init__(self, path: str) -> None:
        self.path, self.proc = path, None

    def __enter__(self) -> GpuMonitor:
        if shutil.which("nvidia-smi"):
            self.file = open(self.path, "w")  # noqa: SIM115 - closed in __exit__
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "um", "-d", "1"], stdout=self.file,
                                         stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.file.close()

    def summary(self) -> dict[str, float]:
        """Mean SM %, share of seconds with SM > 50 %, mean memory-bandwidth %, samples (empty without a GPU)."""
        if self.proc is None or not os.path.exists(self.path):
            return {}
        header, sm, mem = None, [], []
        with open(self.path) as fh:
            for line in fh:
                parts = line.split()
                if line.startswith("#") and "sm" in parts:
                    header = parts[1:]
                elif header and parts and not line.startswith("#"):
                    row = dict(zip(header, parts, strict=False))
                    if row.get("sm", "-").isdigit():
                        sm.append(int(row["sm"]))
                    if row.get("mem", "-").isdigit():
                        mem.append(int(row["mem"]))
        if not sm:
            return {}
        return {"sm_mean_pct": sum(sm) / len(sm), "sm_busy_share": sum(s > 50 for s in sm) / len(sm),
                "mem_bw_mean_pct": sum(mem) / len(mem) if mem else float("nan"), "samples": len(sm)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny everything on the CPU: proves the script runs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=["tiny", "7b"], default="7b")
    p.add_argument("--size", type=int, default=1024, help="synthetic image side")
    p.add_argument("--train", type=int, default=24, help="training images per product")
    p.add_argument("--good", type=int, default=24, help="normal test images per product")
    p.add_argument("--defect", type=int, default=8, help="test images per product and defect kind")
    p.add_argument("--copies", type=int, default=16, help="files per test image (hard links): the volume")
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--crop", type=int, default=None, help="expert resize = crop (default: the config's 256/224)")
    p.add_argument("--search", default="auto", help="expert.patchcore.search")
    p.add_argument("--route", default="not-confident-normal")
    p.add_argument("--expert-batch", type=int, default=64)
    p.add_argument("--mllm-batch", type=int, default=32)
    p.add_argument("--finish-batch", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--stop", default="sentence", help="mllm.stop")
    p.add_argument("--cache", default="dynamic", help="mllm.cache")
    p.add_argument("--compile", action="store_true", help="mllm.compile")
    p.add_argument("--root", default=None, help="work folder (default: a temporary one; the 7B checkpoint is ~16 GB)")
    p.add_argument("--out", default=".", help="where the JSON, the dmon log and the table go")
    args = p.parse_args()
    if args.cpu_smoke:
        args.device, args.shape, args.size, args.train, args.good, args.defect = "cpu", "tiny", 96, 4, 2, 1
        args.copies, args.backbone, args.crop, args.expert_batch, args.mllm_batch = 3, "resnet18", 64, 8, 4
        args.finish_batch, args.new_tokens = 16, 4
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or tmp.name

    from eagle.pipeline.fitting import fit_products
    from eagle.pipeline.ray_setup import init_ray
    from eagle.testing.synth import generate

    t0 = time.perf_counter()
    data = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, "labels.csv")):
        generate(data, products=PRODUCTS, n_train=args.train, n_test_good=args.good, n_test_defect=args.defect,
                 size=args.size, seed=0)
    synth_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint = mllm_checkpoint(root, args.shape, args.device)
    mllm_s = time.perf_counter() - t0
    cfg = job_config(root, "gpu", args, checkpoint)
    init_ray(cfg)
    t0 = time.perf_counter()
    for product, fitted in fit_products(data, PRODUCTS, cfg).items():
        if isinstance(fitted, Exception):
            raise RuntimeError(f"fit of {product} failed") from fitted
    fit_s = time.perf_counter() - t0
    bench_pipeline.replicate(data, args.copies)  # after the fit: the layout's parser would find copies without masks
    monitor = GpuMonitor(os.path.join(args.out, "nvidia_smi_dmon.txt"))
    with monitor:
        summary, inside = bench_pipeline.ray_job(cfg)
    gpu = monitor.summary()

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result = {
        "device": name, "images": summary.audited, "size": args.size, "products": len(PRODUCTS),
        "expert": f"{args.backbone} random, batch {args.expert_batch}, search {args.search}",
        "mllm": f"{args.shape} Qwen2.5-VL random, batch {args.mllm_batch}, {args.new_tokens} new tokens, stop "
                f"{args.stop}, cache {args.cache}, compile {args.compile}",
        "route": args.route, "mllm_calls": summary.mllm_calls, "routed_share": summary.mllm_calls / summary.audited,
        "status": summary.status, "seconds": summary.seconds, "images_per_s_all_in": summary.images_per_second,
        "images_per_s_steady": inside["steady"], "expert_busy_images_per_s": inside["expert"],
        "mllm_busy_images_per_s": inside["mllm"], "stage_input_rows": summary.stage_input_rows,
        "stage_input_kb": summary.stage_input_kb, "gpu": gpu, "setup_s": {"synth": synth_s, "mllm": mllm_s,
                                                                          "fit": fit_s},
    }
    with open(os.path.join(args.out, "pipeline.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    lines = [
        f"\nthe whole job on {name}: {summary.audited} images {args.size}x{args.size} ({args.copies} files per synthetic "
        f"image, {len(PRODUCTS)} products), route {args.route}; {result['expert']}; MLLM {result['mllm']}",
        f"setup: synthetic data {synth_s:.0f} s, MLLM checkpoint {mllm_s:.0f} s, fit through Ray {fit_s:.0f} s",
        f"{'end to end, all in (run_inspect)':40s} {summary.seconds:8.1f} s {summary.images_per_second:9.2f} images/s",
        f"{'steady state (first -> last batch out)':40s} {'':10s} {inside['steady']:9.2f} images/s",
        f"{'expert busy / MLLM busy (in the job)':40s} {'':10s} {inside['expert']:9.2f} / {inside['mllm']:.2f} images/s",
        f"MLLM calls {summary.mllm_calls}/{summary.audited} ({result['routed_share']:.1%} routed); status "
        f"{summary.status}",
        "rows entering: " + ", ".join(f"{k} {n}" for k, n in summary.stage_input_rows.items()),
        "object-store KB per image entering: " + ", ".join(f"{k} {kb:.1f}" for k, kb in summary.stage_input_kb.items()),
        ("GPU during the inspect job: " + ", ".join(f"{k} {v:.2f}" for k, v in gpu.items())) if gpu
        else "GPU utilisation: no nvidia-smi here",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "pipeline.txt"), "w") as fh:
        fh.write(text + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
