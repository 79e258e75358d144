"""SIGINT and SIGTERM end a job cleanly: both raise KeyboardInterrupt in the main thread, so cleanup runs (the run
manifest is marked interrupted, the lease released), and the job exits 128 + the signal number (130, 143).

While the job streams results (`Signals.graceful`), the first signal only sets `Signals.stop`: the pipeline stops
awaiting new rows, writes those already finished within ``output.stop_grace_s`` and then raises
KeyboardInterrupt itself. A second signal raises at once. `eagle.pipeline.ray_setup.init_ray` puts these
handlers back after ``ray.init`` (which installs its own SIGTERM handler)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Signals:
    """Which signal ended the job, if any; `stop` is set by the first one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stop = threading.Event()
        self._graceful = 0

    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        """Inside, the first signal sets `stop` and returns: the code inside checks it and stops by itself."""
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.stop.is_set()
        self.received = signum
        self.stop.set()
        if first and self._graceful:
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_signals() -> Signals:
    """Route SIGINT and SIGTERM to KeyboardInterrupt; returns what records which arrived."""
    caught = Signals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, caught._handle)
    return caught
