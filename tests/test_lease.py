"""One driver per run id: the lease is exclusive, renewed, refused with the holder named, taken over once
expired, and released at the end; on a real S3 endpoint through conditional writes."""

from __future__ import annotations

import json
import re
import time

import pytest

from eagle.io import storage
from eagle.io.lease import LeaseHeld, RunLease


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    return str(tmp_path / "out") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/out"


def test_second_driver_is_refused_with_the_holders_identity(output):
    first = RunLease(output, "r1", ttl_s=60).acquire()
    try:
        expected = rf"pid {first.holder.pid} on {re.escape(first.holder.host)}, started {re.escape(first.holder.started_at)}"
        with pytest.raises(LeaseHeld, match=expected):
            RunLease(output, "r1", ttl_s=60).acquire()
        RunLease(output, "other-run", ttl_s=60).acquire().release()  # other run ids are free
    finally:
        first.release()
    assert not storage.exists(first.uri)  # released: the next driver gets it
    RunLease(output, "r1", ttl_s=60).acquire().release()


def test_lease_is_renewed_while_held_and_taken_over_once_expired(output):
    held = RunLease(output, "r2", ttl_s=0.9).acquire()
    first_seen = json.loads(storage.read_bytes(held.uri))["renewed_at"]
    time.sleep(1.2)
    assert json.loads(storage.read_bytes(held.uri))["renewed_at"] > first_seen  # renewed: still held
    with pytest.raises(LeaseHeld):
        RunLease(output, "r2", ttl_s=0.9).acquire()
    held._stop.set()  # the holder "crashes": no more renewals, no release
    held._thread.join()
    time.sleep(1.0)
    taker = RunLease(output, "r2", ttl_s=0.9).acquire()  # expired: a resume takes it over
    try:
        assert json.loads(storage.read_bytes(taker.uri))["token"] == taker.holder.token
    finally:
        taker.release()
        held.release()  # the old holder's late release must not remove anything it no longer owns


def test_a_lost_answer_to_our_own_create_still_takes_the_lease(s3_server, s3_bucket):
    from faulty_proxy import FaultyProxy

    # the conditional create reaches S3, its answer is lost; the retry then meets the lease this driver wrote
    with FaultyProxy(s3_server, every=1, methods={"PUT"}, kinds=("lost",), paths=r"\.lease", limit=1) as proxy:
        cfg = storage.StorageConfig(endpoint_url=proxy.url)
        lease = RunLease(f"{s3_bucket}/out", "lost", ttl_s=60, cfg=cfg).acquire()
    assert proxy.injected["lost"] == 1
    held = json.loads(storage.read_bytes(lease.uri))
    assert held["token"] == lease.holder.token
    lease.release()
    assert not storage.exists(lease.uri)
