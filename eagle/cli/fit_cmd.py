"""Fit per-product PatchCore experts (memory bank + label-free threshold) from normal training images.

    python jobs/fit.py --data s3://bucket/mvtec --model-store s3://bucket/models [--products a,b]
        [--backbone NAME] [--weights imagenet|random|PATH] [--threshold-method k-sigma|mad|quantile|evt]
        [--coreset-ratio R] [--config FILE] [section.key=value ...]

--data is an MVTec-AD-layout root ({product}/train/good/*.png). Products run as parallel Ray tasks sized by
resources.expert; each writes {model-store}/{product}/{version}/ and moves {product}/LATEST.
"""

from __future__ import annotations

import argparse
import logging

from eagle.config import ConfigError, load_config
from eagle.expert.training import FitSummary, list_products
from eagle.logs import setup_logging
from eagle.pipeline.fitting import fit_products
from eagle.pipeline.ray_setup import init_ray

log = logging.getLogger("eagle.fit")

# CLI flag -> config key
_FLAGS = {"model_store": "model_store", "backbone": "expert.backbone", "weights": "expert.weights",
          "threshold_method": "threshold.method", "coreset_ratio": "expert.coreset_ratio"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/fit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, metavar="ROOT", help="MVTec-layout root, local or s3://.")
    p.add_argument("--model-store", metavar="URI", help="Where artifacts go (config: model_store).")
    p.add_argument("--products", help="Comma-separated products (default: every product under ROOT).")
    p.add_argument("--backbone", help="timm backbone (config: expert.backbone).")
    p.add_argument("--weights", help="imagenet, random or a safetensors path (config: expert.weights).")
    p.add_argument("--threshold-method", choices=["k-sigma", "mad", "quantile", "evt"])
    p.add_argument("--coreset-ratio", type=float)
    p.add_argument("--config", metavar="FILE", help="YAML job config (local or s3://).")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    setup_logging()
    flags = [f"{key}={getattr(args, name)}" for name, key in _FLAGS.items() if getattr(args, name) is not None]
    try:
        cfg = load_config(args.config, args.overrides + flags)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    if not cfg.model_store:
        log.error("no model store: pass --model-store or set model_store in the config")
        return 2
    products = [s.strip() for s in args.products.split(",") if s.strip()] if args.products else \
        list_products(args.data, cfg.storage)
    if not products:
        log.error("no products with train/good images under %s", args.data)
        return 2
    init_ray(cfg)
    results = fit_products(args.data, products, cfg)
    print(f"{'product':<16} {'images':>6} {'patches':>8} {'coreset':>7} {'method':>8} {'threshold':>10} "
          f"{'score_max':>10} {'skipped':>7} {'seconds':>8}  version")
    failed = 0
    for product, res in results.items():
        if isinstance(res, FitSummary):
            print(f"{product:<16} {res.images:>6} {res.patches:>8} {res.coreset:>7} {res.threshold_method:>8} "
                  f"{res.threshold:>10.4f} {res.score_max:>10.4f} {res.skipped:>7} {res.seconds:>8.1f}  {res.version}")
        else:
            failed += 1
            print(f"{product:<16} FAILED: {type(res).__name__}: {res}")
    return 1 if failed else 0

