"""Fit per-product experts (PatchCore, PaDiM, STFPM; each with a label-free threshold) from normal images.

    python jobs/fit.py --data s3://bucket/mvtec --model-store s3://bucket/models [--products a,b]
        [--expert patchcore|padim|stfpm[,...]] [--backbone NAME] [--weights imagenet|random|PATH]
        [--threshold-method k-sigma|mad|quantile|evt] [--coreset-ratio R] [--config FILE] [section.key=value ...]

--data is a dataset root in any layout anomalib reads (MVTec AD, MVTec AD 2, MVTec LOCO, VisA, BTech, MPDD,
folder: eagle/io/layouts.py), detected from its folders unless --layout names it; each product is fitted on
exactly its layout's training split of normal images. Products run as parallel Ray tasks sized by
resources.expert; each writes {model-store}/{product}/{version}/ and moves {product}/LATEST.<model>;
the first model of --expert (default: expert.model, 'auto' = patchcore) also moves {product}/LATEST, the
product's default expert that inspect uses with expert.model auto. --weights imagenet
(the default) needs timm's pretrained weights from the hub or its local cache; random is for trials.
With routing.policy=uncertain (the policy that uses the band), a product whose threshold lies at or above its
largest training score (an empty uncertain band) is reported with the setting that widens the band.
"""

from __future__ import annotations

import argparse
import json
import logging

from eagle.cli.effective_config import add_print_config, print_config
from eagle.cli.exit_codes import OK, SOME_FAILED, USAGE, failed, help_text
from eagle.cli.interrupts import catch_signals
from eagle.cli.preflight import StorageUnreachable, check_fit, check_requested_products
from eagle.config import ConfigError, load_config
from eagle.io import storage
from eagle.io.layouts import LAYOUTS, detect_layout
from eagle.logs import quiet_job, setup_logging

log = logging.getLogger("eagle.fit")

# CLI flag -> config key
_FLAGS = {"model_store": "model_store", "backbone": "expert.backbone", "weights": "expert.weights",
          "threshold_method": "threshold.method", "coreset_ratio": "expert.patchcore.coreset_ratio"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/fit.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + help_text("fit"))
    p.add_argument("--data", metavar="ROOT", help="Dataset root, local or s3://, in any layout of --layout "
                                                  "(detected unless given). Required, but for --print-config.")
    p.add_argument("--layout", choices=LAYOUTS, help="The dataset layout (default: detected from ROOT).")
    p.add_argument("--model-store", metavar="URI", help="Where artifacts go (config: model_store).")
    p.add_argument("--products", help="Comma-separated products (default: every product under ROOT).")
    p.add_argument("--expert", metavar="NAMES", help="Comma-separated expert models to fit: patchcore, padim, "
                                                     "stfpm (default: expert.model); the first becomes each "
                                                     "product's default expert.")
    p.add_argument("--backbone", help="timm backbone (config: expert.backbone).")
    p.add_argument("--weights", help="imagenet, random or a safetensors path (config: expert.weights).")
    p.add_argument("--threshold-method", choices=["k-sigma", "mad", "quantile", "evt"])
    p.add_argument("--coreset-ratio", type=float)
    p.add_argument("--config", metavar="FILE", help="YAML job config (local or s3://).")
    p.add_argument("--summary-json", metavar="PATH", help="Also write the per-product results as JSON (local or "
                                                          "s3://).")
    p.add_argument("--verbose", action="store_true", help="Ray's own detail: library warnings, colours.")
    add_print_config(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    if not (args.data or args.print_config):
        p.error("the following arguments are required: --data")
    quiet_job(args.verbose)
    setup_logging()
    flags = [f"{key}={getattr(args, name)}" for name, key in _FLAGS.items() if getattr(args, name) is not None]
    try:
        cfg = load_config(args.config, args.overrides + flags)
        if args.print_config:
            return print_config(cfg)
        requested = [s.strip() for s in args.products.split(",") if s.strip()] if args.products else None
        check_fit(cfg, args.data)
        from eagle.expert.experts import parse_models

        models = parse_models(args.expert) if args.expert else cfg.expert.ensemble.models or [cfg.expert.fit_model()]
    except (ConfigError, ValueError, StorageUnreachable) as exc:
        return failed(exc, log)
    from eagle.expert.threshold import empty_band_advice
    from eagle.expert.training import FitSummary, list_products

    try:
        layout = args.layout or detect_layout(args.data, cfg.storage)
        available = list_products(args.data, cfg.storage, layout)
        products = check_requested_products(args.data, requested, available) if requested else available
    except (ConfigError, ValueError, RuntimeError) as exc:  # anomalib's parsers: RuntimeError, MisMatchError
        return failed(exc, log)
    if not products:
        log.error("no products with training images under %s (layout %s): check --data or --layout", args.data,
                  layout)
        return USAGE
    log.info("dataset %s: layout %s, products %s", args.data, layout, ", ".join(products))
    signals = catch_signals()
    from eagle.pipeline.fitting import fit_experts
    from eagle.pipeline.ray_setup import RayUnavailable, init_ray

    try:
        init_ray(cfg)
        results = fit_experts(args.data, products, cfg, models, layout)
    except RayUnavailable as exc:  # one line, exit 3 (not a traceback and 1, which means "some products failed")
        return failed(exc, log)
    except KeyboardInterrupt:
        log.warning("interrupted: products whose LATEST moved are fitted; run the same command again to fit "
                    "the rest")
        return signals.exit_code()
    print(f"{'product':<16} {'images':>6} {'patches':>8} {'coreset':>7} {'method':>8} {'threshold':>10} "
          f"{'score_max':>10} {'skipped':>7} {'seconds':>8} {'model':>9}  version")
    n_failed = 0
    for (product, model), res in results.items():
        if isinstance(res, FitSummary):
            print(f"{product:<16} {res.images:>6} {res.patches:>8} {res.coreset:>7} {res.threshold_method:>8} "
                  f"{res.threshold:>10.4f} {res.score_max:>10.4f} {res.skipped:>7} {res.seconds:>8.1f} "
                  f"{model:>9}  {res.version}")
        else:
            n_failed += 1
            which = f"{model}: " if len(models) > 1 else ""
            print(f"{product:<16} FAILED: {which}{type(res).__name__}: {res}")
    uses_band = cfg.routing.policy == "uncertain"  # the band's advice only where the routing policy uses it
    for (_, model), res in results.items():
        if uses_band and isinstance(res, FitSummary) and (advice := empty_band_advice(
                res.product, res.threshold, res.score_max, cfg.confidence)):
            log.warning("%s", advice if len(models) == 1 else f"({model}) {advice}")
    if args.summary_json:
        def of(model: str) -> dict:
            return {p: r.as_dict() if isinstance(r, FitSummary) else {"error": f"{type(r).__name__}: {r}"}
                    for (p, m), r in results.items() if m == model}

        doc = of(models[0])
        if len(models) > 1:  # every model's results under "experts": {model: {product: ...}}
            doc = {**doc, "experts": {m: of(m) for m in models}}
        storage.write_bytes(args.summary_json, json.dumps(doc, indent=2).encode(), cfg.storage)
    return SOME_FAILED if n_failed else OK

