"""The streaming write at the end of the inspect pipeline: finished blocks go to the output's result store
(eagle.io.results) in flushes.

`write_streaming` bounds what a crash loses: finished rows (blocks out of the last stage) reach storage at least
every ``output.flush_interval_s`` and every ``output.min_rows_per_file`` rows, and on a stop request (SIGTERM,
SIGINT) the rows already finished are written within ``output.stop_grace_s`` while no new ones are awaited."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from eagle.config import JobConfig
from eagle.io.results import ResultStore
from eagle.io.runs import RunInfo
from eagle.pipeline.ray_setup import before_shutdown, ray_options

log = logging.getLogger(__name__)


class Flusher:
    """Finished blocks of a run attempt waiting to be written (object refs only: the rows stay in Ray's object
    store), and when they are due: ``output.min_rows_per_file`` rows, or ``output.flush_interval_s`` since the
    oldest of them finished. Each flush is one `ResultStore.write`."""

    def __init__(self, cfg: JobConfig, store: ResultStore, run: RunInfo,
                 before_write: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.store, self.run, self.before_write = cfg, store, run, before_write
        self.refs: list[Any] = []
        self.rows = 0
        self.oldest: float | None = None  # when the oldest waiting block arrived (time.monotonic)
        self.written = 0  # rows written so far
        self.flushes = 0
        self.write_id = uuid.uuid4().hex[:12]  # this stream's writes; with the flush number, a file's name

    def add(self, bundle: Any) -> None:
        """Take the blocks of one RefBundle out of the pipeline's last stage."""
        self.refs.extend(bundle.block_refs)
        self.rows += bundle.num_rows() or 0
        if self.refs and self.oldest is None:
            self.oldest = time.monotonic()

    def seconds_left(self) -> float:
        """Seconds until the waiting rows are due by time (inf when none wait)."""
        if self.oldest is None:
            return float("inf")
        return max(0.0, self.oldest + self.cfg.output.flush_interval_s - time.monotonic())

    def due(self) -> bool:
        return bool(self.refs) and (self.rows >= self.cfg.output.min_rows_per_file or self.seconds_left() <= 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Write the waiting blocks; False when `timeout` seconds passed first (the write is then abandoned: the
        resume audits its images again)."""
        if not self.refs:
            return True
        self.before_write()  # e.g. the output's lease still ours: raises otherwise, and nothing is written
        refs, rows = self.refs, self.rows
        self.refs, self.rows, self.oldest = [], 0, None
        start = time.monotonic()
        if not self.store.write(refs, self.run, f"{self.write_id}_{self.flushes:06d}", timeout,
                                ray_options(self.cfg.resources.decode, actor=False)):
            return False
        self.written += rows
        self.flushes += 1
        log.debug("wrote %d finished rows in %.1f s (%d so far)", rows, time.monotonic() - start, self.written)
        return True


_END = object()


def write_streaming(ds: Any, cfg: JobConfig, store: ResultStore, run: RunInfo, stop: threading.Event | None = None,
                    before_write: Callable[[], None] = lambda: None) -> bool:
    """Stream `ds` (the stamped rows) to storage as `Flusher` says, calling `before_write` before each write;
    returns False when `stop` was set: then the rows already finished were written within
    ``output.stop_grace_s`` (what did not make it is audited again by the resume) and no more are awaited. A
    pipeline error is raised here."""
    results: queue.Queue = queue.Queue()
    # what ds.iter_internal_ref_bundles() does, keeping the executor: a stop shuts it down before Ray stops
    executor = ds._create_executor()

    def pull() -> None:  # Ray Data's iterator blocks; the flush clock and the stop request must not wait on it
        try:
            for bundle in ds._build_bundle_iterator(executor):
                results.put(bundle)
            results.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread, raised there
            results.put(exc)

    puller = threading.Thread(target=pull, name="eagle-results", daemon=True)
    puller.start()

    def stop_pipeline() -> None:  # its thread reports to Ray's stats actor as it ends: before Ray stops
        executor.shutdown(force=True)
        puller.join(timeout=5)

    flusher = Flusher(cfg, store, run, before_write)
    try:
        while True:
            if stop is not None and stop.is_set():
                executor._callbacks = []  # no progress line after the stop: the resume command is the last line
                _flush_on_stop(flusher, results, cfg.output.stop_grace_s)
                break
            try:
                item = results.get(timeout=min(0.25, flusher.seconds_left()))
            except queue.Empty:
                item = None
            if item is _END:
                flusher.flush()
                return True
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                flusher.add(item)
            if flusher.due():
                flusher.flush()
    except BaseException:
        before_shutdown(stop_pipeline)
        raise
    # no new work: the pipeline stops before Ray does (`shutdown_ray`), once the run is marked interrupted
    before_shutdown(stop_pipeline)
    return False


def _flush_on_stop(flusher: Flusher, results: queue.Queue, grace_s: float) -> None:
    """Write the rows already finished (waiting, or queued by the pipeline) within `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            item = results.get_nowait()
        except queue.Empty:
            break
        if item is not _END and not isinstance(item, BaseException):
            flusher.add(item)
    if not flusher.refs:
        return
    rows = flusher.rows
    try:
        written = flusher.flush(timeout=max(0.0, deadline - time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - stopping anyway: the resume redoes them
        log.warning("stopping: writing %d finished rows failed (%s); the resume audits them again", rows, exc)
        return
    if written:
        log.info("stopping: wrote the %d rows already finished", rows)
    else:
        log.warning("stopping: %d finished rows were not written within output.stop_grace_s=%g s; the resume "
                    "audits them again", rows, grace_s)
