"""The inspect run on Ray Data, streaming end to end:

    plan → decode (CPU tasks) → expert (actor pool) → finish (CPU tasks; routed rows to the MLLM actors of
         eagle.pipeline.mllm_pool) → stamp → write (eagle.pipeline.writing, into the output's result store)

The driver plans (eagle.pipeline.planning: listing, pinned expert versions, this run's own rows, the compacted
ledger, in DuckDB out of core), then streams the rows to audit from the plan's Parquet files; it never holds a
row per image. Afterwards it counts the run's own rows (the summary) and merges the run into the ledger
(`ResultStore.merge`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Protocol

import duckdb

from eagle import __version__
from eagle.config import ConfigError, JobConfig, config_hash
from eagle.expert.ensemble import pinned_metas
from eagle.io import ledger, querying, storage
from eagle.io.lease import LeaseHeld, LeaseLost, OutputLease
from eagle.io.maintenance import finish_compactions
from eagle.io.querying import sql_str
from eagle.io.results import ResultStore, result_store
from eagle.io.runs import RunInfo, begin_run, end_run, new_run_id, run_settings
from eagle.pipeline.mllm_pool import MLLMPool, PoolFailed, mllm_pool
from eagle.pipeline.planning import Plan, make_plan, plan_dir, todo_chunks, todo_dataset
from eagle.pipeline.progress import progress_callback
from eagle.pipeline.ray_setup import configure_data_context
from eagle.pipeline.remote_errors import remote_cause
from eagle.pipeline.retry_tally import read_tally, start_tally
from eagle.pipeline.stages.decode_stage import DecodeStage, model_input_sizes
from eagle.pipeline.stages.expert_stage import ExpertStage
from eagle.pipeline.stages.finish_stage import FinishStage
from eagle.pipeline.stages.stamp_stage import StampStage
from eagle.pipeline.writing import write_streaming

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job-level failure (not one image's): the job exits non-zero."""


class StopRequest(Protocol):
    """How the command line stops a run gently (`eagle.cli.interrupts.Signals`): inside `graceful()` a
    SIGTERM/SIGINT only sets `stop`; the streaming write then writes the rows already finished (within
    ``output.stop_grace_s``) and the run ends with KeyboardInterrupt, as it does outside."""

    stop: threading.Event

    def graceful(self) -> AbstractContextManager[None]: ...


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
    confidence: dict[str, int] = field(default_factory=dict)  # rows per expert confidence band
    mllm_calls: int = 0
    guided: int = 0  # MLLM calls with attention guidance
    audited_fresh: int = 0  # rows of this run for images not already known to fail
    new_errors: int = 0  # error rows among those
    storage_retries: dict[str, int] = field(default_factory=dict)  # failed object-store requests, per kind
    stage_input_kb: dict[str, float] = field(default_factory=dict)  # object-store KB per row entering a stage
    stage_input_rows: dict[str, int] = field(default_factory=dict)  # rows entering a stage (mllm: routed only)

    @property
    def images_per_second(self) -> float:
        return self.audited / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """The summary as plain JSON-ready values (what ``--summary-json`` writes)."""
        return {**asdict(self), "images_per_second": round(self.images_per_second, 3)}

    def lines(self) -> list[str]:
        out = [f"run {self.run_id}: {self.listed} images listed, {self.skipped} already done, "
               f"{self.audited} audited in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)",
               f"  status: {dict(sorted(self.status.items()))}   verdict: {dict(sorted(self.verdict.items()))}",
               f"  confidence: {dict(sorted(self.confidence.items()))}   MLLM calls: {self.mllm_calls} "
               f"({self.guided} guided)"]
        out += [f"  {p}: {dict(sorted(c.items()))}" for p, c in sorted(self.by_product.items())]
        if self.stage_input_kb:
            out.append("  object-store KB per image entering: "
                       + ", ".join(f"{k} {kb:.1f}" for k, kb in self.stage_input_kb.items())
                       + "   rows entering: " + ", ".join(f"{k} {n}" for k, n in self.stage_input_rows.items()))
        if self.storage_retries:
            out.append("  storage retries (failed requests, retried): "
                       + ", ".join(f"{k} {n}" for k, n in self.storage_retries.items()))
        out.append(f"  output: {self.output}")
        return out


