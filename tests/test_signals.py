"""What a scheduler does to a running job: SIGTERM mid-run (exit 143, finished rows written, run interrupted, lease
released, resume line, no Ray process left), SIGTERM then SIGKILL after a grace (Kubernetes, `ray job stop`), a
SIGKILL (loss bounded by output.flush_interval_s); a local Ray that does not start (exit 3, one line); and a
dry run that writes nothing and starts no Ray."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from e2e import Driver, running_head

from eagle.cli import inspect_cmd
from eagle.config import load_config
from eagle.io import storage
from eagle.io.lease import LEASE_NAME
from eagle.io.runs import begin_run
from eagle.io.schema import to_table
from eagle.pipeline import ray_setup

INSPECT = str(Path(__file__).resolve().parents[1] / "jobs" / "inspect.py")


# --- a job that runs long enough to be stopped -------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from eagle.expert.training import fit_product
    from eagle.testing.synth import generate

    root = tmp_path_factory.mktemp("signals")
    data, models = root / "data", root / "models"
    generate(str(data), products=("grid", "nut"), n_train=4, n_test_good=20, n_test_defect=8, size=64)
    expert = {"backbone": "resnet18", "weights": "random", "resize": 64, "crop": 64}
    cfg = load_config(overrides={"model_store": str(models), "expert": expert,
                                 "threshold": {"min_unselected_patches": 4}})
    for product in ("grid", "nut"):
        fit_product(str(data), product, cfg)
    images = sorted(str(p) for p in data.rglob("*.png") if "/test/" in str(p) and "ground_truth" not in str(p))
    return {"data": str(data), "models": str(models), "images": images}


def _args(fitted: dict, out: Path, run_id: str, *extra: str, ray_address: str | None = "local") -> list[str]:
    """Small blocks and batches, a flush per second: rows finish and reach storage all through the run."""
    own_ray = ["ray.address=local", "ray.num_cpus=4"] if ray_address == "local" else []
    return [INSPECT, "--input", fitted["data"], "--model-store", fitted["models"], "--output", str(out),
            "--mllm", "none", "--run-id", run_id, "inputs.exclude=['*/ground_truth/*', '*/train/*']",
            *own_ray, "ray.start_attempts=1", "expert.backbone=resnet18",
            "expert.weights=random", "inputs.rows_per_block=2", "resources.decode.batch_size=2",
            "resources.expert.batch_size=2", "resources.finish.batch_size=2", "output.flush_interval_s=1",
            "output.lease_ttl_s=3", *extra]


def _result_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.parquet") if "/_runs/" not in str(p) and "/_ledger/" not in str(p)]


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except Exception:  # noqa: BLE001 - torn by a kill mid-write: the resume deletes it
        return False


def _rows(out: Path, run_id: str) -> list[tuple[str, int]]:
    """(image, rows) of the run, from the result files a reader can open (DuckDB)."""
    files = [str(p) for p in _result_files(out) if _readable(p)]
    if not files:
        return []
    return duckdb.sql(f"SELECT image_uri, count(*) FROM read_parquet({files!r}, hive_partitioning = true) "
                      f"WHERE run_id = '{run_id}' GROUP BY 1 ORDER BY 1").fetchall()


def _wait_for_rows(driver: Driver, out: Path, timeout: float = 600) -> None:
    """Until the run has written a whole result file (its first flush; a file being written is not yet
    readable), while the driver still runs."""
    deadline = time.time() + timeout
    while not any(_readable(p) for p in _result_files(out)):
        assert driver.proc.poll() is None, f"the run ended before it wrote anything:\n{driver.stderr[-3000:]}"
        assert time.time() < deadline, driver.stderr[-3000:]
        time.sleep(0.1)


def _resume(fitted: dict, out: Path, run_id: str, cwd: Path) -> dict:
    summary = cwd / f"summary-{run_id}.json"
    driver = Driver(_args(fitted, out, run_id, "--summary-json", str(summary)), cwd)
    try:
        assert driver.wait() == 0, driver.stderr[-3000:]
    finally:
        driver.close()
    return json.loads(summary.read_text())


@pytest.mark.slow
def test_sigterm_mid_run_writes_finished_rows_and_exits_143_then_resumes_exactly_once(fitted, tmp_path):
    out = tmp_path / "out"
    driver = Driver(_args(fitted, out, "term"), tmp_path)
    try:
        _wait_for_rows(driver, out)
        driver.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while "--run-id term" not in driver.stderr and driver.proc.poll() is None:
            time.sleep(0.05)
        to_resume_line = time.monotonic() - sent  # what must fit `ray job stop`'s 3 s: rows, manifest, lease
        code = driver.wait(timeout=120)
        took = time.monotonic() - sent
        stderr = driver.stderr
        assert code == 143, stderr[-3000:]
        own = [line for line in stderr.splitlines() if not line.startswith("(")]  # not a Ray worker's log
        assert not [line for line in own if "Traceback" in line or "SIGABRT" in line], stderr[-3000:]
        assert json.loads((out / "_runs" / "term.json").read_text())["status"] == "interrupted"
        assert not (out / "_runs" / LEASE_NAME).exists()  # released
        resume = stderr.strip().splitlines()[-1]
        assert resume.startswith(sys.executable) and resume.endswith("--run-id term")
        deadline = time.time() + 10
        while driver.leftovers() and time.time() < deadline:
            time.sleep(0.5)
        assert not driver.leftovers(), driver.leftovers()  # no process of its Ray session remains
        written = len(_rows(out, "term"))
        print(f"SIGTERM: resume line after {to_resume_line:.1f} s, exit 143 after {took:.1f} s (Ray stopped); "
              f"{written} of {len(fitted['images'])} rows written")
        assert to_resume_line < 3 + 10  # `ray job stop`'s 3 s, plus what a loaded test machine adds
        assert 0 < written < len(fitted["images"])
    finally:
        driver.close()
    summary = _resume(fitted, out, "term", tmp_path)
    assert summary["skipped"] == written and summary["audited"] == len(fitted["images"]) - written
    assert _rows(out, "term") == [(uri, 1) for uri in fitted["images"]]  # every image exactly once


@pytest.mark.slow
def test_sigterm_then_sigkill_after_the_grace_and_an_immediate_retry_resumes(fitted, tmp_path):
    """Kubernetes (terminationGracePeriodSeconds) and `ray job stop` (3 s): SIGTERM, then SIGKILL to every
    process of the pod/job; the retry, with the same run id, resumes and every image is there exactly once."""
    out = tmp_path / "out"
    driver = Driver(_args(fitted, out, "k8s", "output.stop_grace_s=1"), tmp_path)
    try:
        _wait_for_rows(driver, out)
        driver.proc.send_signal(signal.SIGTERM)
        time.sleep(3)
        ended = driver.proc.poll()
        with contextlib.suppress(ProcessLookupError):  # nothing left when the driver and its Ray have gone
            os.killpg(driver.proc.pid, signal.SIGKILL)  # whatever is left of the pod
        driver.proc.wait()
        print(f"SIGTERM then SIGKILL 3 s later: the driver had {'exited ' + str(ended) if ended else 'not exited'}")
    finally:
        driver.close()  # also reaps its Ray's processes: no write of the killed run can land after the count
    written = len(_rows(out, "k8s"))
    if not ended:
        time.sleep(3.5)  # its lease (output.lease_ttl_s=3) expires
    summary = _resume(fitted, out, "k8s", tmp_path)
    assert summary["skipped"] == written
    assert _rows(out, "k8s") == [(uri, 1) for uri in fitted["images"]]


@pytest.mark.slow
def test_sigkill_loses_at_most_the_rows_of_one_flush_interval(fitted, tmp_path):
    """A run SIGKILLed mid-way has written result files for the rows it finished up to output.flush_interval_s
    before; its resume audits only the rest."""
    out = tmp_path / "out"
    driver = Driver(_args(fitted, out, "kill", "output.flush_interval_s=1"), tmp_path)
    try:
        _wait_for_rows(driver, out)  # killed as soon as the first flush landed, while the run goes on
        assert driver.proc.poll() is None, "the run ended before it could be killed"
        os.killpg(driver.proc.pid, signal.SIGKILL)
        killed = time.time()
        driver.proc.wait()
        files = [p for p in _result_files(out) if _readable(p)]
        torn = len(_result_files(out)) - len(files)
        newest = max(p.stat().st_mtime for p in files)
        written = len(_rows(out, "kill"))
    finally:
        driver.close()
    age = killed - newest
    print(f"SIGKILL: {written} of {len(fitted['images'])} rows in {len(files)} files ({torn} torn by the kill); "
          f"the newest written {age:.1f} s before the kill (output.flush_interval_s=1)")
    assert 0 < written <= len(fitted["images"])  # an unloaded machine may have finished every row by then
    assert age < 1 + 6  # the interval, plus a loaded machine's write and scheduling time
    time.sleep(3.5)  # the dead driver's lease expires
    summary = _resume(fitted, out, "kill", tmp_path)
    assert summary["skipped"] == written and summary["audited"] == len(fitted["images"]) - written
    assert _rows(out, "kill") == [(uri, 1) for uri in fitted["images"]]


@pytest.mark.slow
def test_ray_job_stop_interrupts_the_run_and_a_resume_completes_it(fitted, tmp_path):
    """`ray job submit` then `ray job stop` (SIGTERM, SIGKILL 3 s later) against a head started with `ray start`."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "RAY_TMPDIR": head_tmp}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    try:
        with running_head(env, dashboard=True) as (_, dash):
            address = f"http://127.0.0.1:{dash}"
            deadline = time.time() + 300
            while True:  # the dashboard answers before its job agent is up on a loaded machine: try again then
                submit = subprocess.run([ray_cli, "job", "submit", "--no-wait", "--address", address,
                                         "--submission-id", "stopped", "--", sys.executable,
                                         *_args(fitted, out, "sub", ray_address=None)],
                                        env=env, capture_output=True, text=True, timeout=300)
                if submit.returncode == 0 or time.time() > deadline:
                    break
                time.sleep(2)
            assert submit.returncode == 0, submit.stderr
            deadline = time.time() + 900
            while not (out / "_runs" / "sub.json").exists():  # the run has started (planned; Ray Data starting)
                assert time.time() < deadline
                time.sleep(0.2)
            time.sleep(5)
            stop = subprocess.run([ray_cli, "job", "stop", "--address", address, "stopped"], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert stop.returncode == 0, stop.stderr
            logs = subprocess.run([ray_cli, "job", "logs", "--address", address, "stopped"], env=env,
                                  capture_output=True, text=True, timeout=120).stdout
    finally:
        shutil.rmtree(head_tmp, ignore_errors=True)
    print("ray job stop: driver log tail:\n" + "\n".join(logs.strip().splitlines()[-4:]))
    assert json.loads((out / "_runs" / "sub.json").read_text())["status"] == "interrupted", logs[-3000:]
    assert "interrupted by SIGTERM" in logs and "--run-id sub" in logs.strip().splitlines()[-1]
    written = len(_rows(out, "sub"))
    if (out / "_runs" / LEASE_NAME).exists():
        time.sleep(3.5)  # SIGKILLed before it released its lease: it expires
    summary = _resume(fitted, out, "sub", tmp_path)
    assert summary["skipped"] == written
    assert _rows(out, "sub") == [(uri, 1) for uri in fitted["images"]]


# --- Ray that does not start ---------------------------------------------------------------------------------

def _no_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inspect_cmd, "check_inspect", lambda cfg, force_cpu_mllm=False: None)


