"""End-to-end inspect job (Ray Data) vs its slowest stage alone, vs a one-image-at-a-time loop; 1 vs 2 experts.

One run on a synthetic MVTec-style set (eagle.testing.synth), experts fitted with resnet18 RANDOM weights, the tiny
random Qwen2.5-VL (eagle.testing.tiny_mllm): the numbers are about the machinery (scheduling, batching, overlap), not
about what real models cost. Prints three tables:

1. each stage's UDF run alone, in this process, on pre-built batches of the same images (DecodeStage on the
   listing; ExpertStage on decoded batches; FinishStage with the MLLM on expert-scored batches), after a warm-up batch, vs the
   whole Ray job (`run_inspect`: listing, actor start-up and model loads, write, read-back summary included);
2. the Ray job vs a plain loop in the style of the reference EAGLE code: open, decode, Expert.score one image,
   classify, find_regions, prompt + generate one request at a time (models loaded before the clock starts);
3. the job with the MLLM off (expert-bound) with 1 vs 2 expert actors.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 python bench/bench_pipeline.py
    python bench/bench_pipeline.py --good 16 --defect 8 --route not-confident-normal --skip-actors

Other benches import `prepare`/`job_config` from here (same synthetic set and fitted experts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eagle.config import JobConfig, load_config  # noqa: E402

PRODUCTS = ("grid", "marble", "nut")


def job_config(root: str, run_id: str, route: str = "all", mllm: bool = True, expert_actors: int = 1,
               expert_batch: int = 8, mllm_batch: int = 4, new_tokens: int = 12, decode_batch: int = 16,
               size: int | None = None, extra: dict[str, Any] | None = None) -> JobConfig:
    """demo_config's CPU settings, with the knobs the benches turn. Output goes to {root}/audit-{run_id}."""
    from eagle.config import deep_merge

    expert: dict[str, Any] = {"backbone": "resnet18", "weights": "random", "dtype": "float32"}
    if size:  # small images: resize and crop to their size (fast, for volume benches)
        expert.update(resize=size, crop=size)
    overrides: dict[str, Any] = {
        "run_id": run_id,
        "inputs": {"uris": [os.path.join(root, "data")], "exclude": ["*/ground_truth/*", "*/train/*"]},
        "model_store": os.path.join(root, "models"),
        "output": {"uri": os.path.join(root, f"audit-{run_id}")},
        "expert": expert,
        "mllm": ({"model": os.path.join(root, "tiny-mllm"), "dtype": "float32", "max_new_tokens": new_tokens,
                  "min_pixels": 56 * 56, "max_pixels": 112 * 112} if mllm else {"model": None}),
        "routing": {"policy": route},
        "resources": {"decode": {"batch_size": decode_batch},
                      "expert": {"batch_size": expert_batch, "min_actors": expert_actors,
                                 "max_actors": expert_actors},
                      "mllm": {"batch_size": mllm_batch}},
        "ray": {"num_cpus": 8},
    }
    return load_config(overrides=deep_merge(overrides, extra or {}), env={})


def replicate(data: str, copies: int) -> None:
    """Make `copies` files of every test image (hard links `NNN_cK.png` beside it): volume without rendering."""
    for folder, _, files in os.walk(data):
        if f"{os.sep}test{os.sep}" not in folder + os.sep:
            continue
        for name in files:
            if name.endswith(".png") and "_c" not in name:
                for k in range(1, copies):
                    target = os.path.join(folder, f"{name[:-4]}_c{k}.png")
                    if not os.path.exists(target):
                        os.link(os.path.join(folder, name), target)


