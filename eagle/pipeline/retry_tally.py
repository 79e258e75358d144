"""Object-store retries of a whole job: every process of it (the driver, decode and write tasks, the actors)
tells one small actor of the job, per kind, about each failed request, so the summary shows throttling before
it becomes failure.

Importing `eagle.pipeline` (which every worker of the job does to run a stage or write its files) turns the
forwarding on; without a tally (no Ray, or none started by the driver) failures are only counted locally.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from eagle.io import storage

log = logging.getLogger(__name__)

_NAME = "eagle-storage-retries"  # one per Ray namespace: each job (driver) has its own
_handle: list[Any] = []  # the tally this process forwards to, once found
_lookup = threading.Lock()


class _Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def get(self) -> dict[str, int]:
        return dict(self.counts)


_owned: dict[str, Any] = {}  # the tally this driver made, per Ray job: Ray ends an actor nobody refers to


def start_tally() -> Any:
    """The job's tally actor (made on first use and kept for the driver's life; the driver calls this before
    any work is sent out), or None when it cannot be had: counting never stops a job."""
    import ray

    job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    if job not in _owned:
        try:
            _owned[job] = ray.remote(_Tally).options(name=_NAME, get_if_exists=True, num_cpus=0,
                                                     max_restarts=-1).remote()
        except Exception as exc:  # noqa: BLE001
            log.warning("storage retries will not be counted for this job: %s", exc)
            return None
    return _owned[job]


def read_tally(tally: Any) -> dict[str, int]:
    """Failed requests per kind (read, list, write) the tally has heard of so far (zeros without one)."""
    import ray

    counts: dict[str, int] = {}
    if tally is not None:
        try:
            counts = ray.get(tally.get.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the tally died or hangs: report what is known, not fail
            log.warning("could not read the storage retry count: %s", exc)
    return {kind: counts.get(kind, 0) for kind in ("read", "list", "write")}


def _forward(kind: str) -> None:
    ray = sys.modules.get("ray")  # never import Ray from inside the S3 client's event loop
    if ray is None or not ray.is_initialized():
        return
    with _lookup:
        if not _handle:
            try:
                _handle.append(ray.get_actor(_NAME))
            except ValueError:  # no tally (yet): counted locally only
                return
    try:
        _handle[0].add.remote(kind)
    except Exception:  # noqa: BLE001 - a tally of an earlier Ray session: look it up again next time
        _handle.clear()


def forward_storage_retries() -> None:
    """Send this process's failed object-store requests to the job's tally (idempotent)."""
    storage.add_retry_listener(_forward)
