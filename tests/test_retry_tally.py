"""The job's storage-retry tally: one per job, alive while the driver is, whoever dropped their handle."""

from __future__ import annotations

import gc
import time

from eagle.pipeline.retry_tally import read_tally, start_tally


def test_the_tally_outlives_the_handles_a_job_drops(ray_local):
    # fit and inspect in one driver (the demo, the benches) each take the tally and let their handle go
    first = start_tally()
    first.add.remote("write")
    before = read_tally(first)
    del first
    gc.collect()
    time.sleep(1.0)  # Ray would end an actor nobody refers to by now
    again = start_tally()
    again.add.remote("read")
    after = read_tally(again)
    assert after["write"] == before["write"] >= 1 and after["read"] == before["read"] + 1
