"""One writer per output: the lease is exclusive whatever the run ids, renewed and taken over only by
conditional writes (racing drivers: exactly one wins; a stalled holder cannot overwrite its successor and
stops), waited for by a retry after a crash, released at the end, and checked before Ray starts. Locally and
on a real S3 endpoint (moto's server on loopback)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from eagle.io import storage
from eagle.io.lease import Holder, LeaseHeld, LeaseLost, OutputLease, lease_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/out"


def _crash(lease: OutputLease) -> None:
    """The holder dies: no more renewals, no release."""
    lease._stop.set()
    lease._thread.join()


def _expired_lease(output: str, age_s: float = 3600) -> None:
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)).isoformat()
    dead = Holder("dead-host", 1, "dead-token", old, old, "dead-run", 1.0)
    storage.write_bytes(lease_uri(output), json.dumps(dead.__dict__).encode())


def test_conditional_writes(output):
    uri = storage.join(output, "x.json")
    assert storage.read_versioned(uri) is None
    v1 = storage.write_if(uri, b"one", None)
    assert v1 and storage.write_if(uri, b"again", None) is None  # create only if absent
    assert storage.read_versioned(uri) == (b"one", v1)
    v2 = storage.write_if(uri, b"two", v1)
    assert v2 and v2 != v1 and storage.write_if(uri, b"stale", v1) is None  # replace only if unchanged
    assert storage.read_versioned(uri) == (b"two", v2)
    assert not storage.remove_if(uri, v1) and storage.exists(uri)
    assert storage.remove_if(uri, v2) and not storage.exists(uri)


def test_second_driver_with_any_run_id_is_refused_with_the_holders_identity(output):
    first = OutputLease(output, "r1", ttl_s=60).acquire()
    try:
        holder = first.holder
        expected = (rf"run r1, pid {holder.pid} on {re.escape(holder.host)}, started "
                    rf"{re.escape(holder.started_at)}")
        for run_id in ("r1", "another-run"):  # the same run id (a retry) or a new one: one writer per output
            started = time.monotonic()
            with pytest.raises(LeaseHeld, match=expected):
                OutputLease(output, run_id, ttl_s=60, wait_s=0.5).acquire()
            assert 0.5 <= time.monotonic() - started < 10  # waited output.lease_wait_s, then refused
    finally:
        first.release()
    assert not storage.exists(first.uri)  # released: the next driver gets it
    OutputLease(output, "another-run", ttl_s=60).acquire().release()


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_racing_drivers_exactly_one_wins(output, expired):
    if expired:
        _expired_lease(output)  # a dead driver's lease: every racer sees it expired and tries to take it over
    racers = 8
    barrier = threading.Barrier(racers)
    won: list[OutputLease] = []
    refused: list[str] = []

    def race(i: int) -> None:
        lease = OutputLease(output, f"run-{i}", ttl_s=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld:
            refused.append(lease.run_id)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert len(won) == 1 and len(refused) == racers - 1
        assert Holder.parse(storage.read_bytes(won[0].uri)).token == won[0].holder.token
    finally:
        for lease in won:
            lease.release()


_RACER = textwrap.dedent("""
    import sys, time
    from eagle.io.lease import LeaseHeld, OutputLease
    output, run_id, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    try:
        lease = OutputLease(output, run_id, ttl_s=30).acquire()
    except LeaseHeld:
        print("refused", flush=True)
        sys.exit(0)
    print("won", flush=True)
    time.sleep(2)  # hold it while the others look
    lease.release()
