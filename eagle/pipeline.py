"""The inspect pipeline on Ray Data, streaming end to end:

    listing → read+decode (CPU tasks) → expert (actor pool) → route + MLLM (actor pool) → write_parquet

The driver only lists inputs, pins each product's expert version, and subtracts what this run already wrote.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from eagle import __version__, storage
from eagle.config import ConfigError, JobConfig, StageResources, config_hash
from eagle.inputs import list_inputs
from eagle.output import RunFilenames, begin_run, done_in_run, read_ledger, read_rows, up_to_date
from eagle.schema import OUTPUT_SCHEMA, to_table
from eagle.stages import boxes_of, rows_of
from eagle.stages.decode import read_decode
from eagle.stages.expert import ExpertStage
from eagle.stages.mllm import MLLMStage, finalize

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


def _map_args(res: StageResources, actor: bool) -> dict[str, Any]:
    """map_batches arguments for one stage from its config."""
    import ray

    args: dict[str, Any] = {"batch_size": res.batch_size, "num_cpus": res.num_cpus, "batch_format": "numpy"}
    if res.num_gpus:
        args["num_gpus"] = res.num_gpus
    if res.accelerator_type:
        args["accelerator_type"] = res.accelerator_type
    if actor:
        args["compute"] = ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors)
        args["max_restarts"] = res.max_restarts
        args["max_task_retries"] = -1 if res.max_restarts else 0
    return args


# Bare gateway errors (no S3 XML body) from proxies and S3-compatible stores, retried like Ray's defaults.
_EXTRA_RETRIED_IO_ERRORS = tuple(f"AWS Error UNKNOWN (HTTP status {code})" for code in (500, 502, 504))


def _configure_data_context() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *_EXTRA_RETRIED_IO_ERRORS]))


def resolve_versions(cfg: JobConfig, products: list[str]) -> dict[str, str]:
    """Pin each product's expert artifact version for the whole run (products without a model are left out)."""
    from eagle.expert.artifact import ArtifactError, resolve_version

    versions = {}
    for product in products:
        try:
            versions[product] = resolve_version(cfg.model_store, product, storage=cfg.storage)
        except ArtifactError as exc:
            log.warning("%s: its images become error rows", exc)
    return versions


def _stamp(batch: dict[str, np.ndarray], stamp: dict[str, Any]) -> pa.Table:
    """Add run-level columns and give the batch the output schema (drops the pixels)."""
    rows = rows_of(batch)
    now = dt.datetime.now(dt.timezone.utc)
    for row in rows:
        row.update(stamp, audited_at=now)
        row["boxes"] = [b.as_dict() for b in boxes_of(row)]
    return to_table(rows)


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
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
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
        versions = resolve_versions(cfg, sorted(set(listing.column("product").to_pylist())))
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
        _configure_data_context()
        ds = ray.data.from_arrow(_blocks(todo, cfg.resources.decode.batch_size))
        ds = ds.map_batches(read_decode, fn_kwargs={"cfg": cfg}, **_map_args(cfg.resources.decode, actor=False))
        ds = ds.map_batches(ExpertStage, fn_constructor_kwargs={"cfg": cfg, "versions": versions},
                            **_map_args(cfg.resources.expert, actor=True))
        if cfg.mllm.model:
            ds = ds.map_batches(MLLMStage, fn_constructor_kwargs={"cfg": cfg},
                                **_map_args(cfg.resources.mllm, actor=True))
        else:
            ds = ds.map_batches(finalize, **_map_args(cfg.resources.decode, actor=False))
        ds = ds.map_batches(_stamp, fn_kwargs={"stamp": stamp}, batch_format="numpy", batch_size=None)
        fs, path = storage.pyarrow_filesystem(cfg.output.uri, cfg.storage)
        ds.write_parquet(path, filesystem=fs, partition_cols=cfg.output.partition_by,
                         filename_provider=RunFilenames(run_id, run.attempt), schema=OUTPUT_SCHEMA)
    summary = summarize(cfg, run_id, listing.num_rows, len(done), todo.num_rows, time.time() - start, known_bad)
    errors, total = summary.new_errors, summary.audited_fresh
    if total and errors / total > cfg.output.max_error_rate:
        raise JobFailed(f"error rate {errors}/{total} = {errors / total:.0%} exceeds output.max_error_rate "
                        f"{cfg.output.max_error_rate:.0%}; see the error column of run {run_id}")
    return summary


def summarize(cfg: JobConfig, run_id: str, listed: int, skipped: int, audited: int, seconds: float,
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