def test_a_local_ray_that_does_not_start_is_retried_then_exits_3_in_one_line(monkeypatch, tmp_path, capfd):
    import ray

    tries = []

    def init(**kwargs):
        tries.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_setup, "_START_BACKOFF_S", (0.01, 0.02))
    _no_preflight(monkeypatch)
    code = inspect_cmd.main(["--input", str(tmp_path), "--model-store", str(tmp_path / "m"), "--output",
                             str(tmp_path / "out"), "--mllm", "none", "ray.address=local", "ray.start_attempts=3"])
    err = capfd.readouterr().err
    assert code == 3 and len(tries) == 3
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "could not start a local Ray" in x]
    assert "3 tries" in line and "timed out during startup" in line and "run the same command again" in line


def test_a_local_ray_that_starts_on_the_second_try_is_used(monkeypatch):
    import ray

    tries = []

    def init(**kwargs):
        tries.append(kwargs)
        if len(tries) == 1:
            raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_setup, "_START_BACKOFF_S", (0.01,))
    ray_setup._start_local(load_config(overrides={"ray": {"start_attempts": 2}}), address="local")
    assert len(tries) == 2


def test_handlers_set_before_ray_init_survive_it(monkeypatch):
    import ray

    def init(**kwargs):  # what ray.init does to a driver's SIGTERM handler
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    mine = signal.getsignal(signal.SIGTERM)
    try:
        def handler(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        signal.signal(signal.SIGTERM, handler)
        monkeypatch.setattr(ray, "init", init)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        ray_setup.init_ray(load_config(overrides={"ray": {"address": "local"}}))
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, mine)


