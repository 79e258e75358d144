"""The fit job on Ray: one task per product and expert model, sized by ``resources.expert``; a failure stays with
its product and model."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from eagle.config import JobConfig
from eagle.expert.training import FitSummary, fit_product
from eagle.pipeline.ray_setup import configure_threads, ray_options
from eagle.pipeline.retry_tally import read_tally, start_tally

log = logging.getLogger(__name__)


def _fit_task(root: str, product: str, cfg: JobConfig, model: str, default: bool, layout: str | None) -> FitSummary:
    import torch

    configure_threads(torch)  # Ray pins OMP_NUM_THREADS=1 in workers; use the CPUs this task was given
    return fit_product(root, product, cfg, model=model, default=default, layout=layout)


def fit_experts(root: str, products: Sequence[str], cfg: JobConfig, models: Sequence[str],
                layout: str | None = None) -> dict[tuple[str, str], FitSummary | Exception]:
    """Fit each product's expert of each model as parallel Ray tasks (one per product and model); returns the
    summary or the exception of each (product, model). The first model becomes each product's default expert
    (its ``LATEST``); `layout`: the data root's (`eagle.io.layouts`; None: detected per task). Logs the failed
    (retried) object-store requests of the fit per kind.

    Ray must be initialised (see ``eagle.pipeline.ray_setup.init_ray``).
    """
    import ray

    tally = start_tally()
    before = read_tally(tally)
    task = ray.remote(_fit_task).options(**ray_options(cfg.resources.expert, actor=False), max_retries=1)
    refs = {(product, model): task.remote(root, product, cfg, model, model == models[0], layout)
            for product in products for model in models}
    results: dict[tuple[str, str], FitSummary | Exception] = {}
    for key, ref in refs.items():
        try:
            results[key] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - reported per product by the job
            results[key] = getattr(exc, "cause", None) or exc  # unwrap RayTaskError
    retries = {k: n - before[k] for k, n in read_tally(tally).items()}
    log.info("storage retries (failed requests, retried): %s", ", ".join(f"{k} {n}" for k, n in retries.items()))
    return results


def fit_products(root: str, products: Sequence[str], cfg: JobConfig) -> dict[str, FitSummary | Exception]:
    """Fit products' experts of ``expert.model`` ('auto': patchcore) as parallel Ray tasks; returns each
    product's summary or its exception (see `fit_experts`)."""
    model = cfg.expert.fit_model()
    return {product: res for (product, _), res in fit_experts(root, products, cfg, [model]).items()}
