"""What every stage shares, in the manner of Ray's batch stages (``StatefulStageUDF``): a stage declares the
columns it requires and produces (each described once, in `COLUMNS`) and how it runs, and writes only its
per-batch work (`process`).

The base class owns the plumbing: checking the declared columns (the inputs on every batch; the outputs on every
row the stage processed and did not fail), column batch ↔ row dicts (Ray's "numpy" batch format; object arrays
so ragged images and nested values survive), passing rows that already failed through untouched (every input
image leaves the pipeline as exactly one row), filling declared defaults, batch-then-one-by-one fault isolation
(`in_chunks`), throughput logging, and the ``map_batches`` arguments it runs under (`apply`, sized by the
``resources.<sized_by>`` entry of the config).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from eagle.config import JobConfig, StageResources
from eagle.findings import Box
from eagle.io import schema
from eagle.pipeline.ray_setup import ray_options

log = logging.getLogger("eagle.progress")

Row = dict[str, Any]
Batch = dict[str, np.ndarray]
R = TypeVar("R")


# Every column a stage requires, produces or drops, described once: the output table's (`eagle.io.schema`) and
# those that travel only between stages.
COLUMNS: dict[str, str] = {name: text for name, _, text in schema.COLUMNS} | {
    "expert_input": "The expert's model input, made by the decode task: the image resized and center-cropped as "
                    "the product's pinned artifact says, uint8 crop x crop x 3.",
    "boxes_json": "The regions as a JSON list of boxes (Ray's numpy batches mangle ragged lists of dicts); the "
                  "stamp stage turns it into `boxes`.",
    "expert_members_json": "Each expert that scored the image as JSON; the stamp stage turns it into "
                           "`expert_members`.",
}


class StageContractError(KeyError):
    """A stage's columns are not what it declares (a batch lacks one it requires, or a row leaves without one it
    produces): the pipeline is wired wrongly (a bug, not a bad image)."""


def rows_of(batch: Batch) -> list[Row]:
    """Column batch → list of row dicts. A column Ray Data hands over as all-NaN floats was all None (Ray turns
    an all-null Arrow column into NaNs): its values are None again, so a block where it is null and one where it
    holds strings still combine into one batch."""
    n = len(next(iter(batch.values()))) if batch else 0
    columns = {k: [None] * n if _all_nan(v) else v for k, v in batch.items()}
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _all_nan(values: np.ndarray) -> bool:
    return values.dtype.kind == "f" and len(values) > 0 and bool(np.isnan(values).all())


def batch_of(rows: Sequence[Row], columns: Sequence[str]) -> Batch:
    """List of row dicts → column batch (object arrays, so ragged images and nested lists survive)."""
    out: Batch = {}
    for col in columns:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(col) for r in rows]
        out[col] = arr
    return out


def boxes_of(row: Row) -> list[Box]:
    """The row's boxes. Between stages they travel as a JSON string: Ray's numpy batches mangle ragged
    lists of dicts (an empty list comes back as an empty array, a missing one as NaN)."""
    text = row.get("boxes_json")
    return [Box(**b) for b in json.loads(text)] if isinstance(text, str) else []


def set_boxes(row: Row, boxes: list[Box]) -> None:
    row["boxes_json"] = json.dumps([b.as_dict() for b in boxes])


def fail(row: Row, stage: str, message: str) -> None:
    """Mark a row as an error of `stage` (first error wins)."""
    if row.get("status") != "error":
        row.update(status="error", error=message[:2000], error_stage=stage)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Throughput:
    """Logs a stage's images/s every `interval` seconds from the worker (Ray forwards it to the driver log)."""

    def __init__(self, stage: str, interval: float = 30.0) -> None:
        self.stage, self.interval = stage, interval
        self.count, self.busy = 0, 0.0
        self._last = time.monotonic()

    def add(self, images: int, seconds: float) -> None:
        self.count += images
        self.busy += seconds
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s worker %d: %d images, %.2f images/s while busy", self.stage, os.getpid(), self.count,
                     self.count / self.busy if self.busy else 0.0)


_throughput: dict[str, Throughput] = {}  # per worker process and stage (task stages are rebuilt per batch)


