"""Connect a job's driver to Ray: a cluster (config or RAY_ADDRESS), a Ray already running on this machine,
or a local instance of its own.

``ray.address`` (config) decides, as ``ray.init`` does for Ray users:

* unset: inside ``ray job submit`` the job's cluster; else RAY_ADDRESS; else a Ray already running on this
  machine (``ray start --head``) is joined, and the log says so; else a local Ray is started for this job.
* ``local``: always start a separate local Ray for this job, even when one is running.
* ``auto`` or ``HOST:PORT`` / ``ray://…``: that cluster (``auto`` fails when none is running).
"""

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


def running_local_cluster() -> str | None:
    """Address of a live Ray started on this machine (``ray start``), or None.

    Ray's own lookup (the address file of the last ``ray start``) checked against the GCS processes that are
    alive, so a stale address file from a stopped cluster is not joined.
    """
    from ray._private import services

    address = services.find_bootstrap_address(None)
    return address if address and address in services.find_gcs_addresses() else None


def init_ray(cfg: JobConfig) -> None:
    """ray.init once, as the module docstring says; a Ray this job starts gets at least 8 logical CPUs so
    fractional actors never starve read tasks."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get(_SUBMITTED_JOB_VAR):
        # Started by `ray job submit`: the job's runtime env already reaches the workers, and Ray refuses to
        # merge a second one that sets the same variables.
        ray.init(address=address, log_to_driver=True)
        return
    if address is None and (running := running_local_cluster()):
        log.info("joining the Ray already running on this machine at %s (ray.address=local starts a separate "
                 "one for this job)", running)
        address = running
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        resources = ray.cluster_resources()
        log.info("connected to Ray at %s: %g CPUs, %g GPUs", address, resources.get("CPU", 0),
                 resources.get("GPU", 0))
        return
    num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
