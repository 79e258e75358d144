#!/usr/bin/env python3
"""Run one Ray job to its end from a Kubernetes Job's pod: one live driver per Kubernetes Job, and an exit
status that is the Ray job's final status. Standard library only; it drives the `ray job` CLI.

    python infra/run_ray_job.py --address http://HEAD:8265 --submission-id "$JOB_NAME" [--max-attempts 3] \\
        [--working-dir /app] -- python jobs/inspect.py ...

Why not plain `ray job submit`: it exits 0 when the job ends STOPPED and when its log stream closes while the job
still runs, and a retried pod that submits again starts a second driver next to the first.

* Submission ids are derived from --submission-id (the Kubernetes Job's name) alone: ID for the first Ray
  attempt, ID-r2, ID-r3, ... for later ones, so every pod of one Kubernetes Job computes the same ids, and the
  Ray job server refuses a second submission under an id it already has.
* On start every attempt id is looked up. One PENDING or RUNNING: reattach to it (follow its logs, poll its
  status), never submit. One SUCCEEDED: exit 0. Otherwise (all FAILED/STOPPED or unknown to the cluster):
  submit the first unused id, so a Ray job is retried only after the previous one has ended. All --max-attempts
  ids used and none succeeded: exit 4 without submitting.
* A submit that fails on the client side (its reply lost, the head briefly unreachable) is followed by a look-up
  of the same id: reattach if the server has it, else submit again under the same id.
* The outcome comes from polling `ray job status` until the status is terminal; the followed log stream only
  feeds the pod's log, and its end proves nothing. Exit 0 only for SUCCEEDED.
* SIGTERM or SIGINT (the Job's activeDeadlineSeconds, deletion, eviction): `ray job stop` the current attempt
  (waiting for it to stop), then exit 143, so no driver outlives its Kubernetes Job.

Exit status: the driver's own exit code when the Ray job ended FAILED (Ray's status message says "failed with
exit code N": jobs/inspect.py's 2 for a mistake stays 2, so a podFailurePolicy can fail the Job without
retrying it, 3 for a job failure stays 3 and is retried, 130/143 for an interrupted driver stay; a driver killed
by signal N gives 128+N), 1 for a FAILED job without a driver exit code (its runtime env could not be set up,
say), 0 SUCCEEDED, 143 STOPPED (`ray job stop`: the driver was interrupted, the run resumes) or terminated
itself, 4 attempts used up, 5 no answer from the job server for too long (the Ray job may still run: a retried
pod reattaches to it) or a submission it keeps refusing; 2 also for the wrapper's own usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time

LIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 143}
EXIT_EXHAUSTED, EXIT_UNREACHABLE, EXIT_TERMINATED = 4, 5, 143
SUBMIT_TRIES = 5  # a submit the server keeps refusing (a bad runtime env, say) is not worth an hour of retries

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What `ray job status` (Ray 2.60, ray/dashboard/modules/job/cli.py: _log_job_status) prints for each status.
_STATUS_LINES = [
    (re.compile(r"Status for job '(?P<id>[^']*)': (?P<status>[A-Z]+)"), None),
    (re.compile(r"Job '(?P<id>[^']*)' succeeded"), "SUCCEEDED"),
    (re.compile(r"Job '(?P<id>[^']*)' failed"), "FAILED"),
    (re.compile(r"Job '(?P<id>[^']*)' was stopped"), "STOPPED"),
]


# Ray 2.60 (ray/dashboard/modules/job/job_supervisor.py) for a driver that exited non-zero, in the status message.
_DRIVER_EXIT = re.compile(r"Job entrypoint command failed with exit code (-?\d+)")


def driver_exit_code(output: str) -> int | None:
    """The driver's exit code in a `ray job status` output of a FAILED job (a signal N: 128+N), or None."""
    m = _DRIVER_EXIT.search(_ANSI.sub("", output))
    if m is None:
        return None
    code = int(m.group(1))
    return 128 - code if code < 0 else code


class Terminated(Exception):
    """SIGTERM/SIGINT arrived."""


