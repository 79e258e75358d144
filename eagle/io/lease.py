"""One driver per run id: a lease object in the output store that the driver holds while it runs.

``{output}/_runs/{run_id}.lease`` is created with a conditional write (S3 ``If-None-Match: *``; O_EXCL
locally), so of two drivers started on the same run id exactly one gets it; the other is refused with the
holder's identity and start time. The holder renews it every third of ``output.lease_ttl_s``; a lease not
renewed for a whole TTL belongs to a crashed driver and is taken over, so a resume after a crash works once
the TTL has passed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass

from eagle.config import ConfigError
from eagle.io import storage
from eagle.io.runs import RUNS_DIR
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """Another driver holds this run id (a user mistake: exit 2, nothing written)."""


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    started_at: str
    renewed_at: str

    @classmethod
    def me(cls) -> Holder:
        now = dt.datetime.now(dt.UTC).isoformat()
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunLease:
    """Acquire with `acquire()` (raises LeaseHeld), give back with `release()`; usable as a context manager."""

    def __init__(self, output: str, run_id: str, ttl_s: float, cfg: StorageConfig | None = None) -> None:
        self.uri = storage.join(output, RUNS_DIR, f"{run_id}.lease")
        self.run_id, self.ttl_s, self.cfg = run_id, ttl_s, cfg
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=1).encode()

    def acquire(self) -> RunLease:
        if not storage.create_exclusive(self.uri, self._payload(), self.cfg):
            other = self._read()
            if other is not None and other.token == self.holder.token:
                # our own create landed, but its answer was lost and the retry found it: the lease is ours
                return self._start_renewing()
            age = (_now() - dt.datetime.fromisoformat(other.renewed_at)).total_seconds() if other else None
            if other is not None and age is not None and age < self.ttl_s:
                raise LeaseHeld(
                    f"run {self.run_id} is being run by another driver (pid {other.pid} on {other.host}, started "
                    f"{other.started_at}, last seen {age:.0f} s ago). Wait for it to finish, or use another "
                    f"--run-id; if that driver died, its lease expires {self.ttl_s - age:.0f} s from now "
                    f"(output.lease_ttl_s) and re-running this command then resumes the run.")
            log.warning("run %s: taking over the lease of a driver that stopped renewing it (%s)", self.run_id,
                        f"pid {other.pid} on {other.host}" if other else "unreadable lease")
            storage.remove(self.uri, self.cfg)
            if not storage.create_exclusive(self.uri, self._payload(), self.cfg):
                raise LeaseHeld(f"run {self.run_id}: another driver took the expired lease first")
        return self._start_renewing()

    def _start_renewing(self) -> RunLease:
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(storage.read_bytes(self.uri, self.cfg)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # torn or foreign content: treat as expired
            return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self.holder.renewed_at = _now().isoformat()
            try:
                storage.write_bytes(self.uri, self._payload(), self.cfg)
            except Exception as exc:  # noqa: BLE001 - retried at the next tick; the TTL leaves room
                log.warning("run %s: could not renew the lease: %s", self.run_id, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current.token == self.holder.token:
            storage.remove(self.uri, self.cfg)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
