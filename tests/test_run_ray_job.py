"""infra/run_ray_job.py, the re-audit CronJob's submit wrapper, run exactly as the CronJob runs it (its container
args under bash) against a fake `ray` CLI first on PATH that keeps Ray jobs in a JSON file and logs every call.
What it must guarantee: one live driver per Kubernetes Job (a retried pod reattaches, never submits a second one)
and an exit status that is the Ray job's final status, whatever `ray job submit` or the log stream say.
The fake prints what the real CLI prints; test_status_parser_reads_the_real_ray_cli holds the two together.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRONJOB = ROOT / "infra" / "kuberay" / "reaudit-cronjob.yaml"
JOB_NAME = "eagle-audit-reaudit-29000000"
ENTRYPOINT = ("python jobs/inspect.py --config /config/audit.yaml --mode incremental "
              f"--run-id {JOB_NAME}")

# The fake `ray` CLI. Per submission id a plan: "timeline", the statuses successive `ray job status` calls see
# (the last one stays); "exit_code": the driver's exit code a FAILED status reports; "logs": "follow" (the stream lasts until the job ends), "close_early" (it ends at once,
# the job still running) or "hang"; "submit": "ok", "lost_reply" (the server takes the job, the client gets a
# connection error) or "refused" (the server rejects it). "status_errors": that many next status calls fail on the client side.
FAKE_RAY = r'''#!{python}
import fcntl, json, os, sys, time

STATE = os.environ["FAKE_RAY_STATE"]
TS = "2026-01-01 02:00:00,000\t"


def status_text(sid, status, exit_code=None):
    if status == "SUCCEEDED":
        return f"{TS}SUCC cli.py:67 -- \x1b[32mJob '{sid}' succeeded\x1b[39m\n"
    if status == "FAILED":
        message = "boom" if exit_code is None else (f"Job entrypoint command failed with exit code {exit_code}, last "
                                                     "available logs (truncated to 20,000 chars):\nlast log line")
        return f"{TS}ERR cli.py:75 -- \x1b[31mJob '{sid}' failed\x1b[39m\n{TS}INFO cli.py:89 -- Status message: {message}\n"
    if status == "STOPPED":
        return f"{TS}WARN cli.py:85 -- \x1b[33mJob '{sid}' was stopped\x1b[39m\n"
    return f"{TS}INFO cli.py:92 -- Status for job '{sid}': {status}\n"


def missing(sid):
    return 1, f"RuntimeError: Request failed with status code 404: Job {sid} does not exist.\n"


def handle(st, argv):
    sub, rest = argv[1], argv[2:]
    address = rest[rest.index("--address") + 1]
    if sub == "submit":
        sid = rest[rest.index("--submission-id") + 1]
        if sid in st["jobs"]:
            return 1, (f"RuntimeError: Request failed with status code 400: Job with submission_id {sid} already "
                       "exists. Please use a different submission_id.\n"), None
        plan = st["plans"].get(sid, st["plans"]["*"])
        if plan.get("submit") == "refused":
            return 1, "RuntimeError: Request failed with status code 400: invalid runtime_env.\n", None
        st["jobs"][sid] = {"timeline": plan.get("timeline", ["PENDING", "RUNNING", "SUCCEEDED"]), "pos": 0,
                           "logs": plan.get("logs", "follow"), "stopped": False, "exit_code": plan.get("exit_code")}
        if plan.get("submit") == "lost_reply":
            return 1, f"ConnectionError: Failed to connect to Ray at address: {address}.\n", None
        return 0, f"{TS}SUCC cli.py:67 -- Job '{sid}' submitted successfully\n", None
    sid = rest[-1]
    job = st["jobs"].get(sid)
    if sub == "status":
        if st.get("status_errors", 0) > 0:
            st["status_errors"] -= 1
            return 1, f"ConnectionError: Failed to connect to Ray at address: {address}.\n", None
        if job is None:
            return (*missing(sid), None)
        status = "STOPPED" if job["stopped"] else job["timeline"][job["pos"]]
        job["pos"] = min(job["pos"] + 1, len(job["timeline"]) - 1)
        return 0, status_text(sid, status, job.get("exit_code")), None
    if job is None:
        return (*missing(sid), None)
    if sub == "logs":
        if job["logs"] == "follow":
            job["pos"] = len(job["timeline"]) - 1
        elif job["logs"] == "hang":
            return 0, f"log line of {sid}\n", 60
        return 0, f"log line of {sid}\n", None
    if sub == "stop":
        job["stopped"] = True
        return 0, status_text(sid, "STOPPED"), None
    return 2, f"fake ray: unknown command {argv}\n", None


with open(STATE + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(STATE) as f:
        st = json.load(f)
    st["calls"].append(sys.argv[1:])
    rc, out, sleep = handle(st, sys.argv[1:])
    with open(STATE, "w") as f:
        json.dump(st, f)
sys.stdout.write(out)
sys.stdout.flush()
if sleep:
    time.sleep(sleep)
sys.exit(rc)
'''


def _cron_script() -> str:
    cron = next(d for d in yaml.safe_load_all(CRONJOB.read_text()) if d and d["kind"] == "CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/bash", "-c"]
    return container["args"][0]


class FakeRay:
    def __init__(self, tmp_path: Path, plans: dict | None = None, status_errors: int = 0):
        self.bin = tmp_path / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.state = tmp_path / "ray-state.json"
        (self.bin / "ray").write_text(FAKE_RAY.replace("{python}", sys.executable, 1))
        (self.bin / "ray").chmod(0o755)
        self.state.write_text(json.dumps({"plans": {"*": {}, **(plans or {})}, "jobs": {}, "calls": [],
                                          "status_errors": status_errors}))

    def read(self) -> dict:
        with open(f"{self.state}.lock", "w") as lock:  # the fake CLIs write it under this lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            return json.loads(self.state.read_text())

    def write(self, state: dict) -> None:
        with open(f"{self.state}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.state.write_text(json.dumps(state))

    def calls(self, sub: str | None = None) -> list[list[str]]:
        return [c for c in self.read()["calls"] if sub is None or c[1] == sub]

    def submitted(self) -> list[str]:
        return [c[c.index("--submission-id") + 1] for c in self.calls("submit")]

    def start(self, **env) -> subprocess.Popen:
        """One pod: the CronJob's container args under bash, in the repository (the image's /app)."""
        path = f"{self.bin}:{Path(sys.executable).parent}:/usr/bin:/bin"
        return subprocess.Popen(["/bin/bash", "-c", _cron_script()], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={"PATH": path, "JOB_NAME": JOB_NAME, "FAKE_RAY_STATE": str(self.state),
                                     "RUN_RAY_JOB_POLL_S": "0.02", **env})

    def pod(self, **env) -> tuple[int, str]:
        proc = self.start(**env)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            _kill_group(proc)
        return proc.returncode, out


def _kill_group(proc: subprocess.Popen) -> None:
    try:  # fake CLIs left sleeping in the background, in the session started above
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- outcomes
def test_succeeded(tmp_path):
    ray = FakeRay(tmp_path)
    rc, out = ray.pod()
    assert rc == 0, out
    submit = ray.calls("submit")
    assert len(submit) == 1, out
    # A deterministic id (the Kubernetes Job's name), the image's code, the CronJob's entrypoint.
    assert ray.submitted() == [JOB_NAME]
    assert " ".join(submit[0]).endswith(f"--working-dir /app -- {ENTRYPOINT}")
    assert "--no-wait" in submit[0] and submit[0][submit[0].index("--address") + 1] == "http://eagle-audit-head-svc:8265"
    assert any(c[:2] == ["job", "logs"] and "--follow" in c for c in ray.calls()), "the pod log shows the job's"
    assert ray.calls("status")[-1][-1] == JOB_NAME
    assert "Ray job eagle-audit-reaudit-29000000 ended SUCCEEDED" in out


@pytest.mark.parametrize("final, driver, code", [
    ("FAILED", None, 1),  # no driver exit code (a runtime env that could not be set up, say)
    ("FAILED", 2, 2),  # a mistake in the config: the CronJob's podFailurePolicy does not retry it
    ("FAILED", 3, 3),  # a job failure: retried
    ("FAILED", 143, 143), ("FAILED", 130, 130),  # the driver was interrupted
    ("FAILED", -9, 137),  # the driver was SIGKILLed
    ("STOPPED", None, 143),  # `ray job stop`: interrupted (`ray job submit` exits 0 for it)
])
def test_failed_or_stopped_job_fails_the_pod_with_the_drivers_exit_code(tmp_path, final, driver, code):
    ray = FakeRay(tmp_path, {JOB_NAME: {"timeline": ["PENDING", "RUNNING", final], "exit_code": driver}})
    rc, out = ray.pod()
    assert rc == code, out
    assert ray.submitted() == [JOB_NAME]
    if driver is not None:
        assert f"ended FAILED (driver exit code {code})" in out


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_log_stream_closing_early_proves_nothing(tmp_path, final, code):
    """The log stream ends while the job still runs: keep polling the status to its real end."""
    timeline = ["RUNNING"] * 6 + [final]
    ray = FakeRay(tmp_path, {JOB_NAME: {"timeline": timeline, "logs": "close_early"}})
    rc, out = ray.pod()
    assert rc == code, out
    assert "log stream of eagle-audit-reaudit-29000000 closed while the job is RUNNING" in out
    # Each of the timeline's statuses was polled (the three unused attempt look-ups aside): the end was awaited.
    assert len([c for c in ray.calls("status") if c[-1] == JOB_NAME]) >= len(timeline) + 1
    assert ray.submitted() == [JOB_NAME]


# ---------------------------------------------------------------------------------------------- one driver
def test_lost_submit_reply_reattaches_under_the_same_id(tmp_path):
    """The server took the job but the client got an error: look it up, attach, do not submit again."""
    ray = FakeRay(tmp_path, {JOB_NAME: {"submit": "lost_reply"}})
    rc, out = ray.pod()
    assert rc == 0, out
    assert ray.submitted() == [JOB_NAME], "exactly one submission"
    assert "exists on the cluster" in out


def test_client_errors_then_retry_keep_the_same_id(tmp_path):
    """The head does not answer for a while: retry the look-ups, then submit under the same id once."""
    ray = FakeRay(tmp_path, status_errors=4)
    rc, out = ray.pod()
    assert rc == 0, out
    assert ray.submitted() == [JOB_NAME]


def test_refused_submit_is_retried_under_the_same_id_then_fails(tmp_path):
    ray = FakeRay(tmp_path, {JOB_NAME: {"submit": "refused"}})
    rc, out = ray.pod()
    assert rc == 5, out
    assert set(ray.submitted()) == {JOB_NAME} and 1 < len(ray.submitted()) <= 5


def test_retried_pod_reattaches_to_the_running_job(tmp_path):
    """A pod dies (node lost) while its Ray job runs; the Job's next pod reattaches instead of submitting."""
    ray = FakeRay(tmp_path, {JOB_NAME: {"timeline": ["PENDING", "RUNNING"], "logs": "hang"}})
    first = ray.start()
    try:
        _wait_for(lambda: ray.calls("submit") and len(ray.calls("status")) >= 5)
        os.killpg(first.pid, signal.SIGKILL)  # no SIGTERM, no clean-up: the Ray job keeps running
        first.wait(timeout=10)
    finally:
        _kill_group(first)
    state = ray.read()
    state["jobs"][JOB_NAME].update(timeline=["RUNNING", "RUNNING", "SUCCEEDED"], pos=0, logs="follow")
    ray.write(state)
    rc, out = ray.pod()
    assert rc == 0, out
    assert "reattaching to eagle-audit-reaudit-29000000 (RUNNING); not submitting" in out
    assert ray.submitted() == [JOB_NAME], "one driver for the Kubernetes Job"


