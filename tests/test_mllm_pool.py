"""The MLLM actor pool (eagle.pipeline.mllm_pool) on a local Ray: it starts with the actors that load, drops
those that cannot be placed in time, fails before any image is read when the model cannot load, and is gone
after the run."""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pytest

from eagle.config import load_config
from eagle.pipeline.mllm_pool import PoolFailed, _started, mllm_pool

pytestmark = pytest.mark.slow


class _Fake:
    """Answers every row 'no'; `slow` never finishes loading, `broken` cannot load."""

    def __init__(self, cfg=None, slow: bool = False, broken: bool = False) -> None:
        if broken:
            raise OSError("no such checkpoint")
        self.slow, self.rows = slow, 0

    def ready(self) -> bool:
        if self.slow:
            time.sleep(3600)
        return True

    def answer(self, batch):
        self.rows += len(batch["image_uri"])
        return {**batch, "answer": np.array(["no"] * len(batch["image_uri"]), dtype=object)}

    def traffic(self):
        return self.rows, 0


@pytest.fixture()
def fake(ray_local):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    return ray.remote(_Fake).options(num_cpus=0.1)


def test_the_pool_starts_with_the_actors_ready_in_time_and_drops_the_rest(fake, caplog):
    import ray

    quick, slow = fake.remote(), fake.remote(slow=True)
    with caplog.at_level(logging.WARNING, "eagle.inspect"):
        assert _started([quick, slow], needed=1, grace_s=1.0, timeout_s=60.0, model="m") == [quick]
    assert "1 of 2 actors ready; 1 could not be placed within 1 s and are stopped" in caplog.text
    with pytest.raises(ray.exceptions.RayActorError):  # killed: it will not hold resources for nothing
        ray.get(slow.traffic.remote(), timeout=30)


def test_a_pool_whose_minimum_cannot_be_placed_fails_in_bounded_time(fake):
    with pytest.raises(PoolFailed, match="only 0 of the 1 MLLM actors .* could be placed and loaded in 2 s"):
        _started([fake.remote(slow=True)], needed=1, grace_s=1.0, timeout_s=2.0, model="m", wanted="num_gpus=1")


def test_a_model_that_cannot_load_fails_the_pool_before_any_image(fake):
    with pytest.raises(PoolFailed, match="^the MLLM actors could not load 'tiny': OSError: no such checkpoint$"):
        _started([fake.remote(broken=True)], needed=1, grace_s=1.0, timeout_s=60.0, model="tiny")


def test_the_pool_answers_counts_and_is_gone_after_the_run(ray_local):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_config(overrides={"mllm": {"model": "fake"}, "resources": {"mllm": {"max_actors": 2,
                                                                                    "num_cpus": 0.1}}}, env={})
    with mllm_pool(cfg, actor_class=_Fake, grace_s=5.0) as pool:
        batch = {"image_uri": np.array(["a", "b", "c"], dtype=object)}
        assert list(pool.ask(batch)["answer"]) == ["no"] * 3
        assert pool.traffic()[0] == 3 and len(pool.actors) == 2
        actors = list(pool.actors)
    time.sleep(1.0)
    for actor in actors:  # killed with the run
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.traffic.remote(), timeout=30)