def say_unreachable_band(cfg: JobConfig, metas: dict[str, list[dict]]) -> None:
    """Say up front which products have an empty uncertain band, only where the routing policy uses the band
    (routing.policy=uncertain then sends none of their images to the MLLM): a warning. Under other policies
    the advice is at DEBUG (guidance with apply_to=uncertain then never applies to them). `metas`: each
    product's pinned artifact metadata (`eagle.expert.ensemble.pinned_metas`)."""
    from eagle.expert.ensemble import band_of
    from eagle.expert.threshold import empty_band_advice

    routes = cfg.routing.policy == "uncertain"
    if not cfg.mllm.model:
        return
    for product, product_metas in sorted(metas.items()):
        band = band_of(product_metas, cfg.expert.ensemble.combine)
        if advice := empty_band_advice(product, band.threshold, band.score_max, cfg.confidence):
            log.log(logging.WARNING if routes else logging.DEBUG, "%s", advice)


def run_inspect(cfg: JobConfig, dry_run: bool = False, verbose: bool = False,
                connect: Callable[[], None] | None = None, stop: StopRequest | None = None) -> Summary | Plan:
    """Audit every listed image not yet audited in this run (incrementally: not up to date); returns the run's
    summary. With `dry_run`, only plan in this process (no Ray): returns the plan (per product listed / done /
    to audit), writes nothing and takes no lease. An output is written by one driver at a time
    (`eagle.io.lease`, taken before `connect` starts or joins Ray); its manifest ends completed, failed or
    interrupted. A driver that loses the lease (it stalled past output.lease_ttl_s and another took over) stops
    and fails (JobFailed) without writing again or touching the manifest. `verbose` keeps Ray Data's progress
    bars instead of one progress line per 30 s. `stop`: see `StopRequest`."""
    if not cfg.model_store:
        raise ConfigError("model_store is required (--model-store)")
    if not cfg.output.uri:
        raise ConfigError("output.uri is required (--output)")
    run_id = cfg.run_id or new_run_id()
    if dry_run:
        return _plan(cfg, run_id, dry_run=True)[0]
    lease = take_output_lease(cfg, run_id)
    try:
        if connect is not None:
            connect()
    except BaseException:
        lease.release()
        raise
    status = "failed"
    try:
        summary = _run(cfg, run_id, verbose, lease.check, stop)
        status = "completed"
        return summary
    except LeaseLost as exc:
        raise JobFailed(f"run {run_id} stopped: {exc}") from exc
    except BaseException as exc:
        if not _interrupted_by(exc, stop):
            raise
        if lease.lost:  # the lease lost interrupts the main thread as a SIGINT would
            raise JobFailed(f"run {run_id} stopped: {lease.lost}") from None
        status = "interrupted"
        raise KeyboardInterrupt from None
    finally:
        try:
            if not lease.lost:  # a lost lease's run belongs to the driver that took it over
                end_run(cfg.output.uri, run_id, status, cfg.storage)
        finally:
            lease.release()


def _interrupted_by(exc: BaseException, stop: StopRequest | None) -> bool:
    """Whether `exc` is how a SIGINT/SIGTERM (as the job's command line maps them) ended the run: the
    KeyboardInterrupt itself; DuckDB's own InterruptException for a signal that lands in one of its queries; or,
    once a stop was requested, any error, since a library may wrap the KeyboardInterrupt raised in its callbacks
    (DuckDB reports one raised while it reads through fsspec as a plain `duckdb.Error`)."""
    if isinstance(exc, (KeyboardInterrupt, duckdb.InterruptException)):
        return True
    return isinstance(exc, Exception) and stop is not None and stop.stop.is_set()


