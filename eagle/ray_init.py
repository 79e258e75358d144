"""Connect a job's driver to Ray: a cluster (config or RAY_ADDRESS) or a local instance sized for the machine."""

from __future__ import annotations

import logging
import os

from eagle.config import JobConfig

log = logging.getLogger(__name__)

# Passed to workers so they reach the same object store as the driver (settings must exist before ray.init).
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_HUB_OFFLINE",
                  "HF_HOME", "EAGLE_TORCH_THREADS")


# Set by Ray's job supervisor for the entrypoint of a submitted job.
_SUBMITTED_JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def init_ray(cfg: JobConfig) -> None:
    """ray.init once; a local Ray gets at least 8 logical CPUs so fractional actors never starve read tasks."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get(_SUBMITTED_JOB_VAR):
        # Started by `ray job submit`: the job's runtime env already reaches the workers, and Ray refuses to
        # merge a second one that sets the same variables.
        ray.init(address=address, log_to_driver=True)
        return
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
        return
    num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