def test_retried_pod_after_success_exits_zero_without_submitting(tmp_path):
    ray = FakeRay(tmp_path)
    assert ray.pod()[0] == 0
    rc, out = ray.pod()
    assert rc == 0, out
    assert ray.submitted() == [JOB_NAME]
    assert "already SUCCEEDED" in out


def test_retries_after_a_failure_use_the_next_attempt_id_and_stop_at_the_limit(tmp_path):
    """A failed Ray job fails the pod; the Job's retry submits attempt 2 (it resumes the run: same --run-id),
    and after --max-attempts failures the next pod submits nothing."""
    fail = {"timeline": ["RUNNING", "FAILED"], "exit_code": 3}
    ray = FakeRay(tmp_path, {"*": fail})
    assert [ray.pod()[0] for _ in range(3)] == [3, 3, 3]
    ids = [JOB_NAME, f"{JOB_NAME}-r2", f"{JOB_NAME}-r3"]
    assert ray.submitted() == ids
    assert all(" ".join(c).endswith(f"-- {ENTRYPOINT}") for c in ray.calls("submit")), "same run, resumed"
    rc, out = ray.pod()
    assert rc == 4, out
    assert ray.submitted() == ids


def test_sigterm_stops_the_ray_job(tmp_path):
    """Deadline or deletion: the kubelet sends SIGTERM to the container's main process only."""
    ray = FakeRay(tmp_path, {JOB_NAME: {"timeline": ["RUNNING"], "logs": "hang"}})
    proc = ray.start()
    try:
        _wait_for(lambda: ray.calls("submit") and any(c[-1] == JOB_NAME for c in ray.calls("status")))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, out
    assert [c[-1] for c in ray.calls("stop")] == [JOB_NAME], out
    assert ray.read()["jobs"][JOB_NAME]["stopped"] is True


