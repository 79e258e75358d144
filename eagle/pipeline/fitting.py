"""The fit job on Ray: one task per product, sized by ``resources.expert``; a failure stays with its product."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from eagle.config import JobConfig
from eagle.expert.training import FitSummary, fit_product
from eagle.pipeline.ray_setup import configure_threads, ray_options
from eagle.pipeline.retry_tally import read_tally, start_tally

log = logging.getLogger(__name__)


def _fit_task(root: str, product: str, cfg: JobConfig) -> FitSummary:
    import torch

    configure_threads(torch)  # Ray pins OMP_NUM_THREADS=1 in workers; use the CPUs this task was given
    return fit_product(root, product, cfg)


def fit_products(root: str, products: Sequence[str], cfg: JobConfig) -> dict[str, FitSummary | Exception]:
    """Fit products as parallel Ray tasks; returns each product's summary or its exception. Logs the failed
    (retried) object-store requests of the fit per kind.

    Ray must be initialised (see ``eagle.pipeline.ray_setup.init_ray``).
    """
    import ray

    tally = start_tally()
    before = read_tally(tally)
    task = ray.remote(_fit_task).options(**ray_options(cfg.resources.expert, actor=False), max_retries=1)
    refs = {product: task.remote(root, product, cfg) for product in products}
    results: dict[str, FitSummary | Exception] = {}
    for product, ref in refs.items():
        try:
            results[product] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - reported per product by the job
            results[product] = getattr(exc, "cause", None) or exc  # unwrap RayTaskError
    retries = {k: n - before[k] for k, n in read_tally(tally).items()}
    log.info("storage retries (failed requests, retried): %s", ", ".join(f"{k} {n}" for k, n in retries.items()))
    return results