# --- dry run ---------------------------------------------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")}


def test_dry_run_over_an_existing_output_writes_nothing_and_starts_no_ray(monkeypatch, tmp_path, capsys):
    """A run r1 wrote a row and its manifest, but the ledger does not hold it yet (it crashed): a dry run
    counts its row as done without writing the ledger, a plan or anything else, and without Ray."""
    import ray

    from eagle.testing.synth import generate

    data, out = tmp_path / "data", tmp_path / "out"
    generate(str(data), products=("grid",), n_train=1, n_test_good=2, n_test_defect=1, size=32)
    images = sorted(str(p) for p in data.rglob("*.png") if "/test/" in str(p) and "ground_truth" not in str(p))
    begin_run(str(out), "r1", "h")
    table = to_table([{"image_uri": images[0], "run_id": "r1", "status": "ok", "product": "grid",
                       "audited_at": dt.datetime.now(dt.UTC)}])
    target = out / "product=grid" / "audit_date=2026-01-01" / "r1_a001_x_000000-0.parquet"
    target.parent.mkdir(parents=True)
    pq.write_table(table.drop_columns(["product", "audit_date"]), target)
    before = _snapshot(out)

    def no_ray(*a, **k):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray_setup, "init_ray", no_ray)
    _no_preflight(monkeypatch)
    code = inspect_cmd.main(["--dry-run", "--input", str(data), "--model-store", str(tmp_path / "models"),
                             "--output", str(out), "--mllm", "none", "--run-id", "r1",
                             "inputs.exclude=['*/ground_truth/*', '*/train/*']"])
    printed = capsys.readouterr().out
    assert code == 0
    assert _snapshot(out) == before  # no ledger, state, plan, listing or manifest change
    assert printed.splitlines()[-1].split() == ["total", str(len(images)), "1", str(len(images) - 1)]
    assert not storage.exists(str(out / "_ledger"))


