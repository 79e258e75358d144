"""The inspect pipeline on Ray Data, streaming end to end:

    listing → decode (CPU tasks) → expert (actor pool) → MLLM (actor pool) or finish (CPU tasks)
            → stamp → write (eagle.pipeline.writing)

The driver only lists inputs, pins each product's expert version, and subtracts what this run already wrote.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from eagle import __version__
from eagle.config import ConfigError, JobConfig, config_hash
from eagle.io.inputs import list_inputs
from eagle.io.runs import begin_run, done_in_run, read_ledger, read_rows, up_to_date
from eagle.pipeline.ray_setup import configure_data_context
from eagle.pipeline.stages.decode_stage import DecodeStage
from eagle.pipeline.stages.expert_stage import ExpertStage
from eagle.pipeline.stages.finish_stage import FinishStage
from eagle.pipeline.stages.mllm_stage import MLLMStage
from eagle.pipeline.stages.stamp_stage import StampStage
from eagle.pipeline.writing import write_output

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job-level failure (not one image's): the job exits non-zero."""


@dataclass
class Summary:
    run_id: str
    output: str
    listed: int
    skipped: int
    audited: int
    seconds: float
    status: dict[str, int] = field(default_factory=dict)
    verdict: dict[str, int] = field(default_factory=dict)
    by_product: dict[str, dict[str, int]] = field(default_factory=dict)
    mllm_calls: int = 0
    audited_fresh: int = 0  # rows of this run for images not already known to fail
    new_errors: int = 0  # error rows among those

    @property
    def images_per_second(self) -> float:
        return self.audited / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [f"run {self.run_id}: {self.listed} images listed, {self.skipped} already done, "
               f"{self.audited} audited in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)",
               f"  status: {dict(sorted(self.status.items()))}   verdict: {dict(sorted(self.verdict.items()))}   "
               f"MLLM calls: {self.mllm_calls}"]
        out += [f"  {p}: {dict(sorted(c.items()))}" for p, c in sorted(self.by_product.items())]
        out.append(f"  output: {self.output}")
        return out


def pin_expert_versions(cfg: JobConfig, products: list[str]) -> dict[str, str]:
    """Pin each product's expert artifact version for the whole run (products without a model are left out)."""
    from eagle.expert.artifact import ArtifactError, resolve_version

    versions = {}
    for product in products:
        try:
            versions[product] = resolve_version(cfg.model_store, product, storage=cfg.storage)
        except ArtifactError as exc:
            log.warning("%s: its images become error rows", exc)
    return versions


def _blocks(todo: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Split the listing into small product-homogeneous tables (one Ray block each) so reads parallelise."""
    blocks, start = [], 0
    products = todo.column("product").to_pylist()
    while start < len(products):
        end = min(start + rows_per_block, len(products))
        first = products[start]
        while products[end - 1] != first:  # never cross a product boundary
            end -= 1
        blocks.append(todo.slice(start, end - start))
        start = end
    return blocks


def run_inspect(cfg: JobConfig) -> Summary:
    """Audit every listed image not yet audited in this run; returns the run's summary."""
    import ray

    if not cfg.model_store:
        raise ConfigError("model_store is required (--model-store)")
    if not cfg.output.uri:
        raise ConfigError("output.uri is required (--output)")
    run_id = cfg.run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    chash = config_hash(cfg)
    start = time.time()
    try:
        listing = list_inputs(cfg.inputs, cfg.storage)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage failure here (after retries) ends the job
        raise JobFailed(f"cannot list inputs: {type(exc).__name__}: {exc}") from exc
    try:
        run = begin_run(cfg.output.uri, run_id, chash, cfg.storage)
        versions = pin_expert_versions(cfg, sorted(set(listing.column("product").to_pylist())))
    except Exception as exc:  # noqa: BLE001
        raise JobFailed(f"cannot reach the output or model store: {type(exc).__name__}: {exc}") from exc
    ledger = read_ledger(cfg.output.uri, cfg.storage)
    done = done_in_run(ledger, run_id)
    known_bad: set[str] = set()
    if cfg.mode == "incremental":
        current, known_bad = up_to_date(ledger, listing, versions, cfg.mllm.model, chash)
        done |= current
    todo = listing.filter(pc.invert(pc.is_in(listing.column("image_uri"), pa.array(sorted(done), pa.string()))))
    log.info("run %s attempt %d (%s): %d listed, %d already done, %d to audit",
             run_id, run.attempt, cfg.mode, listing.num_rows, len(done), todo.num_rows)
    if todo.num_rows:
        stamp = {"run_id": run_id, "audit_date": run.audit_date, "config_hash": chash,
                 "eagle_version": __version__, "mllm_model": cfg.mllm.model}
        configure_data_context()
        ds = ray.data.from_arrow(_blocks(todo, cfg.resources.decode.batch_size))
        ds = DecodeStage.apply(ds, cfg)
        ds = ExpertStage.apply(ds, cfg, versions=versions)
        ds = MLLMStage.apply(ds, cfg) if cfg.mllm.model else FinishStage.apply(ds, cfg)
        ds = StampStage.apply(ds, cfg, stamp=stamp)
        write_output(ds, cfg, run)
    summary = summarize_run(cfg, run_id, listing.num_rows, len(done), todo.num_rows, time.time() - start, known_bad)
    errors, total = summary.new_errors, summary.audited_fresh
    if total and errors / total > cfg.output.max_error_rate:
        raise JobFailed(f"error rate {errors}/{total} = {errors / total:.0%} exceeds output.max_error_rate "
                        f"{cfg.output.max_error_rate:.0%}; see the error column of run {run_id}")
    return summary


def summarize_run(cfg: JobConfig, run_id: str, listed: int, skipped: int, audited: int, seconds: float,
              known_bad: set[str] = frozenset()) -> Summary:
    """Counts of this run's rows, read back from the output (so it also proves what was written).
    Images that already failed in earlier runs (`known_bad`) stay out of the error budget."""
    rows = read_rows(cfg.output.uri, ["run_id", "image_uri", "product", "status", "verdict", "mllm_ran"],
                     cfg.storage)
    rows = rows.filter(pc.equal(rows.column("run_id"), run_id)).to_pylist()
    fresh = [r for r in rows if r["image_uri"] not in known_bad]
    by_product: dict[str, Counter[str]] = {}
    for r in rows:
        by_product.setdefault(r["product"], Counter())[r["verdict"] or "error"] += 1
    return Summary(
        run_id=run_id, output=cfg.output.uri, listed=listed, skipped=skipped, audited=audited, seconds=seconds,
        status=dict(Counter(r["status"] for r in rows)),
        verdict=dict(Counter(r["verdict"] for r in rows if r["verdict"])),
        by_product={p: dict(c) for p, c in by_product.items()},
        mllm_calls=sum(1 for r in rows if r["mllm_ran"] in (True, "true")),
        audited_fresh=len(fresh), new_errors=sum(1 for r in fresh if r["status"] == "error"),
    )
