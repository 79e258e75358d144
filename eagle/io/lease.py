"""One writer per output: a lease object in the output store that a driver (or a maintenance run) holds while
it writes.

``{output}/_runs/_output.lease`` names its holder (host, pid, run id, a random token) and when it last renewed
it. Every change is a conditional write (`eagle.io.storage.write_if`): created only if absent (S3
``If-None-Match: *``; locally a hard link), renewed and taken over only if unchanged since it was read (S3
``If-Match`` on the ETag; locally a replace under a file lock). So of two drivers racing for the lease exactly one
gets it, whatever the run ids, and a holder that stalled past the TTL cannot overwrite its successor: its next
renewal fails, it marks itself lost (`OutputLease.lost`, `check()` raises `LeaseLost`) and calls `on_lost`.

Timing (``output.lease_ttl_s`` = TTL, default 45 s): the holder renews every TTL/3; a lease not renewed for a
TTL belongs to a dead driver and is taken over. A driver that finds the lease held waits up to
``output.lease_wait_s`` (default 90 s) for it to be released or to expire, then is refused (`LeaseHeld`, exit 2).
So a retry started right after a crash resumes within one TTL of the crash. The trade-off: a shorter TTL lets
retries start sooner, but a holder whose renewals all fail for a whole TTL (an object-store outage, a stalled
process) gives the lease up and its job exits 3; at 45 s that takes a stall of more than 30 s after the last
renewal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from eagle.config import ConfigError
from eagle.io import storage
from eagle.io.runs import RUNS_DIR
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

LEASE_NAME = "_output.lease"


class LeaseHeld(ConfigError):
    """Another driver holds the output (exit 2, nothing written)."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it stalled past the TTL) or could not be renewed for a whole TTL: it
    must stop writing (the job exits 3)."""


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    started_at: str
    renewed_at: str
    run_id: str = ""
    ttl_s: float = 0.0

    @classmethod
    def me(cls, run_id: str, ttl_s: float) -> Holder:
        now = _now().isoformat()
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now, run_id, ttl_s)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (ValueError, TypeError, KeyError):  # torn or foreign content: treated as expired
            return None

    def describe(self) -> str:
        return f"run {self.run_id or '?'}, pid {self.pid} on {self.host}, started {self.started_at}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def lease_uri(output: str) -> str:
    return storage.join(output, RUNS_DIR, LEASE_NAME)


def _lease_storage(cfg: StorageConfig | None, ttl_s: float) -> StorageConfig:
    """The job's storage settings with timeouts and attempts that fit in a TTL: one renewal must not block for
    minutes of retries while the lease expires."""
    cfg = cfg or StorageConfig()
    return cfg.model_copy(update={"max_attempts": min(cfg.max_attempts, 3),
                                  "connect_timeout_s": min(cfg.connect_timeout_s, max(ttl_s / 9, 0.5)),
                                  "read_timeout_s": min(cfg.read_timeout_s, max(ttl_s / 9, 1.0))})


@dataclass
class OutputLease:
    """The output's lease for `run_id`: `acquire()` (waits up to `wait_s`, then raises LeaseHeld), `check()`
    before each write or commit (raises LeaseLost), `release()`; a context manager too.

    `on_lost` is called once, from the renewal thread, when the lease is lost (the pipeline interrupts its main
    thread there, so a stalled driver stops writing as soon as it runs again)."""

    output: str
    run_id: str
    ttl_s: float
    cfg: StorageConfig | None = None
    wait_s: float = 0.0
    on_lost: Callable[[], None] | None = None
    holder: Holder = field(init=False)
    lost: str | None = field(init=False, default=None)  # why, once lost

    def __post_init__(self) -> None:
        self.uri = lease_uri(self.output)
        self.holder = Holder.me(self.run_id, self.ttl_s)
        self._store = _lease_storage(self.cfg, self.ttl_s)
        self._version: str | None = None
        self._renewed = 0.0  # time.monotonic() just before the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=1).encode()

    # ------------------------------------------------------------------------------------------ taking it
    def acquire(self) -> OutputLease:
        deadline = time.monotonic() + self.wait_s
        told = False
        while True:
            stamp = time.monotonic()
            self.holder.renewed_at = _now().isoformat()
            if (version := storage.write_if(self.uri, self._payload(), None, self._store)) is not None:
                return self._held(version, stamp)
            found = storage.read_versioned(self.uri, self._store)
            if found is None:
                continue  # released between our create and our read: try again
            data, version = found
            other = Holder.parse(data)
            if other is not None and other.token == self.holder.token:
                # our own write landed, its answer was lost and the retry met it: the lease is ours
                return self._held(version, stamp)
            ttl = max(other.ttl_s or self.ttl_s, 0.0) if other else 0.0
            age = (_now() - dt.datetime.fromisoformat(other.renewed_at)).total_seconds() if other else ttl
            if age >= ttl:
                log.warning("output %s: taking over the lease of a driver that stopped renewing it %.0f s ago (%s)",
                            self.output, age, other.describe() if other else "unreadable lease")
                stamp = time.monotonic()
                self.holder.renewed_at = _now().isoformat()
                if (new := storage.write_if(self.uri, self._payload(), version, self._store)) is not None:
                    return self._held(new, stamp)
                continue  # another driver took it first (or renewed it): look again
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeld(
                    f"output {self.output} is being written by another driver ({other.describe()}, last seen "
                    f"{age:.0f} s ago). Wait for it to finish; if that driver died, its lease expires "
                    f"{ttl - age:.0f} s from now (output.lease_ttl_s) and re-running this command then resumes "
                    f"the run (a driver waits up to output.lease_wait_s for it).")
            if not told:
                log.warning("output %s is held by another driver (%s, last seen %.0f s ago); waiting up to %.0f s "
                            "for it to finish or for its lease to expire", self.output, other.describe(), age, left)
                told = True
            time.sleep(max(0.05, min(ttl - age + 0.05, max(self.ttl_s / 9, 0.2), left)))

    def _held(self, version: str, stamp: float) -> OutputLease:
        self._version, self._renewed = version, stamp
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    # ------------------------------------------------------------------------------------------ holding it
    def _renew_loop(self) -> None:
        period = self.ttl_s / 3
        wait = period
        while not self._stop.wait(wait):
            wait = period if self.renew() else min(period, max(self.ttl_s / 15, 0.1))
            if self.lost:
                return

    def renew(self) -> bool:
        """One conditional renewal; False when it failed (retried soon) or the lease is lost."""
        if self.lost:
            return False
        stamp = time.monotonic()
        self.holder.renewed_at = _now().isoformat()
        payload = self._payload()
        try:
            new = storage.write_if(self.uri, payload, self._version, self._store)
            if new is None:  # changed since our last write: ours if our own retried write is what is there
                found = storage.read_versioned(self.uri, self._store)
                if found is not None and found[0] == payload:
                    new = found[1]
                else:
                    other = Holder.parse(found[0]) if found else None
                    self._lose(f"another driver took over the lease ({other.describe() if other else 'gone'})")
                    return False
        except Exception as exc:  # noqa: BLE001 - the store is failing: retried until a whole TTL has passed
            log.warning("output %s: could not renew the lease: %s", self.output, exc)
            if time.monotonic() - self._renewed >= self.ttl_s:
                self._lose(f"the lease could not be renewed for {self.ttl_s:.0f} s (output.lease_ttl_s): {exc}")
            return False
        self._version, self._renewed = new, stamp
        return True

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = why
        log.error("output %s: lease lost: %s; this driver stops writing", self.output, why)
        if self.on_lost is not None:
            self.on_lost()

    def check(self) -> None:
        """Raise LeaseLost unless this driver still holds the lease: call it before each write or commit. A
        driver whose last renewal is a whole TTL old may already have been taken over, so it counts as lost."""
        if not self.lost and self._version is not None and time.monotonic() - self._renewed >= self.ttl_s:
            self._lose(f"the lease was last renewed {time.monotonic() - self._renewed:.0f} s ago, more than "
                       f"output.lease_ttl_s ({self.ttl_s:.0f} s): another driver may hold it")
        if self.lost:
            raise LeaseLost(f"output {self.output}: {self.lost}")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (a conditional delete)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._version is not None and not self.lost:
            try:
                storage.remove_if(self.uri, self._version, self._store)
            except Exception as exc:  # noqa: BLE001 - it expires after a TTL anyway
                log.warning("output %s: could not release the lease (%s); it expires in %.0f s", self.output, exc,
                            self.ttl_s)
        self._version = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

