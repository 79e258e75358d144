"""Every registered expert model on the same synthetic product: fit time (with its label-free threshold: TGPS
for PatchCore, the k-fold cross-fit for the others) and scoring throughput as the expert stage runs it
(`Expert.score_inputs` on the uint8 model inputs decode tasks send), in images/s. Prints a markdown table.

Random backbone weights by default (no download; the numbers measure cost, not accuracy).

    OMP_NUM_THREADS=1 python bench/bench_experts.py --threads 1
    python bench/bench_experts.py --size 256 --crop 224 --backbone wide_resnet50_2 --layers layer2,layer3 \\
        --train 32 --test 64 --batch 16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eagle.config import load_config  # noqa: E402
from eagle.config.sections import EXPERT_MODELS  # noqa: E402
from eagle.expert.experts import model_class  # noqa: E402
from eagle.expert.fitted import Expert  # noqa: E402
from eagle.testing.synth import image_rng, render_normal  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default=",".join(EXPERT_MODELS), help="Comma-separated registered models.")
    p.add_argument("--product", default="nut")
    p.add_argument("--size", type=int, default=96, help="Synthetic image side (also expert.resize).")
    p.add_argument("--crop", type=int, default=None, help="expert.crop (default: --size).")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--layers", default="layer1,layer2")
    p.add_argument("--weights", default="random")
    p.add_argument("--train", type=int, default=10, help="Training images.")
    p.add_argument("--test", type=int, default=32, help="Images scored.")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--folds", type=int, default=5, help="threshold.folds (cross-fitted models).")
    p.add_argument("--epochs", type=int, default=20, help="expert.stfpm.epochs.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32", help="Comma-separated backbone dtypes to score with (one column "
                   "of images/s each): float32, float16, bfloat16.")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    crop = args.crop or args.size
    cfg = load_config(overrides={
        "expert": {"backbone": args.backbone, "layers": args.layers.split(","), "weights": args.weights,
                   "resize": args.size, "crop": crop, "stfpm": {"epochs": args.epochs}},
        "threshold": {"folds": args.folds, "min_unselected_patches": 4}})
    train = [render_normal(args.product, image_rng(0, args.product, "train", i), args.size) for i in range(args.train)]
    test = [render_normal(args.product, image_rng(0, args.product, "test", i), args.size) for i in range(args.test)]
    names = [f"train/good/{i:03d}.png" for i in range(args.train)]
    print(f"{args.product} {args.size}px crop {crop}, {args.backbone} {args.layers} ({args.weights}), "
          f"{args.train} training / {args.test} scored images, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads\n")
    dtypes = args.dtypes.split(",")
    print("| expert | fit s (incl. threshold) | threshold from | artifact MB | "
          + " | ".join(f"images/s {d}" for d in dtypes) + " |")
    print("| --- | ---: | --- | ---: |" + " ---: |" * len(dtypes))
    for name in args.experts.split(","):
        model = model_class(name)
        start = time.perf_counter()
        fit = model.fit(train, cfg, args.device, args.batch, names=names)
        fit_s = time.perf_counter() - start
        mb = sum(t.numel() * t.element_size() for t in fit.tensors.values()) / 2**20
        expert = Expert(model.from_config(cfg.expert, None, fit.tensors).to(args.device))
        inputs = [expert.model_input(img) for img in test]
        sizes = [img.shape[:2] for img in test]
        rates = []
        for dtype in dtypes:
            expert.model.set_dtype(getattr(torch, dtype))
            expert.score_inputs(inputs[:args.batch], sizes[:args.batch])  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, len(inputs), args.batch):
                expert.score_inputs(inputs[i:i + args.batch], sizes[i:i + args.batch])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates.append(len(inputs) / (time.perf_counter() - start))
        print(f"| {name} | {fit_s:.1f} | {model.threshold_rule} | {mb:.1f} | " + " | ".join(f"{r:.1f}" for r in rates)
              + " |", flush=True)


if __name__ == "__main__":
    main()