def take_output_lease(cfg: JobConfig, run_id: str) -> OutputLease:
    """The output's lease for this run (one writer per output, whatever the run ids), waiting up to
    output.lease_wait_s for a holder to finish or its lease to expire; LeaseHeld (exit 2) after that. Losing it
    later interrupts the main thread, so a driver that stalled stops writing as soon as it runs again."""
    lease = OutputLease(cfg.output.uri, run_id, cfg.output.lease_ttl_s, cfg.storage, wait_s=cfg.output.lease_wait_s,
                        on_lost=_interrupt_main)
    try:
        lease.acquire()
    except LeaseHeld:
        raise
    except Exception as exc:  # noqa: BLE001 - the output store is unreachable (after retries)
        raise JobFailed(f"cannot take the output's lease in {cfg.output.uri}: {type(exc).__name__}: {exc}") from exc
    try:  # a maintenance run killed mid-compaction: finish it before reading results (eagle.io.maintenance)
        finish_compactions(cfg.output.uri, cfg.storage)
    except Exception as exc:  # noqa: BLE001 - the output store is unreachable (after retries)
        lease.release()
        raise JobFailed(f"cannot finish an interrupted compaction in {cfg.output.uri}: {exc}") from exc
    return lease


def _interrupt_main() -> None:
    """Interrupt the main thread as a SIGINT would. Where Python handles SIGINT, a real signal, so that a blocking
    call there returns too. Where the process ignores it (a shell without job control starts a background command
    with SIGINT ignored, and Python keeps that), a KeyboardInterrupt raised in the main thread all the same: it
    lands at the thread's next Python instruction, so a blocking call there finishes first."""
    main = threading.main_thread().ident
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(main, signal.SIGINT)
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(KeyboardInterrupt))


def _tally_since(tally: object, before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in read_tally(tally).items()}


def _plan(cfg: JobConfig, run_id: str, dry_run: bool) -> tuple[Plan, duckdb.DuckDBPyConnection]:
    import ray

    chash = config_hash(cfg)
    con = querying.connect(cfg.storage, memory_limit=cfg.output.planning_memory)
    scratch = tempfile.TemporaryDirectory(prefix="eagle-dry-run-") if dry_run else nullcontext()
    try:
        with scratch as tmp:
            store = result_store(cfg, listed=True)
            pending = ledger.pending_runs(cfg.output.uri, cfg.storage)
            if dry_run:  # reads only: the listing goes to a local temporary folder, pending runs merge in memory
                run = RunInfo(run_id=run_id, started_at="", audit_date="", config_hash=chash)
                out_dir = tmp
            else:
                store.merge(con, pending)
                run = begin_run(cfg.output.uri, run_id, chash, cfg.storage, mode=cfg.mode,
                                settings=run_settings(cfg))
                out_dir = plan_dir(cfg.output.uri, run_id, run.attempt)
            cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else float(os.cpu_count() or 1)
            plan = make_plan(con, cfg, run, chash, out_dir, store, cpus, dry_run_pending=pending if dry_run else None)
    except ConfigError:
        raise
    except duckdb.InterruptException:  # a signal that landed in a planning query
        raise KeyboardInterrupt from None
    except Exception as exc:  # noqa: BLE001 - any storage failure here (after retries) ends the job
        raise JobFailed(f"cannot list inputs or plan the run (input, output or model store unreachable?): "
                        f"{type(exc).__name__}: {exc}") from exc
    return plan, con