@pytest.mark.parametrize("raised", ["interrupt", "wrapped", "failure"])
def test_a_signal_that_lands_in_a_duckdb_query_still_ends_the_run_interrupted(monkeypatch, tmp_path, raised):
    """DuckDB turns a SIGINT/SIGTERM that arrives during one of its queries (the run's summary, a merge) into its
    own InterruptException, or, when the signal's KeyboardInterrupt is raised in a filesystem callback (fsspec
    reading S3), into a plain duckdb.Error (found by bench/bench_nights.py): the run still ends `interrupted` and
    raises KeyboardInterrupt (exit 143/130). The same error without a signal fails the run."""
    import duckdb

    from eagle.cli.interrupts import Signals
    from eagle.config import load_config
    from eagle.io.runs import begin_run, read_runs
    from eagle.pipeline import inspection

    cfg = load_config(overrides={"model_store": str(tmp_path / "models"), "output": {"uri": str(tmp_path / "out")},
                                 "run_id": "night-3"})
    signals = Signals()

    def summary_interrupted(cfg, run_id, *args):
        begin_run(cfg.output.uri, run_id, "h", cfg.storage)
        if raised == "interrupt":
            raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")
        if raised == "wrapped":
            signals.stop.set()  # as the SIGTERM handler does before it raises KeyboardInterrupt in the callback
        raise duckdb.Error("Traceback (most recent call last): ... KeyboardInterrupt: SIGTERM")

    monkeypatch.setattr(inspection, "_run", summary_interrupted)
    with pytest.raises(duckdb.Error if raised == "failure" else KeyboardInterrupt):
        inspection.run_inspect(cfg, stop=signals)
    (run,) = read_runs(cfg.output.uri)
    assert (run.run_id, run.status) == ("night-3", "failed" if raised == "failure" else "interrupted")
    assert not list((tmp_path / "out" / "_runs").glob("*.lease"))  # released
