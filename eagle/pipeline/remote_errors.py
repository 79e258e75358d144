"""What an error raised in a Ray worker was, under Ray's wrappers: the one place that unwraps them.

A remote error reaches the driver as a `RayTaskError`/`ActorDiedError` whose text carries the worker's
traceback. `remote_cause` follows the exception chain to the innermost error (to classify it: a storage
failure is an `OSError`); `remote_message` is its last line of text (for a row's `error` or a log line), which
is all that an `ActorDiedError` keeps."""

from __future__ import annotations


def remote_cause(exc: BaseException) -> BaseException:
    """The innermost error under Ray's wrappers (task errors, user-code exceptions)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def remote_message(exc: BaseException) -> str:
    """The last line of an error's text: under the traceback Ray puts in a remote error, the error itself."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else ""