""")


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_racing_processes_exactly_one_wins(tmp_path, expired):
    output = str(tmp_path / "out")
    if expired:
        _expired_lease(output)
    start = time.time() + 6  # every process imported and waiting when the race starts
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, output, f"p{i}", str(start)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(5)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 4 + ["won"], outcomes


def test_renewal_keeps_it_and_a_stalled_holder_is_taken_over_and_stops(output):
    lost = threading.Event()
    held = OutputLease(output, "r2", ttl_s=0.9, on_lost=lost.set).acquire()
    first_seen = json.loads(storage.read_bytes(held.uri))["renewed_at"]
    time.sleep(1.2)
    assert json.loads(storage.read_bytes(held.uri))["renewed_at"] > first_seen  # renewed: still held
    held.check()
    with pytest.raises(LeaseHeld):
        OutputLease(output, "r3", ttl_s=0.9).acquire()
    _crash(held)  # the holder stalls: no renewal for longer than the TTL
    time.sleep(1.0)
    with pytest.raises(LeaseLost, match="last renewed"):  # it knows by its own clock before it writes again
        held.check()
    held.lost = None  # as if it had not looked yet: its next renewal finds the successor
    taker = OutputLease(output, "r3", ttl_s=0.9).acquire()  # expired: the next driver takes it over
    try:
        assert not held.renew()  # the stalled holder's conditional renewal fails ...
        assert lost.is_set() and "another driver took over" in held.lost  # ... and it stops
        with pytest.raises(LeaseLost):
            held.check()
        assert Holder.parse(storage.read_bytes(taker.uri)).token == taker.holder.token  # not overwritten
        held.release()  # the old holder's late release removes nothing it no longer owns
        assert Holder.parse(storage.read_bytes(taker.uri)).token == taker.holder.token
        taker.check()
    finally:
        taker.release()
    assert not storage.exists(taker.uri)


def test_a_retry_waits_for_a_dead_drivers_lease(output):
    dead = OutputLease(output, "nightly", ttl_s=2).acquire()
    _crash(dead)
    crashed = time.monotonic()
    with pytest.raises(LeaseHeld):  # without waiting: refused
        OutputLease(output, "nightly", ttl_s=2, wait_s=0).acquire()
    retry = OutputLease(output, "nightly", ttl_s=2, wait_s=10).acquire()  # waits for the expiry, then resumes
    waited = time.monotonic() - crashed
    try:
        assert 0.5 < waited < 2 + 1.5, waited  # within a TTL of the last renewal
    finally:
        retry.release()


def test_a_waiting_driver_gets_the_lease_once_the_holder_releases_it(output):
    holder = OutputLease(output, "a", ttl_s=30).acquire()
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    waiter = OutputLease(output, "b", ttl_s=30, wait_s=20).acquire()
    try:
        assert time.monotonic() - started < 8  # not the 30 s TTL
    finally:
        waiter.release()


def test_a_lost_answer_to_our_own_create_still_takes_the_lease(s3_server, s3_bucket):
    from faulty_proxy import FaultyProxy

    # the conditional create reaches S3, its answer is lost; the retry then meets the lease this driver wrote
    with FaultyProxy(s3_server, every=1, methods={"PUT"}, kinds=("lost",), paths=r"\.lease", limit=1) as proxy:
        cfg = storage.StorageConfig(endpoint_url=proxy.url)
        lease = OutputLease(f"{s3_bucket}/out", "lost", ttl_s=60, cfg=cfg).acquire()
    assert proxy.injected["lost"] == 1
    held = json.loads(storage.read_bytes(lease.uri))
    assert held["token"] == lease.holder.token
    lease.release()
    assert not storage.exists(lease.uri)


def test_a_lost_answer_to_our_own_renewal_keeps_the_lease(s3_server, s3_bucket):
    from faulty_proxy import FaultyProxy

    with FaultyProxy(s3_server, every=1, methods={"PUT"}, kinds=("lost",), paths=r"\.lease", limit=2) as proxy:
        cfg = storage.StorageConfig(endpoint_url=proxy.url)
        lease = OutputLease(f"{s3_bucket}/out", "renew", ttl_s=60, cfg=cfg).acquire()
        _crash(lease)  # renew by hand
        assert lease.renew() and not lease.lost
    assert proxy.injected["lost"] == 2
    assert json.loads(storage.read_bytes(lease.uri))["renewed_at"] == lease.holder.renewed_at
    lease.release()
    assert not storage.exists(lease.uri)


def test_the_lease_is_checked_before_ray_starts(tmp_path):
    """A second driver over a held output exits 2 naming the holder, without starting Ray."""
    images, models, output = tmp_path / "in", tmp_path / "models", str(tmp_path / "out")
    (images / "bottle").mkdir(parents=True)
    (images / "bottle" / "a.png").write_bytes(b"not really a png")
    (models / "bottle" / "v1").mkdir(parents=True)  # an expert as preflight sees it: pointers and metadata
    for pointer in ("LATEST", "LATEST.patchcore"):
        (models / "bottle" / pointer).write_text("v1\n")
    (models / "bottle" / "v1" / "meta.json").write_text('{"backbone": {"name": "resnet18", "weights": "random"}}')
    holder = OutputLease(output, "night-1", ttl_s=60).acquire()
    try:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect.py"), "--input", str(images),
                               "--model-store", str(models), "--output", output, "--mllm", "none",
                               "--run-id", "night-2", "output.lease_wait_s=1"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT)})
        elapsed = time.monotonic() - started
    finally:
        holder.release()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"being written by another driver (run night-1, pid {os.getpid()}" in proc.stderr
    assert "Ray" not in proc.stderr and "ray" not in proc.stdout.lower(), proc.stderr[-3000:]
    assert elapsed < 60, elapsed


def test_run_inspect_takes_the_lease_before_it_connects_to_ray(tmp_path):
    import ray

    from eagle.config import load_config
    from eagle.pipeline.inspection import run_inspect

    output = str(tmp_path / "out")
    cfg = load_config(overrides={"inputs": {"uris": [str(tmp_path)]}, "model_store": str(tmp_path),
                                 "output": {"uri": output, "lease_wait_s": 0}, "run_id": "second"}, env={})
    connected, before = [], ray.is_initialized()  # another test of the session may have started one
    with OutputLease(output, "first", ttl_s=60):
        with pytest.raises(LeaseHeld):
            run_inspect(cfg, connect=lambda: connected.append(1))
    assert connected == [] and ray.is_initialized() == before


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_driver_whose_lease_is_taken_over_stops_and_fails(tmp_path, monkeypatch, sigint):
    """Mid-run, another driver takes the lease over (this one stalled): the renewal thread interrupts the run,
    which fails (exit 3 from the command line) without writing its manifest. Where the process ignores SIGINT (a
    background command of a shell without job control), the interrupt still lands, once the main thread runs Python
    again (here: between short sleeps); where Python handles it, it also ends a blocking call."""
    from eagle.config import load_config
    from eagle.pipeline import inspection

    output = str(tmp_path / "out")
    cfg = load_config(overrides={"inputs": {"uris": [str(tmp_path)]}, "model_store": str(tmp_path),
                                 "output": {"uri": output, "lease_ttl_s": 0.6}, "run_id": "stalled"}, env={})
    wrote = []

    def stalled_run(cfg, run_id, verbose, check_lease, stop=None):
        uri = lease_uri(output)
        found = storage.read_versioned(uri)
        successor = Holder("other-host", 2, "successor", "now", dt.datetime.now(dt.UTC).isoformat(), "night-2", 60)
        assert storage.write_if(uri, json.dumps(successor.__dict__).encode(), found[1]) is not None
        if sigint == "handled":
            time.sleep(10)  # the next renewal finds the successor and interrupts this
        else:
            for _ in range(100):
                time.sleep(0.1)
        wrote.append("rows")  # never reached

    monkeypatch.setattr(inspection, "_run", stalled_run)
    monkeypatch.setattr(inspection, "end_run", lambda *a, **k: wrote.append("manifest"))
    before = signal.signal(signal.SIGINT, signal.default_int_handler if sigint == "handled" else signal.SIG_IGN)
    try:
        started = time.monotonic()
        with pytest.raises(inspection.JobFailed, match="another driver took over the lease"):
            inspection.run_inspect(cfg)
        assert time.monotonic() - started < 5 and wrote == []
    finally:
        signal.signal(signal.SIGINT, before)
    assert Holder.parse(storage.read_bytes(lease_uri(output))).token == "successor"  # left to its new holder