class Unreachable(Exception):
    """The job server did not answer for too long."""


def log(msg: str) -> None:
    print(f"[run_ray_job] {msg}", file=sys.stderr, flush=True)


def parse_status(submission_id: str, returncode: int, output: str) -> tuple[str, str | None]:
    """Read one `ray job status` call: ("status", S), ("missing", None) or ("error", None).

    "missing" only for the server's own answer that the id does not exist (HTTP 404 "Job X does not exist"),
    never for a client-side failure, which could hide a job that exists."""
    text = _ANSI.sub("", output)
    if returncode == 0:
        first = None
        for pattern, status in _STATUS_LINES:
            for m in pattern.finditer(text):
                if m.group("id") == submission_id and (first is None or m.start() < first[0]):
                    first = (m.start(), status or m.group("status"))
        if first and first[1] in LIVE + TERMINAL:
            return "status", first[1]
        return "error", None
    if re.search(r"status code 404\b.*\bJob \S+ does not exist", text):
        return "missing", None
    return "error", None


def attempt_ids(base: str, max_attempts: int) -> list[str]:
    return [base] + [f"{base}-r{k}" for k in range(2, max_attempts + 1)]


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.current: str | None = None  # the attempt this pod submitted or attached to
        self.follower: subprocess.Popen | None = None
        self.last_status_output = ""  # of the last `ray job status` call (its message holds a driver's exit code)

    # ------------------------------------------------------------------ the CLI
    def ray(self, *argv: str, timeout: float = 120) -> tuple[int, str]:
        cmd = ["ray", "job", argv[0], "--address", self.args.address, *argv[1:]]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return 124, f"`{shlex.join(cmd)}` timed out after {timeout:.0f}s"
        return proc.returncode, proc.stdout

    def lookup(self, sid: str) -> tuple[str, str | None]:
        rc, out = self.ray("status", sid)
        kind, status = parse_status(sid, rc, out)
        self.last_status_output = out
        if kind == "error":
            log(f"`ray job status {sid}` failed (rc {rc}): {_last_line(out)}")
        return kind, status

    def backoff(self, failures: int) -> None:
        time.sleep(min(self.args.poll_interval * 2 ** min(failures, 4), 300))

    def status(self, sid: str) -> str | None:
        """The status of `sid`, None if the cluster does not know it; retries client errors."""
        for failures in range(self.args.max_client_errors + 1):
            kind, status = self.lookup(sid)
            if kind != "error":
                return status
            self.backoff(failures)
        raise Unreachable(f"no answer about {sid} from {self.args.address}")

    # ------------------------------------------------------------------ the steps
    def run(self) -> int:
        ids = attempt_ids(self.args.submission_id, self.args.max_attempts)
        seen = {sid: self.status(sid) for sid in ids}
        log("attempts: " + ", ".join(f"{sid}={seen[sid] or 'unused'}" for sid in ids))
        live = [sid for sid in ids if seen[sid] in LIVE]
        if live:
            log(f"reattaching to {live[0]} ({seen[live[0]]}); not submitting")
            return self.finish(live[0], self.attach(live[0]))
        done = [sid for sid in ids if seen[sid] == "SUCCEEDED"]
        if done:
            log(f"{done[0]} already SUCCEEDED; nothing to do")
            return 0
        unused = [sid for sid in ids if seen[sid] is None]
        if not unused:
            log(f"all {len(ids)} attempts ended without success ({', '.join(seen.values())}); not submitting again")
            return EXIT_EXHAUSTED
        return self.finish(unused[0], self.submit_and_attach(unused[0]))

    def submit_and_attach(self, sid: str) -> str:
        self.current = sid
        for failures in range(min(self.args.max_client_errors + 1, SUBMIT_TRIES)):
            extra = ["--working-dir", self.args.working_dir] if self.args.working_dir else []
            rc, out = self.ray("submit", "--submission-id", sid, "--no-wait", *extra, "--", *self.args.entrypoint,
                               timeout=600)
            if rc == 0:
                log(f"submitted {sid}")
                return self.attach(sid)
            log(f"`ray job submit {sid}` failed (rc {rc}): {_last_line(out)}")
            # The server may have taken it (the reply was lost) or another pod may have: look before resubmitting.
            status = self.status(sid)
            if status is not None:
                log(f"{sid} exists on the cluster ({status}); attaching instead of submitting again")
                return self.attach(sid)
            self.backoff(failures)
        raise Unreachable(f"could not submit {sid} to {self.args.address}")

    def attach(self, sid: str) -> str:
        """Follow the logs of `sid` and poll its status until it is terminal; return that status."""
        self.current = sid
        self.follower = subprocess.Popen(["ray", "job", "logs", "--address", self.args.address, "--follow", sid])
        said_closed = False
        errors = 0
        while True:
            kind, status = self.lookup(sid)
            if kind == "status":
                errors = 0
                if status in TERMINAL:
                    self.stop_follower(grace=10)
                    return status
                if self.follower.poll() is not None and not said_closed:
                    log(f"log stream of {sid} closed while the job is {status}; polling its status "
                        f"(logs: ray job logs {sid})")
                    said_closed = True
            elif kind == "missing":
                # The cluster lost it (a head restart without GCS fault tolerance): the driver is gone with it.
                self.stop_follower(grace=0)
                log(f"{sid} is no longer known to the cluster; its driver is gone")
                return "FAILED"
            else:
                errors += 1
                if errors > self.args.max_client_errors:
                    self.stop_follower(grace=0)
                    raise Unreachable(f"no status for {sid} from {self.args.address}")
            time.sleep(self.args.poll_interval)

    def finish(self, sid: str, status: str) -> int:
        code = driver_exit_code(self.last_status_output) if status == "FAILED" else None
        log(f"Ray job {sid} ended {status}" + (f" (driver exit code {code})" if code is not None else ""))
        return EXIT[status] if code is None or code == 0 else code

    def stop_follower(self, grace: float) -> None:
        if self.follower is None or self.follower.poll() is not None:
            return
        try:
            self.follower.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.follower.terminate()
            try:
                self.follower.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.follower.kill()

    def terminate(self) -> int:
        self.stop_follower(grace=0)
        if self.current:
            log(f"terminated: stopping Ray job {self.current}")
            rc, out = self.ray("stop", self.current, timeout=self.args.stop_timeout)
            if rc != 0:
                log(f"`ray job stop {self.current}` failed (rc {rc}): {_last_line(out)}")
        return EXIT_TERMINATED


