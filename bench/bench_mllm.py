"""MLLM stage: batched vs one-by-one throughput, and the cost of attention guidance and recording.

Every generation is forced to the same length (min_new_tokens = max_new_tokens) so that the variants do the
same work (a random model never ends a reply: ``mllm.stop``'s gain is the tokens it saves, i.e. compare
``--new-tokens`` 8 (an answer) with 32 or 64 (an explanation)); one run, best of two passes after a warm-up.
Prints a table: per batch size unguided, guided and guided + recording, then at the largest batch the options
(unsorted batches, static KV cache, static + torch.compile), with peak GPU memory and the share of prompt tokens
that are padding.

--family picks the tiny family (eagle.testing.tiny_mllm.FAMILIES, default qwen2_5_vl). --shape tiny (default):
the tiny random checkpoint, CPU-sized images; ratios only, as a tiny model is all per-call overhead.
--shape 7b: a random model with the family's 7-8B shapes (SEVEN_B: Qwen2.5-VL-7B, Qwen3-VL-8B, InternVL3-8B,
LLaVA-OneVision-7B) and its processor set to the same vision geometry, for a GPU:

    OMP_NUM_THREADS=1 python bench/bench_mllm.py [--family internvl]
    python bench/bench_mllm.py --family internvl --shape 7b --device cuda --dtype bfloat16 --images 8 --new-tokens 32
    python bench/bench_mllm.py --shape 7b --device cuda --dtype bfloat16 --images 128 --batches 8,16,32,64 --new-tokens 32
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from eagle.config import load_config
from eagle.findings import Box
from eagle.mllm import guidance as g
from eagle.mllm.runner import MLLMRequest, MLLMRunner
from eagle.testing.tiny_mllm import FAMILIES, build_tiny_mllm

# Published shapes of a 7-8B checkpoint per family (weights random here): language model, vision tower, and
# what the processor must match. QWEN2_7B is the LLM of Qwen2.5-VL-7B, InternVL3-8B and LLaVA-OneVision-7B.
QWEN2_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
PINPOINTS_384 = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # LLaVA-OneVision's anyres grids
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, image_size=384)
SEVEN_B: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": dict(  # Qwen2.5-VL-7B-Instruct
        text=dict(QWEN2_7B, max_position_embeddings=128000, rope_parameters={
            "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen3_vl": dict(  # Qwen3-VL-8B-Instruct
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24])),
    "internvl": dict(  # InternVL3-8B-hf: InternViT-300M, 448 px tiles of 256 tokens, up to 12 tiles + thumbnail
        text=QWEN2_7B, extra=dict(image_seq_length=256),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=448, patch_size=14),
        processor=dict(image_seq_length=256), image_processor=dict(size={"height": 448, "width": 448},
                                                                   max_patches=12)),
    "llava_onevision": dict(  # llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m, 384 px crops of 729 tokens, anyres_max_9
        text=QWEN2_7B, vision=SIGLIP_SO400M,
        extra=dict(image_grid_pinpoints=PINPOINTS_384),
        processor=dict(num_image_tokens=729),
        image_processor=dict(size={"height": 384, "width": 384}, image_grid_pinpoints=PINPOINTS_384)),
}


def requests(n: int, side: int) -> list[MLLMRequest]:
    """Half uncertain-anomalous with a box (two images, guided), half confident-normal (one image)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (side + side // 5 * (i % 3), side, 3), dtype=np.uint8)
        if i % 2 == 0:
            out.append(MLLMRequest(image, "bolt", "anomalous", "uncertain", [Box(10, 10, side // 2, side // 2, 1.0)]))
        else:
            out.append(MLLMRequest(image, "bolt", "normal", "confident_normal"))
    return out


def seven_b_model(tiny: MLLMRunner, family: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random model with `family`'s 7-8B shapes, keeping the tiny checkpoint's token ids; the tiny runner's
    processor is set to the same vision geometry (tile/crop size, tokens per tile)."""
    from transformers import AutoModelForImageTextToText

    shape = SEVEN_B[family]
    small = tiny.model.config
    cfg = small.to_dict()
    cfg["text_config"].pop("layer_types", None)  # per layer of the tiny depth; derived again from the new one
    cfg["text_config"].update(shape["text"])
    cfg["vision_config"].update(shape["vision"])
    cfg.update(shape.get("extra", {}))
    for name, value in shape.get("processor", {}).items():
        setattr(tiny.processor, name, value)
    for name, value in shape.get("image_processor", {}).items():
        setattr(tiny.processor.image_processor, name, value)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(type(small).from_dict(cfg), dtype=dtype,
                                                        attn_implementation={"text_config": g.register()})
    model.generation_config = tiny.model.generation_config
    return model.eval()


def timed(r: MLLMRunner, reqs: list[MLLMRequest], batch: int, sort: bool = True) -> tuple[float, float]:
    """(seconds to audit `reqs` in batches of `batch`, cut after sorting by prompt length unless not `sort`;
    peak GPU GiB); best of two passes after a warm-up batch."""
    r.model.set_attn_implementation(r.attn_implementation)  # runners may share one model
    r.run_all(reqs[:batch], batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        r.run_all(reqs, batch, sort=sort)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return best, peak


def pad_share(lengths: list[int], order: list[int], batch: int) -> float:
    """Share of the prompt tokens of batches cut from `order` that are padding."""
    total = pad = 0
    for i in range(0, len(order), batch):
        chunk = [lengths[j] for j in order[i:i + batch]]
        total += max(chunk) * len(chunk)
        pad += max(chunk) * len(chunk) - sum(chunk)
    return pad / total


def variant(r: MLLMRunner, **mllm: Any) -> MLLMRunner:
    """The runner with other mllm settings (cache, compile), sharing its model and processor."""
    other = copy.copy(r)
    other.mllm_cfg = r.mllm_cfg.model_copy(update=mllm)
    return other


@torch.inference_mode()
def bias_zero_gaps(r: MLLMRunner, enc) -> dict[str, float]:
    """Max |next-token logit difference| of guidance with bias 0 in every layer vs stock sdpa, and for scale the
    logit std and (CUDA) the stock model's own difference between flash and the other sdpa kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, n = r.model, enc.inputs["input_ids"].shape[0]
    model.set_attn_implementation("sdpa")
    stock = model(**enc.inputs, logits_to_keep=1).logits.float()
    out = {"logit std": float(stock.std())}
    if stock.is_cuda:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # anything but flash
            efficient = model(**enc.inputs, logits_to_keep=1).logits.float()
        out["stock flash vs non-flash kernels"] = float((efficient - stock).abs().max())
    model.set_attn_implementation(r.attn_implementation)
    ctx = g.GuidanceContext(layers=frozenset(range(model.config.get_text_config().num_hidden_layers)),
                            column_bias=torch.zeros(n, enc.inputs["input_ids"].shape[1]))
    with g.guidance(ctx):
        guided = model(**enc.inputs, logits_to_keep=1).logits.float()
    out["guided bias 0 vs stock"] = float((guided - stock).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="4,8", help="comma-separated batch sizes (a GPU: 8,16,32,64)")
    parser.add_argument("--options", default="unsorted,static,compile",
                        help="variants timed at the largest batch, guided + record: 'unsorted' (batches cut in "
                        "input order), 'static' (mllm.cache=static), 'compile' (static + mllm.compile); '' none")
    parser.add_argument("--one-by-one", action="store_true", help="also time batch 1 (the old table's baseline)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    big = args.shape == "7b"
    batches = [int(b) for b in args.batches.split(",")]
    pixels = [] if big else ["mllm.min_pixels=3136", "mllm.max_pixels=50176"]  # 7b: the config's ~512 tokens
    reqs = requests(args.images, 640 if big else 112)
    variants = {
        "unguided (stock sdpa)": ["guidance.enabled=false", "guidance.record_attention=false"],
        "guided (uncertain half)": ["guidance.record_attention=false"],
        "guided + record attention": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_mllm(args.family, tmp)
        runners = {}
        for name, extra in variants.items():
            cfg = load_config(overrides=[f"mllm.model={path}", f"mllm.dtype={args.dtype}",
                                         f"mllm.max_new_tokens={args.new_tokens}", *pixels, *extra])
            runners[name] = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=args.device)
        guided = runners["guided + record attention"]
        if big:
            model = seven_b_model(guided, args.family, args.device, getattr(torch, args.dtype))
            depth = model.config.get_text_config().num_hidden_layers
            for r in runners.values():
                r.model, r.layers = model, g.resolve_layers(depth, r.guidance_cfg.layers)
                r.processor = guided.processor
        for r in runners.values():
            r.model.generation_config.min_new_tokens = args.new_tokens  # equal work in every variant
        lengths = [int(guided.encode([guided.prompt(q)]).inputs["attention_mask"].sum()) for q in reqs]
        rows: list[tuple[str, int, float, float, float, str]] = []

        def add(name: str, r: MLLMRunner, batch: int, sort: bool = True) -> None:
            order = r.length_order(reqs) if sort else list(range(len(reqs)))
            try:
                sec, peak = timed(r, reqs, batch, sort)
                rows.append((name, batch, sec, peak, pad_share(lengths, order, batch), ""))
            except Exception as exc:  # noqa: BLE001 - a variant the stack cannot run is a result, not a crash
                rows.append((name, batch, float("nan"), float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:160]))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

        if args.one_by_one:
            add("unguided (stock sdpa)", runners["unguided (stock sdpa)"], 1)
        for batch in batches:
            for name, r in runners.items():
                add(name, r, batch)
        top = max(batches)
        options = [o for o in args.options.split(",") if o]
        if "unsorted" in options:
            add("guided + record, unsorted", guided, top, sort=False)
        if "static" in options:
            add("guided + record, static cache", variant(guided, cache="static"), top)
            add("unguided, static cache", variant(runners["unguided (stock sdpa)"], cache="static"), top)
        if "compile" in options:
            add("unguided, static + compile", variant(runners["unguided (stock sdpa)"], cache="static", compile=True), top)
            add("guided + record, static + compile", variant(guided, cache="static", compile=True), top)
        enc = guided.encode([guided.prompt(q) for q in reqs[:min(len(reqs), 16)]])
        single = guided.encode([guided.prompt(reqs[0])])
        gaps = {"one unpadded prompt": bias_zero_gaps(guided, single),
                f"left-padded batch of {enc.inputs['input_ids'].shape[0]}": bias_zero_gaps(guided, enc)}

    print(f"\n{args.shape} {args.family} (random weights) on {args.device} {args.dtype}, {args.images} images, "
          f"{args.new_tokens} new tokens each, prompts {min(lengths)}-{max(lengths)} tokens, guided layers "
          f"{guided.layers}, {torch.get_num_threads()} CPU thread(s); batches cut after sorting by prompt length "
          "unless 'unsorted'")
    print(f"{'variant':34s} {'batch':>5s} {'seconds':>8s} {'images/s':>9s} {'peak GiB':>9s} {'padding':>8s}")
    for name, batch, sec, peak, pad, error in rows:
        if error:
            print(f"{name:34s} {batch:5d} failed: {error}")
        else:
            print(f"{name:34s} {batch:5d} {sec:8.3f} {args.images / sec:9.2f} {peak:9.1f} {pad:8.1%}")
    if not args.device.startswith("cuda") and "compile" in args.options:
        print("(transformers compiles generate's decoding step on CUDA only: 'compile' runs eager here)")
    for name, values in gaps.items():
        print(f"max |delta next-token logit|, {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in values.items()))


if __name__ == "__main__":
    main()
