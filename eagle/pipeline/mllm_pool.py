"""The run's MLLM actors, outside Ray Data's stream: only the rows routed to the MLLM ever reach them.

Ray Data has no streaming fork, so the stream is not split into two datasets. The finish stage (CPU tasks)
sees every row after the expert, keeps the expert's verdict for the rows the routing policy does not send on,
and hands the routed ones (a few hundred bytes each: no pixels) to one of these actors, waiting for the answers
before it emits the whole batch. Each image therefore still leaves the pipeline as exactly one row, while the
GPU actors receive only their work.

The pool is fixed for the run: up to ``resources.mllm.max_actors`` actors (at least ``min_actors``), started
and their models loaded before images flow (`mllm_pool`), and killed when the run ends. An actor that dies is
restarted (``resources.mllm.max_restarts``, default unlimited) and the call retried twice; a call that still
fails leaves its rows with the expert's verdict and the error (`failed_mllm`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from eagle.config import JobConfig
from eagle.pipeline.ray_setup import ray_options
from eagle.pipeline.remote_errors import remote_message
from eagle.pipeline.stages.base import Batch

log = logging.getLogger("eagle.inspect")

CALL_RETRIES = 2  # a call is retried this often on a restarted actor, so one row cannot crash-loop an actor
START_GRACE_S = 120.0  # how long the pool waits for actors beyond min_actors before the run starts
START_TIMEOUT_S = 1800.0  # how long it waits for min_actors (GPU nodes scaling from zero, model downloads)


class PoolFailed(RuntimeError):
    """The MLLM actors could not start (the model cannot load, or does not fit)."""


class MLLMPool:
    """Handles to the MLLM actors; picklable, so the finish tasks carry it."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    def ask(self, batch: Batch) -> Batch:
        """The answered batch, from a randomly chosen actor (calls queue on the actor)."""
        import ray

        return ray.get(random.choice(self.actors).answer.remote(batch))

    def traffic(self) -> tuple[int, int]:
        """(rows, bytes) the actors were sent, summed; an actor that restarted counts from its restart, a dead
        one not at all."""
        import ray

        rows = size = 0
        for actor in self.actors:
            try:
                r, b = ray.get(actor.traffic.remote())
            except ray.exceptions.RayActorError:
                continue
            rows, size = rows + r, size + b
        return rows, size


class InProcessPool:
    """One MLLM stage in this process behind the pool's interface: what the actors do, without Ray (benches,
    tests)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def ask(self, batch: Batch) -> Batch:
        return self.stage.answer(batch)

    def traffic(self) -> tuple[int, int]:
        return self.stage.traffic()


@contextmanager
def mllm_pool(cfg: JobConfig, actor_class: type | None = None, grace_s: float = START_GRACE_S,
              timeout_s: float = START_TIMEOUT_S) -> Iterator[MLLMPool]:
    """Start the pool, yield it, kill it. It waits until ``resources.mllm.min_actors`` actors have loaded their
    model (at most `timeout_s`: then the cluster cannot place them), then up to `grace_s` more for the rest of
    ``max_actors`` (an autoscaling cluster adds GPU nodes meanwhile); actors still not placed then are killed,
    so a cluster smaller than max_actors never stalls the run. A model that cannot load fails here, before any
    image is read. `actor_class` replaces MLLMStage in tests."""
    import ray

    from eagle.pipeline.stages.mllm_stage import MLLMStage

    res = cfg.resources.mllm
    restarts = -1 if res.max_restarts is None else res.max_restarts
    options = {**ray_options(res, actor=False), "max_restarts": restarts,
               "max_task_retries": CALL_RETRIES if restarts else 0}
    remote = ray.remote(actor_class or MLLMStage).options(**options)
    actors: list[Any] = []
    try:
        actors += [remote.remote(cfg) for _ in range(res.max_actors)]
        wanted = ", ".join(f"{k}={v}" for k, v in options.items() if k.startswith("num_") or k == "accelerator_type")
        log.info("starting %d MLLM actor(s) (%s)", len(actors), wanted)
        ready = _started(actors, min(res.min_actors, res.max_actors), grace_s, timeout_s, cfg.mllm.model, wanted)
        yield MLLMPool(ready)
    finally:
        for actor in actors:
            ray.kill(actor)


def _started(actors: list[Any], needed: int, grace_s: float, timeout_s: float, model: str | None,
             wanted: str = "") -> list[Any]:
    """The actors whose model loaded: at least `needed` within `timeout_s`, and the others that are ready
    within `grace_s` after; the rest are killed."""
    import ray

    pending = {actor.ready.remote(): actor for actor in actors}
    ready: list[Any] = []
    give_up, deadline = time.monotonic() + timeout_s, float("inf")
    while pending:
        now = time.monotonic()
        wait = min(60.0, give_up - now) if len(ready) < needed else deadline - now
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait))
        if not done:
            if len(ready) >= needed:
                break
            if time.monotonic() >= give_up:
                raise PoolFailed(f"only {len(ready)} of the {needed} MLLM actors (resources.mllm.min_actors) "
                                 f"could be placed and loaded in {timeout_s:.0f} s ({wanted}): does the cluster "
                                 f"have these resources (GPUs, accelerator type)?")
            log.info("waiting for MLLM actors: %d of %d ready, %d needed (resources.mllm.min_actors)",
                     len(ready), len(actors), needed)
            continue
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as exc:
            raise PoolFailed(f"the MLLM actors could not load {model!r}: {remote_message(exc)}") from exc
        ready.append(pending.pop(done[0]))
        if len(ready) == needed:
            deadline = time.monotonic() + grace_s
    if pending:
        log.warning("MLLM pool: %d of %d actors ready; %d could not be placed within %.0f s and are stopped",
                    len(ready), len(actors), len(pending), grace_s)
        for actor in pending.values():  # else they would be placed later and hold their GPUs idle
            ray.kill(actor)
    return ready