class Stage:
    """One Ray Data stage. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str]
    sized_by: ClassVar[str]  # the ``cfg.resources`` entry that sizes and places it: decode, expert, mllm or finish
    actor: ClassVar[bool] = False  # `apply` runs it as an actor pool (heavy state loaded once), else as tasks
    whole_blocks: ClassVar[bool] = False  # one batch per Ray block instead of resources.<sized_by>.batch_size
    requires: ClassVar[tuple[str, ...]] = ()  # input columns; checked on every batch
    produces: ClassVar[tuple[str, ...]] = ()  # columns it adds or sets; checked on every row it did not fail
    drops: ClassVar[tuple[str, ...]] = ()  # columns that do not travel further
    defaults: ClassVar[dict[str, Any]] = {}  # produced values for rows `process` does not set (failed rows)
    skip_failed: ClassVar[bool] = True  # rows with status 'error' pass through untouched

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.sizing: StageResources = getattr(cfg.resources, self.sized_by)
        self.throughput = _throughput.setdefault(self.name, Throughput(self.name))

    def process(self, rows: list[Row]) -> None:
        """The stage's work on one batch: fill each row's produced columns in place, or `fail` it."""
        raise NotImplementedError

    def emit(self, rows: list[Row], columns: list[str]) -> Any:
        """The batch handed to the next stage (a column batch; the last stage returns an Arrow table)."""
        return batch_of(rows, columns)

    def __call__(self, batch: Batch) -> Any:
        missing = [c for c in self.requires if c not in batch]
        if missing:
            raise StageContractError(f"{self.name} stage needs columns {missing}; the batch has {sorted(batch)}")
        start = time.perf_counter()
        rows = rows_of(batch)
        for row in rows:
            for key, value in self.defaults.items():
                row.setdefault(key, value)
        work = [r for r in rows if r.get("status") != "error"] if self.skip_failed else rows
        if work:
            failed_before = [r.get("status") == "error" for r in work]
            self.process(work)
            self._check_produced(r for r, before in zip(work, failed_before, strict=True)
                                 if before or r.get("status") != "error")
        self.throughput.add(len(rows), time.perf_counter() - start)
        columns = [c for c in dict.fromkeys([*batch, *self.produces]) if c not in self.drops]
        return self.emit(rows, columns)

    def _check_produced(self, rows: Iterable[Row]) -> None:
        """Every produced column is set (by `process` or `defaults`) on each row the stage did not fail; a row it
        failed carries None in the columns it never reached."""
        for row in rows:
            missing = [c for c in self.produces if c not in row]
            if missing:
                raise StageContractError(f"{self.name} stage declares columns {missing} but left them unset on row "
                                         f"{row.get('image_uri')!r}")

    def in_chunks(self, rows: list[Row], size: int, run: Callable[[list[Row]], Sequence[R]],
                  apply: Callable[[Row, R, float], None], failed: Callable[[Row, BaseException], None]) -> None:
        """Fault isolation shared by the model stages: `run` each chunk of `size` rows at once; when a chunk
        raises, `run` its rows one by one so only the rows that fail alone get `failed`. `apply` receives each
        result and the chunk's milliseconds per row."""
        for i in range(0, len(rows), size):
            chunk = rows[i:i + size]
            start = time.perf_counter()
            try:
                results: Sequence[R] | None = run(chunk)
            except Exception:  # noqa: BLE001 - retried one by one below
                results = None
            ms = (time.perf_counter() - start) * 1000.0 / len(chunk)
            for j, row in enumerate(chunk):
                try:
                    apply(row, results[j] if results is not None else run([row])[0], ms)
                except Exception as exc:  # noqa: BLE001 - this row's failure, recorded on the row
                    failed(row, exc)

    @classmethod
    def apply(cls, ds: Any, cfg: JobConfig, **kwargs: Any) -> Any:
        """``ds.map_batches`` with this stage, sized and placed by ``cfg.resources.<sized_by>``."""
        res = getattr(cfg.resources, cls.sized_by)
        args = {**ray_options(res, cls.actor), "batch_format": "numpy",
                "batch_size": None if cls.whole_blocks else res.batch_size}
        if cls.actor:
            with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60 (ray_options)
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                return ds.map_batches(cls, fn_constructor_kwargs={"cfg": cfg, **kwargs}, **args)
        return ds.map_batches(_task_of(cls), fn_kwargs={"cfg": cfg, "kwargs": kwargs}, **args)


def _task_of(stage: type[Stage]) -> Callable[..., Any]:
    """A stateless stage as a Ray task function, named after the stage (Ray names the operator after it):
    the stage is built per batch (its constructor is cheap)."""

    def run(batch: Batch, cfg: JobConfig, kwargs: dict[str, Any]) -> Any:
        return stage(cfg, **kwargs)(batch)

    run.__name__ = run.__qualname__ = stage.__name__
    return run