def _run(cfg: JobConfig, run_id: str, verbose: bool, check_lease: Callable[[], None],
         stop: StopRequest | None = None) -> Summary:
    start = time.time()
    tally = start_tally()
    retries_before = read_tally(tally)
    plan, con = _plan(cfg, run_id, dry_run=False)
    store = result_store(cfg)
    run = plan.run
    log.info("run %s attempt %d (%s): %d listed, %d already done, %d to audit",
             run_id, run.attempt, cfg.mode, plan.listed, plan.done, plan.todo)
    traffic: dict[str, list[int]] = {}  # stage -> [rows, bytes] that entered it through the object store
    if plan.todo_dir:
        metas = pinned_metas(cfg.model_store, plan.versions, cfg.storage)
        say_unreachable_band(cfg, metas)
        _abort_leftover_uploads(cfg, run_id)
        configure_data_context(progress_callback(plan.todo, traffic=traffic), verbose)
        try:
            with mllm_pool(cfg) if cfg.mllm.model else nullcontext() as pool:
                _stream(cfg, store, plan, pool, model_input_sizes(metas),
                        lambda exc: _write_failed(exc, cfg, store, run_id, _tally_since(tally, retries_before)),
                        check_lease, stop)
                if pool is not None:
                    traffic["mllm"] = list(pool.traffic())
        except PoolFailed as exc:
            raise JobFailed(str(exc)) from exc
    summary = summarize_run(con, cfg, store, plan, time.time() - start)
    summary.stage_input_kb = {stage: size / rows / 1024 for stage, (rows, size) in traffic.items() if rows}
    summary.stage_input_rows = {stage: rows for stage, (rows, _) in traffic.items()}
    check_lease()
    try:
        store.merge(con, {run_id: run.attempt})
        storage.remove(plan.plan_dir, cfg.storage, recursive=True)
    except OSError as exc:  # the results are written; the next run's planning merges them (pending runs)
        log.warning("run %s is complete, but its ledger update failed (%s); the next run brings the ledger up to "
                    "date", run_id, exc)
    summary.storage_retries = _tally_since(tally, retries_before)
    errors, total = summary.new_errors, summary.audited_fresh
    if total and errors / total > cfg.output.max_error_rate:
        raise JobFailed(f"error rate {errors}/{total} = {errors / total:.0%} exceeds output.max_error_rate "
                        f"{cfg.output.max_error_rate:.0%}; see the error column of run {run_id}")
    return summary


def _stream(cfg: JobConfig, store: ResultStore, plan: Plan, pool: MLLMPool | None,
            input_sizes: dict[str, tuple[int, int]], write_failed: Callable[[Exception], JobFailed],
            check_lease: Callable[[], None] = lambda: None, stop: StopRequest | None = None) -> None:
    """Decode → expert → finish (→ MLLM pool for the routed rows) → stamp → write, for the plan's images.
    Finished rows are written as they come (`write_streaming`), each write after `check_lease` (a driver whose
    lease was taken over writes nothing more); a stop request ends it with KeyboardInterrupt once the rows
    already finished are written."""
    run = plan.run
    stamp = {"run_id": run.run_id, "audit_date": run.audit_date, "config_hash": config_hash(cfg),
             "eagle_version": __version__, "mllm_model": cfg.mllm.model}
    for files in todo_chunks(plan, cfg, store.commit_rows):
        ds = DecodeStage.apply(todo_dataset(files, cfg), cfg, input_sizes=input_sizes)
        ds = ExpertStage.apply(ds, cfg, versions=plan.versions)
        ds = FinishStage.apply(ds, cfg, pool=pool)
        ds = StampStage.apply(ds, cfg, stamp=stamp)
        try:
            with stop.graceful() if stop is not None else nullcontext():
                finished = write_streaming(ds, cfg, store, run, stop.stop if stop is not None else None,
                                           check_lease)
        except Exception as exc:
            if not isinstance(remote_cause(exc), OSError):
                raise
            raise write_failed(exc) from exc
        if not finished:
            raise KeyboardInterrupt("stop requested")