def _last_line(text: str) -> str:
    lines = [line for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the job server, e.g. http://eagle-audit-head-svc:8265")
    p.add_argument("--submission-id", required=True, help="base submission id: the Kubernetes Job's name")
    p.add_argument("--max-attempts", type=int, default=3, help="Ray job attempts per Kubernetes Job (backoffLimit+1)")
    p.add_argument("--working-dir", help="passed to `ray job submit --working-dir`")
    p.add_argument("--poll-interval", type=float, default=float(os.environ.get("RUN_RAY_JOB_POLL_S", "30")),
                   help="seconds between status polls (and the base of the retry back-off)")
    p.add_argument("--max-client-errors", type=int, default=20,
                   help="consecutive failed CLI calls tolerated before giving up (exit 5)")
    p.add_argument("--stop-timeout", type=float, default=40, help="seconds to wait for `ray job stop` on SIGTERM")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command")
    args = p.parse_args(argv)
    if args.entrypoint[:1] == ["--"]:
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        p.error("no entrypoint (give it after --)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.submission_id):
        p.error(f"--submission-id {args.submission_id!r}: expected the Kubernetes Job's name")
    if args.max_attempts < 1:
        p.error("--max-attempts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runner = Runner(args)

    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return runner.run()
    except Terminated as exc:
        log(f"received {exc}")
        return runner.terminate()
    except Unreachable as exc:
        runner.stop_follower(grace=0)
        log(f"giving up: {exc}; a retried pod reattaches to a job that still runs")
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
