"""Logging for jobs: one format, a filter that masks credentials wherever they would appear, and quiet logs
for schedulers (no colour codes in files, no library deprecation noise, Ray's detail at WARNING)."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any, TextIO

from eagle.io.storage import SECRET_ENV_VARS

_SECRET_VARS = (*SECRET_ENV_VARS, "HF_TOKEN")


def secret_values(extra: list[str] | None = None) -> list[str]:
    """Credential values known to this process (environment plus `extra`), longest first."""
    values = [os.environ.get(v, "") for v in _SECRET_VARS] + list(extra or [])
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def redact(text: str, extra: list[str] | None = None) -> str:
    for value in secret_values(extra):
        text = text.replace(value, "***")
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message with credentials masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """One line per record on stderr, credentials masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_quiet = False  # set by quiet_job
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Set for this process and the Ray workers it starts (they inherit the environment; eagle.pipeline.ray_setup
# forwards them to a cluster): Ray's log prefixes uncoloured, no download/loading bars, no library warnings.
QUIET_ENV = {"RAY_COLOR_PREFIX": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


class PlainText:
    """A text stream that drops ANSI escape codes (colours, cursor moves) before writing to the one it wraps."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(_ANSI.sub("", text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def quiet_job(verbose: bool = False) -> None:
    """What a job's entry point calls first, before Ray starts: unless `verbose`, library deprecation warnings
    are ignored (here and in the workers), Ray's own loggers speak at WARNING (`ray_logging_level`,
    `quiet_ray_loggers`), and colour codes are dropped from stdout/stderr when they are not terminals.
    Warnings from eagle's own code stay."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!eagle\b)")
    global _quiet
    _quiet = True
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, PlainText) and not stream.isatty():
            setattr(sys, name, PlainText(stream))


def ray_logging_level() -> int:
    """The level ``ray.init(logging_level=...)`` gives Ray's logger: WARNING in a quiet job."""
    return logging.WARNING if _quiet else logging.INFO


def quiet_ray_loggers() -> None:
    """After ``ray.init``: Ray Data's logger at WARNING too in a quiet job. Ray Data sets its loggers' levels
    when it is first imported, so it is imported first (else its INFO lines, "execution finished", could follow
    an interrupted run's last line, the resume command)."""
    if _quiet:
        import ray.data  # noqa: F401 - its import configures its loggers: before the levels are set here
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