def prepare(root: str, train: int, good: int, defect: int, size: int, mllm: bool = True,
            products: tuple[str, ...] = PRODUCTS, fit_size: int | None = None,
            copies: int = 1) -> tuple[JobConfig, dict[str, str]]:
    """Synthetic data, tiny MLLM, local Ray, fitted experts; returns (a base config, pinned versions)."""
    from eagle.pipeline.fitting import fit_products
    from eagle.pipeline.planning import pin_expert_versions
    from eagle.pipeline.ray_setup import init_ray
    from eagle.testing.synth import generate
    from eagle.testing.tiny_mllm import build_tiny_mllm

    data = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, "labels.csv")):
        generate(data, products=products, n_train=train, n_test_good=good, n_test_defect=defect, size=size, seed=0)
    if mllm and not os.path.exists(os.path.join(root, "tiny-mllm", "config.json")):
        build_tiny_mllm("qwen2_5_vl", os.path.join(root, "tiny-mllm"))
    cfg = job_config(root, "prepare", mllm=mllm, size=fit_size)
    init_ray(cfg)
    for fitted in fit_products(data, products, cfg).values():
        if isinstance(fitted, Exception):
            raise fitted
    replicate(data, copies)  # after the fit: the layout's parser would find copies without masks
    return cfg, pin_expert_versions(cfg, list(products))


