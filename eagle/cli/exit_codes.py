"""Exit codes of the jobs, in one table: each job's ``--help`` and docs/JOBS.md show it from here (the README
sums it up by code)."""

from __future__ import annotations

import logging
import textwrap

OK = 0
SOME_FAILED = 1
USAGE = 2
JOB_FAILED = 3
BUSY = 4
SIGINT = 130
SIGTERM = 143

_MISTAKE = ("a mistake found before any work (arguments, config file, missing, empty or unreadable input, "
            "unwritable output, missing model store, expert, MLLM, weights, backbone or credentials): one message "
            "says what to do; nothing is written")
_INTERRUPTED = ("interrupted by {signal}; rows already finished are written (output.stop_grace_s), the run manifest "
                "says interrupted and the last line is the resume command")

EXIT_CODES: dict[str, dict[int, str]] = {
    "inspect": {
        OK: "success (individual bad images are error rows, not failures)",
        USAGE: _MISTAKE + "; or another driver still holds the output after output.lease_wait_s",
        JOB_FAILED: "job-level failure: storage unreachable, a local Ray that would not start (after "
                    "ray.start_attempts) or a cluster out of reach, an error rate above output.max_error_rate, or "
                    "the output's lease lost to another driver (this one stalled past output.lease_ttl_s)",
        SIGINT: _INTERRUPTED.format(signal="SIGINT (Ctrl-C)"),
        SIGTERM: _INTERRUPTED.format(signal="SIGTERM"),
    },
    "fit": {
        OK: "every product fitted",
        SOME_FAILED: "some products failed (each listed with its error); the others are fitted",
        USAGE: _MISTAKE,
        JOB_FAILED: "data root or model store unreachable, or a local Ray that would not start",
        SIGINT: "interrupted by SIGINT (Ctrl-C); products already fitted stay fitted, the same command fits again",
        SIGTERM: "interrupted by SIGTERM; as for SIGINT",
    },
    "evaluate": {
        OK: "success",
        USAGE: "bad arguments or nothing to evaluate (no rows, unknown run, no test images)",
        JOB_FAILED: "storage failure",
    },
    "latest": {OK: "success", USAGE: "bad arguments (--to inside --output)"},
    "maintain": {
        OK: "compacted, expired and cleaned (or nothing to do)",
        USAGE: "bad arguments or config, or the output does not exist",
        JOB_FAILED: "storage or catalog failure, or the output's lease lost; nothing is lost, the next run finishes",
        BUSY: "a driver holds the output (after waiting output.lease_wait_s): nothing was changed; run it later",
        SIGINT: "interrupted; nothing is lost, the next run finishes what it left",
    },
}


def failed(exc: BaseException, log: logging.Logger) -> int:
    """One message for a job that stops on `exc`, and its exit code: USAGE for a mistake in the arguments or
    the config (ValueError, ConfigError among them), JOB_FAILED for anything else."""
    if isinstance(exc, ValueError):
        log.error("%s", exc)
        return USAGE
    log.error("job failed: %s", exc)
    return JOB_FAILED


def help_text(job: str) -> str:
    """The exit-code table of `job` for its ``--help``."""
    return "Exit codes:\n" + "\n".join(textwrap.fill(f"  {code:>3}  {text}", 110, subsequent_indent=" " * 7)
                                       for code, text in EXIT_CODES[job].items())


def markdown() -> str:
    """Every job's exit codes as one Markdown table, for docs/JOBS.md."""
    lines = ["| job | exit code | meaning |", "| --- | --- | --- |"]
    lines += [f"| `jobs/{job}.py` | {code} | {text} |" for job, codes in EXIT_CODES.items()
              for code, text in codes.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
