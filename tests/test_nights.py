"""A week of nights, in CI: seven scheduled incremental re-audits over a growing archive on the local S3 server,
with a SIGTERM mid-run, a SIGKILL mid-run and an immediate retry, a lease left by a dead driver, two overlapping
drivers on one output, 10% S3 faults and a maintenance run (the scenario: tests/nights.py; 50 nights:
bench/bench_nights.py). Every night completes after its retries, audits each image due in it exactly once,
loses nothing written before, and `latest` is the newest successful row per image."""

from __future__ import annotations

import pytest
from nights import Nights, fit_pool, pool_size

pytestmark = pytest.mark.slow


def test_a_week_of_nights(s3_bucket, ray_local, tmp_path):
    import ray

    nights = 7
    pool = fit_pool(tmp_path / "pool", f"{s3_bucket}/models", pool_size(nights))
    scenario = Nights(s3_bucket, pool, f"{s3_bucket}/models", ray.get_runtime_context().gcs_address, tmp_path)
    figures = scenario.run(nights)
    print("\n" + figures.line())
    assert figures.runs == nights and figures.duplicates == 0 and figures.lost_rows == 0
    # a SIGTERM and a SIGKILL mid-run; a fast machine may finish a night's rows before its signal lands, which
    # the figures count as a missed kill (that night is then a plain one), but not both
    assert figures.kills + figures.missed_kills == 2 and figures.kills >= 1
    assert figures.refused == 1 and figures.maintenance == 1 and figures.s3_faults > 0
    assert figures.retries >= figures.kills + 1  # after each kill and the refusal; more when faults failed a try
    assert figures.images == len(scenario.present) and figures.audited >= figures.images