def test_usage_errors():
    wrapper = _wrapper()
    for argv in ([], ["--address", "http://h:8265", "--submission-id", "x"],
                 ["--address", "http://h:8265", "--submission-id", "", "--", "python", "x.py"],
                 ["--address", "http://h:8265", "--submission-id", "a b", "--", "python", "x.py"]):
        with pytest.raises(SystemExit) as exc:
            wrapper.parse_args(argv)
        assert exc.value.code == 2, argv


# ---------------------------------------------------------------------------------------------- the real CLI
def _wrapper():
    spec = importlib.util.spec_from_file_location("_run_ray_job", ROOT / "infra" / "run_ray_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SERVER_JOBS = {"j-pending": "PENDING", "j-running": "RUNNING", "j-succeeded": "SUCCEEDED", "j-failed": "FAILED",
                "j-stopped": "STOPPED", "j-failed-2": "FAILED"}
# Ray 2.60's job supervisor's message for a driver that exited 2 (ray/dashboard/modules/job/job_supervisor.py)
_FAILED_2 = ("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\n"
             "ERROR job failed: output.uri is required")


class _Dashboard(BaseHTTPRequestHandler):
    """Just enough of Ray's job server for `ray job status`: /api/version and /api/jobs/<id>."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/version":
            return self._send(200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"})
        job = self.path.removeprefix("/api/jobs/")
        if job in _SERVER_JOBS:
            message = _FAILED_2 if job == "j-failed-2" else f"Job '{job}' succeeded? no, a message"
            return self._send(200, {"type": "SUBMISSION", "job_id": None, "submission_id": job, "entrypoint": "x",
                                    "status": _SERVER_JOBS[job], "message": message, "driver_exit_code": None})
        self._send(404, f"Job {job} does not exist", "text/plain")


def test_status_parser_reads_the_real_ray_cli(tmp_path):
    """`ray job status` of the installed Ray against a stand-in job server, for every status, an unknown id
    and an unreachable server; the fake CLI's output must read the same."""
    wrapper = _wrapper()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    ray_cli = Path(sys.executable).parent / "ray"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cases = {**{job: ("status", status) for job, status in _SERVER_JOBS.items()}, "j-missing": ("missing", None)}

    exit_codes = {}

    def real(job: str, addr: str = address) -> tuple[str, str | None]:
        proc = subprocess.run([str(ray_cli), "job", "status", "--address", addr, job], capture_output=True,
                              text=True, env=env, timeout=120, check=False)
        exit_codes[job] = wrapper.driver_exit_code(proc.stdout + proc.stderr)
        return wrapper.parse_status(job, proc.returncode, proc.stdout + proc.stderr)

    try:
        results = {}
        threads = [threading.Thread(target=lambda j=j: results.__setitem__(j, real(j))) for j in cases]
        threads.append(threading.Thread(target=lambda: results.__setitem__("unreachable",
                                                                           real("j-running", "http://127.0.0.1:9"))))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        server.shutdown()
    assert results == {**cases, "unreachable": ("error", None)}
    assert exit_codes["j-failed-2"] == 2 and exit_codes["j-failed"] is None  # the driver's own exit code
    # The fake prints the same.
    fake = FakeRay(tmp_path)
    state = fake.read()
    state["jobs"] = {job: {"timeline": [s], "pos": 0, "logs": "follow", "stopped": False}
                     for job, (_, s) in cases.items() if s}
    fake.write(state)
    for job, expected in cases.items():
        proc = subprocess.run([str(fake.bin / "ray"), "job", "status", "--address", address, job],
                              capture_output=True, text=True, env={**env, "FAKE_RAY_STATE": str(fake.state)},
                              check=False)
        assert wrapper.parse_status(job, proc.returncode, proc.stdout) == expected, job
