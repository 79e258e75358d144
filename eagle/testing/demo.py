"""The embedded offline demo behind ``python jobs/inspect.py`` with no arguments.

Synthetic MVTec-style data → expert fitted with real ImageNet features (tf_efficientnet_lite0, whose weights
ship in a locked package) → tiny random MLLM → the real inspect pipeline on a local Ray → Parquet, then DuckDB
queries over it: the verdicts, and the expert's verdicts against the known truth. Nothing is downloaded. The
expert detects; the MLLM's words are noise by construction (the demo shows its machinery, not its judgement).
"""

from __future__ import annotations

import logging
import os

from eagle.config import JobConfig, load_config
from eagle.io import storage

log = logging.getLogger("eagle.testing.demo")

DEMO_PRODUCTS = ("grid", "marble", "nut")
DEMO_SIZE = 224
BANNER = ("DEMO MODE: synthetic images, expert on ImageNet features (tf_efficientnet_lite0), TINY RANDOM MLLM "
          "(its answers are noise). Use jobs/fit.py and jobs/inspect.py with real data and models for audits.")


DEFAULT_FAMILY = "qwen2_5_vl"


def demo_config(root: str, family: str = DEFAULT_FAMILY) -> JobConfig:
    """Small, CPU-only settings that finish in a few minutes on 2 cores. Run id `demo`, or `demo-FAMILY` for
    another tiny family, so that trying one in the same folder audits the images again."""
    return load_config(overrides={
        "run_id": "demo" if family == DEFAULT_FAMILY else f"demo-{family}",
        "inputs": {"uris": [os.path.join(root, "data")], "exclude": ["*/ground_truth/*", "*/train/*"]},
        "model_store": os.path.join(root, "models"),
        "output": {"uri": os.path.join(root, "audit")},
        # real ImageNet features with no download (its default layers blocks.2+blocks.4); no center crop, so
        # defects near the border stay in view
        "expert": {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "resize": DEMO_SIZE,
                   "crop": DEMO_SIZE},
        "mllm": {"model": os.path.join(root, f"tiny-mllm-{family}"), "dtype": "float32", "max_new_tokens": 12,
                 "min_pixels": 56 * 56, "max_pixels": 112 * 112},
        "routing": {"policy": "not-confident-normal"},
        "resources": {"expert": {"batch_size": 8}, "mllm": {"batch_size": 4}},
    }, env={})


def run_demo(root: str = "demo", family: str = DEFAULT_FAMILY) -> int:
    """The demo with the tiny random MLLM of `family` (eagle.testing.tiny_mllm.FAMILIES)."""
    from eagle.pipeline.fitting import fit_products
    from eagle.pipeline.inspection import run_inspect
    from eagle.pipeline.ray_setup import init_ray
    from eagle.testing.synth import generate
    from eagle.testing.tiny_mllm import build_tiny_mllm

    root = os.path.abspath(root)
    log.info("%s", BANNER)  # INFO: a normal run logs no WARNING; the banner closes stdout too
    cfg = demo_config(root, family)
    data = os.path.join(root, "data")
    if not storage.exists(os.path.join(data, "labels.csv")):
        summary = generate(data, products=DEMO_PRODUCTS, n_train=16, n_test_good=4, n_test_defect=2,
                           size=DEMO_SIZE, seed=0)
        log.info("wrote synthetic dataset to %s (%s)", data, summary.counts)
    if not os.path.exists(os.path.join(cfg.mllm.model, "config.json")):
        build_tiny_mllm(family, cfg.mllm.model)
        log.info("built tiny random %s at %s", family, cfg.mllm.model)
    init_ray(cfg)
    for product, fitted in fit_products(data, DEMO_PRODUCTS, cfg).items():
        if isinstance(fitted, Exception):
            raise fitted
        log.info("fitted %s: %s", product, fitted.as_dict())
    summary = run_inspect(cfg)
    print("\n".join(summary.lines()))
    query = (f"SELECT product, expert_verdict, verdict, count(*) AS n FROM read_parquet("
             f"'{cfg.output.uri}/**/*.parquet', hive_partitioning = true) WHERE run_id = '{cfg.run_id}' "
             f"GROUP BY ALL ORDER BY ALL")
    import duckdb

    print(f"\n{BANNER}\nOutput: {cfg.output.uri}\nLook at it with DuckDB:\n"
          f"  python -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"\n")
    duckdb.sql(query).show()
    print(DETECTIONS)
    duckdb.sql(detection_query(cfg)).show()
    return 0


DETECTIONS = ("The expert against the truth (synthetic, so known: test/good is normal, every other test folder "
              "defective; caught = expert verdict anomalous;\ndefects run from faint to clear, and faint ones on "
              "textures are the hard case):")


def detection_query(cfg: JobConfig) -> str:
    """SQL: per product, how many defective test images the expert flagged and how many normal ones it did."""
    return (f"SELECT product, count(*) FILTER (WHERE NOT normal AND expert_verdict = 'anomalous') AS "
            f"defective_caught, count(*) FILTER (WHERE NOT normal) AS defective, count(*) FILTER (WHERE normal AND "
            f"expert_verdict = 'anomalous') AS normal_flagged, count(*) FILTER (WHERE normal) AS normal FROM "
            f"(SELECT product, expert_verdict, image_uri LIKE '%/test/good/%' AS normal FROM read_parquet("
            f"'{cfg.output.uri}/**/*.parquet', hive_partitioning = true) WHERE run_id = '{cfg.run_id}') "
            f"GROUP BY product ORDER BY product")
