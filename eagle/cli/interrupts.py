"""SIGINT and SIGTERM end a job cleanly: both raise KeyboardInterrupt in the main thread, so cleanup runs (the run
manifest is marked interrupted, the lease released), and the job exits 128 + the signal number (130, 143)."""

from __future__ import annotations

import signal
from types import FrameType


class Signals:
    """Which signal ended the job, if any."""

    def __init__(self) -> None:
        self.received: int | None = None

    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)


def catch_signals() -> Signals:
    """Route SIGINT and SIGTERM to KeyboardInterrupt; returns what records which arrived."""
    caught = Signals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, caught._handle)
    return caught