# ---------------------------------------------------------------------------------------------- stages alone
def _numpy(table) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _rechunk(batches: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Split each batch into batches of at most `size` rows (Ray re-batches a block the same way)."""
    out = []
    for b in batches:
        n = len(next(iter(b.values())))
        out += [{k: v[i:i + size] for k, v in b.items()} for i in range(0, n, size)]
    return out


def _timed(fn, batches: list[dict[str, np.ndarray]]) -> tuple[float, list[dict[str, np.ndarray]]]:
    fn(batches[0])  # warm-up: first-use model loads, allocator, lazy imports
    start = time.perf_counter()
    out = [fn(b) for b in batches]
    return time.perf_counter() - start, out


def stages_alone(cfg: JobConfig, versions: dict[str, str]) -> tuple[int, list[tuple[str, float]]]:
    """(images, [(stage, seconds)]) for each stage UDF in this process, single-threaded torch."""
    from eagle.expert.ensemble import pinned_metas
    from eagle.io.inputs import list_inputs
    from eagle.pipeline.stages.decode_stage import DecodeStage, model_input_sizes
    from eagle.pipeline.stages.expert_stage import ExpertStage

    listing = list_inputs(cfg.inputs, cfg.storage)
    batches = _rechunk([_numpy(listing)], cfg.resources.decode.batch_size)
    rows: list[tuple[str, float]] = []
    sizes = model_input_sizes(pinned_metas(cfg.model_store, versions, cfg.storage))
    sec, decoded = _timed(DecodeStage(cfg, sizes), batches)
    rows.append(("DecodeStage (task)", sec))
    expert = ExpertStage(cfg, versions)
    for product in versions:  # load every product's expert before the clock starts
        expert._expert(product)
    sec, scored = _timed(expert, _rechunk(decoded, cfg.resources.expert.batch_size))
    rows.append(("ExpertStage (actor)", sec))
    if cfg.mllm.model:
        from eagle.pipeline.mllm_pool import InProcessPool
        from eagle.pipeline.stages.finish_stage import FinishStage
        from eagle.pipeline.stages.mllm_stage import MLLMStage

        finish = FinishStage(cfg, pool=InProcessPool(MLLMStage(cfg)))
        sec, _ = _timed(finish, _rechunk(scored, cfg.resources.finish.batch_size))
        rows.append((f"FinishStage + MLLMStage (route {cfg.routing.policy})", sec))
    return listing.num_rows, rows


# ---------------------------------------------------------------------------------------------- reference loop
def reference_loop(cfg: JobConfig, versions: dict[str, str]) -> tuple[int, float, float, int]:
    """(images, load seconds, loop seconds, MLLM calls): one image at a time, no Ray, no batching."""
    from eagle.expert.artifact import load_artifact
    from eagle.expert.fitted import Expert
    from eagle.expert.regions import find_regions
    from eagle.expert.threshold import classify
    from eagle.io.images import decode_image
    from eagle.io.inputs import list_inputs
    from eagle.mllm.runner import MLLMRequest, MLLMRunner
    from eagle.pipeline.routing import needs_mllm

    listing = list_inputs(cfg.inputs, cfg.storage).to_pylist()
    start = time.perf_counter()
    experts = {}
    for product, version in versions.items():
        art = load_artifact(cfg.model_store, product, version, storage=cfg.storage)
        experts[product] = (art, Expert.from_artifact(art, device="cpu", dtype=cfg.expert.dtype))
    runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device="cpu") if cfg.mllm.model else None
    load_s = time.perf_counter() - start
    calls = 0
    start = time.perf_counter()
    for item in listing:
        path = item["image_uri"].removeprefix("file://")
        with open(path, "rb") as fh:
            image = decode_image(fh.read(), cfg.inputs.max_image_pixels)
        art, expert = experts[item["product"]]
        result = expert.score([image])[0]
        verdict, confidence = classify(result.score, art.threshold, art.score_max, cfg.confidence)
        regions = find_regions(result.anomaly_map, cfg.regions)
        if runner is not None and needs_mllm(confidence, cfg.routing.policy):
            boxes = regions.boxes if verdict == "anomalous" else []
            runner.run([MLLMRequest(image, item["product"], verdict, confidence, boxes)])
            calls += 1
    return len(listing), load_s, time.perf_counter() - start, calls


def ray_job(cfg: JobConfig) -> tuple[Any, dict[str, float]]:
    """(Summary, in-job figures): steady = images/s between the first and the last written batch (start-up
    excluded); expert/mllm = images/s from the per-image busy times the stages record (expert_ms, mllm_ms)."""
    from eagle.io.runs import read_rows
    from eagle.pipeline.inspection import run_inspect

    shutil.rmtree(cfg.output.uri, ignore_errors=True)  # a rerun with --root must not resume the old run
    summary = run_inspect(cfg)
    rows = read_rows(cfg.output.uri, ["audited_at", "expert_ms", "mllm_ms"], cfg.storage).to_pylist()
    stamps = sorted({r["audited_at"] for r in rows})
    first_batch = sum(1 for r in rows if r["audited_at"] == stamps[0])
    span = (stamps[-1] - stamps[0]).total_seconds() if len(stamps) > 1 else float("nan")
    inside = {"steady": (len(rows) - first_batch) / span if span else float("nan")}
    for col in ("expert_ms", "mllm_ms"):
        ms = [r[col] for r in rows if r[col] is not None]
        inside[col.split("_")[0]] = 1000.0 * len(ms) / sum(ms) if ms else float("nan")
    return summary, inside


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=12, help="normal training images per product")
    p.add_argument("--good", type=int, default=8, help="normal test images per product")
    p.add_argument("--defect", type=int, default=4, help="test images per product and defect kind")
    p.add_argument("--size", type=int, default=192, help="synthetic image side")
    p.add_argument("--copies", type=int, default=3, help="files per test image (hard links): more volume")
    p.add_argument("--route", default="all", choices=["all", "not-confident-normal", "uncertain"])
    p.add_argument("--expert-batch", type=int, default=8)
    p.add_argument("--mllm-batch", type=int, default=4)
    p.add_argument("--finish-batch", type=int, default=None, help="rows per finish batch (resources.finish)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--skip-actors", action="store_true")
    p.add_argument("--decode-cpus", type=float, default=None,
                   help="CPUs per decode task; one that differs from the expert's keeps decode a stage of its own "
                        "(as on a GPU cluster) instead of fused into the expert actors, so its output crosses "
                        "the object store")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or tmp.name

    t0 = time.perf_counter()
    base, versions = prepare(root, args.train, args.good, args.defect, args.size, copies=args.copies)
    prep_s = time.perf_counter() - t0
    knobs = dict(route=args.route, expert_batch=args.expert_batch, mllm_batch=args.mllm_batch,
                 new_tokens=args.new_tokens)
    resources: dict[str, Any] = {}
    if args.decode_cpus:
        resources["decode"] = {"num_cpus": args.decode_cpus}
    if args.finish_batch:
        resources["finish"] = {"batch_size": args.finish_batch}
    cfg = job_config(root, "e2e", extra={"resources": resources}, **knobs)
    summary, inside = ray_job(cfg)
    n, stage_rows = stages_alone(cfg, versions)
    loop = None if args.skip_loop else reference_loop(cfg, versions)
    actors = []
    if not args.skip_actors:
        for k in (1, 2):
            actors.append((k, *ray_job(job_config(root, f"experts{k}", mllm=False, expert_actors=k, **knobs))))

    e2e = summary.audited / summary.seconds
    print(f"\n{n} test images {args.size}x{args.size} ({args.copies} files per synthetic image; {', '.join(PRODUCTS)}), "
          f"expert resnet18 random weights (resize 256, crop 224), tiny random Qwen2.5-VL ({args.new_tokens} new "
          f"tokens, 56^2-112^2 px), route {args.route}, batches decode 16 / expert {args.expert_batch} / finish "
          f"{cfg.resources.finish.batch_size} / mllm {args.mllm_batch}; local Ray num_cpus=8 on {os.cpu_count()} cores, torch 1 thread per process; "
          f"setup (synth + fit + tiny MLLM) {prep_s:.0f} s")
    print(f"MLLM calls in the job: {summary.mllm_calls}/{summary.audited}; status {summary.status}")
    print("object-store KB per image entering each stage (Ray Data's operator metrics): "
          + ", ".join(f"{stage} {kb:.1f}" for stage, kb in summary.stage_input_kb.items()))
    print("rows entering each stage (mllm: the routed rows the MLLM actors were sent): "
          + ", ".join(f"{stage} {rows}" for stage, rows in summary.stage_input_rows.items()))
    print(f"\n{'stage':44s} {'alone s':>8s} {'alone img/s':>11s} {'in job, busy img/s':>19s}")
    busy = {"DecodeStage": float("nan"), "ExpertStage": inside["expert"], "FinishStage + MLLMStage": inside["mllm"]}
    for name, sec in stage_rows:
        print(f"{name:44s} {sec:8.2f} {n / sec:11.2f} {busy[name.split(' (')[0]]:19.2f}")
    slow_name, slow_s = max(stage_rows, key=lambda r: r[1])
    slowest = n / slow_s
    print(f"{'Ray job end to end (run_inspect, all in)':44s} {summary.seconds:8.2f} {e2e:11.2f}")
    print(f"{'Ray job steady state (first->last batch out)':44s} {'':8s} {inside['steady']:11.2f}")
    print(f"slowest stage alone: {slow_name.split(' (')[0]} {slowest:.2f} images/s; end to end / slowest = "
          f"{e2e / slowest:.2f}x, steady state / slowest = {inside['steady'] / slowest:.2f}x (target >= 0.8x)")
    if loop:
        images, load_s, loop_s, calls = loop
        print(f"\n{'one image at a time vs Ray job':44s} {'seconds':>8s} {'images/s':>9s} {'MLLM calls':>10s}")
        print(f"{'reference-style loop (models preloaded)':44s} {loop_s:8.2f} {images / loop_s:9.2f} {calls:10d}")
        print(f"{'reference-style loop incl. model loads':44s} {loop_s + load_s:8.2f} "
              f"{images / (loop_s + load_s):9.2f} {calls:10d}")
        print(f"{'Ray job end to end':44s} {summary.seconds:8.2f} {e2e:9.2f} {summary.mllm_calls:10d}")
        print(f"Ray job / loop: end to end {e2e / (images / (loop_s + load_s)):.2f}x (vs loop incl. loads), "
              f"steady state {inside['steady'] / (images / loop_s):.2f}x (vs loop without loads)")
    if actors:
        print(f"\n{'Ray job, mllm none':40s} {'seconds':>8s} {'img/s':>7s} {'steady img/s':>12s} "
              f"{'expert busy img/s/actor':>23s} {'vs 1 actor':>10s}")
        one = actors[0][1].images_per_second
        for k, s, ins in actors:
            print(f"{f'{k} expert actor(s), 0.5 CPU, 1 thread each':40s} {s.seconds:8.2f} {s.images_per_second:7.2f} "
                  f"{ins['steady']:12.2f} {ins['expert']:23.2f} {s.images_per_second / one:9.2f}x")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
