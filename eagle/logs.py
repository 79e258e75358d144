"""Logging for jobs: one format, and a filter that masks credentials wherever they would appear."""

from __future__ import annotations

import logging
import os

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
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
