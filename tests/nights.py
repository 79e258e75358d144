"""A sequence of scheduled nightly re-audits over a growing archive on the S3 server, with what a scheduler and the
world do to them: a SIGTERM mid-run, a SIGKILL of the whole process group mid-run and an immediate retry, a
lease left by a dead driver, two overlapping drivers on one output, 10% S3 faults and a maintenance run. Used by
tests/test_nights.py (a week) and bench/bench_nights.py (any number of nights).

Each night is what the CronJob does: `jobs/inspect.py --mode incremental` with a run id derived from the scheduled
time, retried with the same run id until it completes (its own retries) or, refused because another driver holds
the output, run again later. After each night (and after maintenance) the output is checked: the run's manifest
says completed; its rows are exactly the images due that night (new or changed since the previous night), each
once; no earlier run lost a row; and at the end `latest` (eagle/io/sql/latest.sql) equals the newest successful
row per image, which is the night each image last changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from e2e import Driver
from faulty_proxy import FaultyProxy

from eagle.io import latest_view, querying, results, storage
from eagle.io.lease import OutputLease, lease_uri
from eagle.io.runs import output_files

ROOT = Path(__file__).resolve().parents[1]
INSPECT, MAINTAIN = str(ROOT / "jobs" / "inspect.py"), str(ROOT / "jobs" / "maintain.py")
PRODUCTS = ("grid", "nut")
LEASE_TTL_S = 10  # short, so a SIGKILLed driver's lease expires soon; renewed every 3.3 s, enough under load 20+ (6 s was not)
EXPERT = {"backbone": "resnet18", "weights": "random", "resize": 64, "crop": 64}
FIRST = dt.datetime(2026, 3, 2, 2, 0, tzinfo=dt.UTC)  # the CronJob's schedule: 02:00 UTC

# What happens to night k (1-based) of each week; the scenario repeats weekly. A maintenance run follows night 4.
WEEK = ("plain", "sigterm", "sigkill", "dead-lease", "overlap-first", "overlap-second", "faults")
BIG = {"sigterm", "sigkill", "overlap-first"}  # nights long enough to be stopped or overlapped mid-run


def run_id_for(night: int) -> str:
    """The Kubernetes Job name the CronJob gives a scheduled time (minutes since the epoch): its run id."""
    scheduled = FIRST + dt.timedelta(days=night - 1)
    return f"eagle-reaudit-{int(scheduled.timestamp()) // 60}"


@dataclass
class Figures:
    runs: int = 0
    attempts: int = 0
    kills: int = 0  # SIGTERM and SIGKILL mid-run
    missed_kills: int = 0  # runs that finished every row before their signal landed (a fast machine)
    retries: int = 0  # attempts beyond the first of a night
    refused: int = 0  # attempts refused (exit 2) because another driver held the output
    images: int = 0  # distinct images in the archive at the end
    audited: int = 0  # rows written, all nights
    duplicates: int = 0
    lost_rows: int = 0
    error_rows: int = 0
    maintenance: int = 0
    s3_faults: int = 0
    seconds: float = 0.0
    codes: list[int] = field(default_factory=list)

    def line(self) -> str:
        return (f"nights: runs {self.runs}, attempts {self.attempts}, kills {self.kills} (missed {self.missed_kills}), retries {self.retries}, "
                f"refused {self.refused}, images {self.images}, rows {self.audited}, duplicates {self.duplicates}, "
                f"lost rows {self.lost_rows}, error rows {self.error_rows}, maintenance runs {self.maintenance}, S3 faults injected "
                f"{self.s3_faults}, {self.seconds:.0f} s")


def fit_pool(pool: Path, models: str, n_images: int) -> list[Path]:
    """A local pool of synthetic test images (the archive's future arrivals) and experts fitted once into
    `models`; returns the pool's images, arrival order."""
    from eagle.config import load_config
    from eagle.expert.training import fit_product
    from eagle.testing.synth import generate

    per_product = n_images // len(PRODUCTS) + 2
    generate(str(pool), products=PRODUCTS, n_train=4, n_test_good=per_product, n_test_defect=1, size=64)
    cfg = load_config(overrides={"model_store": models, "expert": EXPERT, "threshold": {"min_unselected_patches": 4}})
    for product in PRODUCTS:
        fit_product(str(pool), product, cfg)
    images = sorted(p for p in pool.rglob("*.png") if "/test/" in str(p) and "ground_truth" not in str(p))
    return sorted(images, key=lambda p: (p.parts[-2] != "good", p.stem, p.parts))  # interleave the products


class Nights:
    """The archive, the output and the scheduler; `night(k)` runs the k-th scheduled re-audit with its injection."""

    def __init__(self, root: str, pool: list[Path], models: str, ray_address: str, workdir: Path) -> None:
        self.root, self.pool, self.models, self.ray_address, self.workdir = root, list(pool), models, ray_address, workdir
        self.archive, self.output = f"{root}/archive", f"{root}/audit"
        self.present: dict[str, bytes] = {}  # archive key -> its bytes (for changes)
        self.due: dict[str, set[str]] = {}  # run id -> images due in it
        self.last_due: dict[str, str] = {}  # image -> run id of the night it was last due (what latest must show)
        self.kept: dict[str, dict[str, int]] = {}  # run id -> rows per image once it completed
        self.figures = Figures()
        self.started = time.monotonic()

    # --- the archive grows, and an image changes now and then -------------------------------------------------
    def arrive(self, night: int, n_new: int) -> set[str]:
        arrived = set()
        for _ in range(n_new):
            src = self.pool.pop(0)
            product = src.relative_to(src.parents[3]).parts[0]
            uri = f"{self.archive}/{product}/n{night:03d}-{src.parts[-2]}-{src.name}"
            self.present[uri] = src.read_bytes()
            storage.write_bytes(uri, self.present[uri])
            arrived.add(uri)
        earlier = sorted(set(self.present) - arrived)
        if earlier:  # a re-shot image: new bytes under an old key, so a new ETag: due again
            uri = earlier[(night * 7) % len(earlier)]
            other = next(u for u in sorted(self.present) if u != uri and u.split("/")[-2] == uri.split("/")[-2])
            changed = self.present[other] if self.present[other] != self.present[uri] else self.pool.pop(0).read_bytes()
            self.present[uri] = changed
            storage.write_bytes(uri, changed)
            arrived.add(uri)
        return arrived

    # --- one driver, as the CronJob's pod starts it ------------------------------------------------------------
    def args(self, run_id: str, *extra: str) -> list[str]:
        return [INSPECT, "--input", self.archive, "--model-store", self.models, "--output", self.output,
                "--mode", "incremental", "--mllm", "none", "--run-id", run_id, f"ray.address={self.ray_address}",
                *(f"expert.{k}={v}" for k, v in EXPERT.items()), "inputs.rows_per_block=2",
                "resources.decode.batch_size=2", "resources.expert.batch_size=2", "resources.finish.batch_size=2",
                "output.flush_interval_s=1", f"output.lease_ttl_s={LEASE_TTL_S}",
                f"output.lease_wait_s={4 * LEASE_TTL_S}", *extra]

    def start(self, run_id: str, *extra: str) -> Driver:
        self.figures.attempts += 1
        return Driver(self.args(run_id, *extra), self.workdir, env={"RAY_TMPDIR": os.environ.get("RAY_TMPDIR",
                                                                                                  "/tmp/ray")})

    def finish(self, driver: Driver, timeout: float = 600) -> int:
        try:
            code = driver.wait(timeout=timeout)
        finally:
            driver.close()
        self.figures.codes.append(code)
        return code

    def run_files(self, run_id: str) -> list[str]:
        return [f for f in output_files(self.output) if os.path.basename(f).startswith(f"{run_id}_")]

    def wait_until(self, driver: Driver, ready, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert driver.proc.poll() is None, f"the driver ended before {what}:\n{driver.stderr[-3000:]}"
            assert time.time() < deadline, f"no {what} after {timeout} s:\n{driver.stderr[-3000:]}"
            time.sleep(0.2)

    def retry_until_completed(self, run_id: str, *extra: str, attempts: int = 4) -> None:
        """The Job's own retries (backoffLimit): the same run id again until it exits 0."""
        for _ in range(attempts):
            driver = self.start(run_id, *extra)
            code = self.finish(driver)
            if code == 0:
                return
            assert code in (3, 143, 137), f"{run_id} exited {code}:\n{driver.stderr[-3000:]}"
            self.figures.retries += 1
        raise AssertionError(f"{run_id} did not complete in {attempts} attempts")

    def kill_mid_run(self, run_id: str, sig: int) -> None:
        """Start the night, stop it once it has written rows; SIGTERM to the driver (Kubernetes, `ray job
        stop`), or SIGKILL to its whole process group (a pod killed at once)."""
        import signal

        driver = self.start(run_id)
        try:
            deadline = time.time() + 300
            while not self.run_files(run_id) and driver.proc.poll() is None:
                assert time.time() < deadline, f"no result files after 300 s:\n{driver.stderr[-3000:]}"
                time.sleep(0.2)
            if driver.proc.poll() is None:
                if sig == signal.SIGTERM:
                    driver.proc.send_signal(signal.SIGTERM)
                else:
                    with contextlib.suppress(ProcessLookupError):  # it may have just ended with all its processes
                        os.killpg(driver.proc.pid, signal.SIGKILL)
        finally:
            code = self.finish(driver, timeout=120)
        manifest = json.loads(storage.read_bytes(f"{self.output}/_runs/{run_id}.json"))
        if code == 0 and manifest["status"] == "completed":  # it finished every row before the signal landed
            self.figures.missed_kills += 1
            return
        self.figures.kills += 1
        if sig == signal.SIGTERM:
            assert code == 143 and manifest["status"] == "interrupted", (code, manifest, driver.stderr[-3000:])
            assert not storage.exists(lease_uri(self.output))  # released
        else:
            assert code == -signal.SIGKILL and manifest["status"] == "running", (code, manifest)
            assert storage.exists(lease_uri(self.output))  # left to expire
        self.figures.retries += 1
        started = time.monotonic()
        self.retry_until_completed(run_id)  # at once: a SIGKILLed driver's lease is waited for
        if sig == signal.SIGKILL:
            assert time.monotonic() - started < 4 * LEASE_TTL_S + 120

    # --- the nights ------------------------------------------------------------------------------------------
    def night(self, k: int) -> None:
        import signal

        kind = WEEK[(k - 1) % len(WEEK)]
        run_id = run_id_for(k)
        if kind == "overlap-second":  # already run, after the first of the pair
            return
        n_new = 8 if k == 1 else 24 if kind in BIG else 3
        self.due[run_id] = self.arrive(k, n_new)
        if kind == "plain":
            self.retry_until_completed(run_id)
        elif kind == "sigterm":
            self.kill_mid_run(run_id, signal.SIGTERM)
        elif kind == "sigkill":
            self.kill_mid_run(run_id, signal.SIGKILL)
        elif kind == "dead-lease":
            dead = OutputLease(self.output, "dead-driver", ttl_s=LEASE_TTL_S).acquire()
            dead._stop.set()  # the holder dies: it never renews nor releases its lease
            dead._thread.join()
            self.retry_until_completed(run_id)  # waits for it to expire, then takes it over
        elif kind == "overlap-first":
            self.overlap(run_id, run_id_for(k + 1), k + 1)
        elif kind == "faults":
            with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], every=10) as proxy:
                self.retry_until_completed(run_id, f"storage.endpoint_url={proxy.url}")
            self.figures.s3_faults += proxy.faults
            assert proxy.faults, proxy.injected
        if kind != "overlap-first":  # overlap() checks both nights of the pair, in their order
            self.check(run_id)
        if kind == "dead-lease":
            self.maintain()

    def overlap(self, first: str, second: str, k_second: int) -> None:
        """The next night's driver starts while this one still writes (an earlier night that outlived its Job):
        it is refused after output.lease_wait_s (exit 2, nothing written) and runs again later."""
        driver = self.start(first)
        try:
            lease = lease_uri(self.output)
            self.wait_until(driver, lambda: storage.exists(lease) and first.encode() in storage.read_bytes(lease),
                            "its lease")
            twin = self.start(second, "output.lease_wait_s=1")
            code = self.finish(twin, timeout=300)
            assert driver.proc.poll() is None, "the first driver ended before the second was refused"
            assert code == 2 and "being written by another driver" in twin.stderr, (code, twin.stderr[-3000:])
            assert not storage.exists(f"{self.output}/_runs/{second}.json") and not self.run_files(second)
            self.figures.refused += 1
        finally:
            code = self.finish(driver)
        assert code == 0, driver.stderr[-3000:]
        self.check(first)
        self.due[second] = self.arrive(k_second, 3)
        self.figures.retries += 1
        self.retry_until_completed(second)  # the scheduler's next try
        self.check(second)

    def maintain(self) -> None:
        before = self.per_run()
        files = len(output_files(self.output))
        proc = subprocess.run([sys.executable, MAINTAIN, "--output", self.output], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        self.figures.maintenance += 1
        after = output_files(self.output)
        assert len(after) <= files, proc.stdout
        # small files were compacted: no run keeps two files in one partition folder (these runs' are all small)
        per_run_folder = Counter((os.path.dirname(f), os.path.basename(f).split("_a")[0]) for f in after)
        assert max(per_run_folder.values()) == 1, (per_run_folder.most_common(3), proc.stdout)
        self.assert_kept(before)

    # --- checks ---------------------------------------------------------------------------------------------
    def rows(self) -> list[tuple]:
        sql = results.rows_sql(output_files(self.output), ["run_id", "image_uri", "status", "audited_at"])
        return querying.connect().sql(sql).fetchall()

    def per_run(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for run_id, uri, _status, _at in self.rows():
            runs = out.setdefault(run_id, {})
            runs[uri] = runs.get(uri, 0) + 1
        return out

    def assert_kept(self, before: dict[str, dict[str, int]]) -> None:
        after = self.per_run()
        lost = sum(max(0, sum(v.values()) - sum(after.get(r, {}).values())) for r, v in before.items())
        self.figures.lost_rows += lost
        assert lost == 0 and {r: after.get(r) for r in before} == before

    def check(self, run_id: str) -> None:
        manifest = json.loads(storage.read_bytes(f"{self.output}/_runs/{run_id}.json"))
        assert manifest["status"] == "completed" and manifest["mode"] == "incremental", manifest
        per_run = self.per_run()
        mine = per_run.get(run_id, {})
        self.figures.duplicates += sum(n - 1 for n in mine.values())
        assert sorted(mine) == sorted(self.due[run_id]), (run_id, sorted(set(mine) ^ self.due[run_id]))
        assert set(mine.values()) == {1}, {u: n for u, n in mine.items() if n > 1}
        for uri in mine:
            self.last_due[uri] = run_id
        self.figures.runs += 1
        self.assert_kept(self.kept)  # every earlier night's rows still there
        self.kept[run_id] = dict(mine)

    def check_latest(self) -> None:
        latest = latest_view.latest_table(self.output).select(["image_uri", "run_id", "status", "audited_at"])
        got = {r["image_uri"]: (r["run_id"], r["audited_at"]) for r in latest.to_pylist()}
        newest: dict[str, tuple] = {}  # the newest successful row per image, computed here
        for run_id, uri, status, at in self.rows():
            if status == "ok" and (uri not in newest or at > newest[uri][1]):
                newest[uri] = (run_id, at)
        assert got == newest, sorted(set(got.items()) ^ set(newest.items()))
        assert sorted(got) == sorted(self.present)  # every image of the archive
        # which is the night it last arrived or changed, unless its row of that night is an error (a read that
        # failed for good under the faults: latest keeps the older successful row, the next night tries again)
        status = {(run_id, uri): st for run_id, uri, st, _ in self.rows()}
        self.figures.error_rows = sum(st != "ok" for st in status.values())
        wrong = {u: (got[u][0], r) for u, r in self.last_due.items()
                 if status[(r, u)] == "ok" and got[u][0] != r}
        assert not wrong, wrong

    def run(self, nights: int) -> Figures:
        for k in range(1, nights + 1):
            self.night(k)
            f = self.figures
            print(f"night {k} checked ({time.monotonic() - self.started:.0f} s): runs {f.runs}, attempts "
                  f"{f.attempts}, kills {f.kills} (missed {f.missed_kills}), retries {f.retries}, refused {f.refused}, duplicates "
                  f"{f.duplicates}, lost rows {f.lost_rows}", flush=True)
        self.check_latest()
        f = self.figures
        f.images, f.audited = len(self.present), sum(sum(v.values()) for v in self.kept.values())
        f.seconds = time.monotonic() - self.started
        return f


def pool_size(nights: int) -> int:
    """Images the scenario takes from the pool over `nights` (new ones, and spares for changes)."""
    total = 0
    for k in range(1, nights + 2):
        kind = WEEK[(k - 1) % len(WEEK)]
        total += (8 if k == 1 else 24 if kind in BIG else 3) + 1
    return total