def _abort_leftover_uploads(cfg: JobConfig, run_id: str) -> None:
    """Abort partial uploads an earlier attempt of this run left (a killed worker, a failed abort)."""
    try:
        if n := storage.abort_uploads(cfg.output.uri, f"{run_id}_", cfg.storage):
            log.info("aborted %d partial upload(s) left by an earlier attempt of run %s", n, run_id)
    except Exception as exc:  # noqa: BLE001 - only housekeeping: a lifecycle rule also removes them
        log.warning("could not list or abort partial uploads under %s: %s", cfg.output.uri, exc)


def _write_failed(exc: Exception, cfg: JobConfig, store: ResultStore, run_id: str,
                  retries: dict[str, int]) -> JobFailed:
    """The job's failure when the store failed (after all retries) while the results streamed out: what failed,
    and how to go on."""
    _abort_leftover_uploads(cfg, run_id)
    cause = remote_cause(exc)
    what = str(cause).splitlines()[0] if str(cause) else ""  # Ray appends its own retry advice below
    kept = store.kept_after_failure(run_id)
    tried = ", ".join(f"{k} {n}" for k, n in retries.items())
    return JobFailed(f"the run stopped on an object-store error (after retries): {type(cause).__name__}: {what} "
                     f"(failed requests: {tried}). {kept}; run again with --run-id {run_id} to audit only the "
                     f"images whose results are missing (storage.max_attempts and storage.*_timeout_s set how "
                     f"long a write is retried)")


_SUMMARY_COLUMNS = ("image_uri", "product", "status", "verdict", "confidence", "mllm_ran", "guided")


def summarize_run(con: duckdb.DuckDBPyConnection, cfg: JobConfig, store: ResultStore, plan: Plan,
                  seconds: float) -> Summary:
    """Counts of this run's rows, read back from its own output (so it also proves what was written).
    Images whose latest earlier result was an error (`Plan.failed_before`) stay out of the error budget."""
    run_id = plan.run.run_id
    con.execute(f"CREATE OR REPLACE TEMP TABLE run_rows AS "
                f"{store.run_rows_sql(con, [run_id], _SUMMARY_COLUMNS)}")
    if not con.execute("SELECT count(*) FROM run_rows").fetchall()[0][0]:
        return Summary(run_id=run_id, output=cfg.output.uri, listed=plan.listed, skipped=plan.done,
                       audited=plan.todo, seconds=seconds)
    status = dict(con.execute("SELECT status, count(*) FROM run_rows GROUP BY 1").fetchall())
    verdict = dict(con.execute("SELECT verdict, count(*) FROM run_rows WHERE verdict IS NOT NULL GROUP BY 1")
                   .fetchall())
    by_product: dict[str, dict[str, int]] = {}
    for product, v, n in con.execute("SELECT product, coalesce(verdict, 'error'), count(*) FROM run_rows "
                                     "GROUP BY 1, 2").fetchall():
        by_product.setdefault(product, {})[v] = n
    confidence = dict(con.execute("SELECT confidence, count(*) FROM run_rows WHERE confidence IS NOT NULL "
                                  "GROUP BY 1").fetchall())
    mllm_calls, guided, fresh, new_errors = con.execute(
        f"SELECT count(*) FILTER (WHERE r.mllm_ran), count(*) FILTER (WHERE r.guided), "
        f"count(*) FILTER (WHERE f.image_uri IS NULL), count(*) FILTER (WHERE f.image_uri IS NULL AND "
        f"r.status = 'error') FROM run_rows r LEFT JOIN read_parquet({sql_str(plan.failed_before)}) f "
        f"ON f.image_uri = r.image_uri").fetchall()[0]
    return Summary(run_id=run_id, output=cfg.output.uri, listed=plan.listed, skipped=plan.done,
                   audited=plan.todo, seconds=seconds, status=status, verdict=verdict, by_product=by_product,
                   confidence=confidence, mllm_calls=mllm_calls, guided=guided, audited_fresh=fresh,
                   new_errors=new_errors)
