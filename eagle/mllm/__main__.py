"""Try a checkpoint on a few local or s3:// images: ``python -m eagle.mllm --model ID --image a.png``.

Prints one JSON line per image with the answer, the final verdict, whether guidance ran, the attention share
and the explanation.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from eagle.config import InputConfig, load_config
from eagle.findings import Box, final_verdict
from eagle.io.images import decode_image
from eagle.io.storage import read_bytes
from eagle.mllm.runner import MLLMRequest, MLLMRunner


def _read_image(uri: str) -> np.ndarray:
    """The same decoding as the pipeline (EXIF orientation, 16-bit, CMYK, palette, size guard)."""
    return decode_image(read_bytes(uri), InputConfig().max_image_pixels)


def _box(text: str) -> Box:
    x1, y1, x2, y2 = (int(v) for v in text.split(","))
    return Box(x1, y1, x2, y2, 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run the guided MLLM stage on a few local or s3:// images; prints one JSON line per image."
    )
    parser.add_argument("--model", required=True, help="hub id, local path or s3:// prefix (overrides mllm.model)")
    parser.add_argument("--image", action="append", required=True, help="query image (repeat for more)")
    parser.add_argument("--reference", action="append", default=[], help="normal reference image (few-shot)")
    parser.add_argument("--product", default="object")
    parser.add_argument("--expert-verdict", choices=["normal", "anomalous"], default="anomalous")
    parser.add_argument("--confidence", choices=["confident_normal", "uncertain", "confident_anomalous"],
                        default="uncertain")
    parser.add_argument("--box", action="append", default=[], help="x1,y1,x2,y2 in image pixels (every image)")
    parser.add_argument("--config", help="job YAML whose mllm/prompts/guidance sections are used")
    parser.add_argument("--set", action="append", default=[], help="dotted override, e.g. guidance.image_bias=2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, overrides=[*args.set, f"mllm.model={args.model}"])
    runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=args.device, storage=cfg.storage)
    references = [_read_image(u) for u in args.reference]
    boxes = [_box(b) for b in args.box]
    requests = [MLLMRequest(_read_image(u), args.product, args.expert_verdict, args.confidence, boxes,
                            references=references) for u in args.image]
    for uri, res in zip(args.image, runner.run(requests), strict=True):
        print(json.dumps({"image": uri, "answer": res.answer, "verdict": final_verdict(res.answer, args.expert_verdict),
                          "guided": res.guided, "image_attention_share": res.image_attention_share,
                          "explanation": res.explanation, "raw_text": res.raw_text}))


if __name__ == "__main__":
    main()
