"""Everything a job needs from Ray, in one place: connecting the driver, the options a stage or task runs
under (from its config), Ray Data's progress reporting, and torch threads inside workers. (Object-store
retries are the S3 client's, in `eagle.io.s3_client`: Ray Data's ``retried_io_errors`` match pyarrow's own S3
errors, which no job raises.)

Connecting: a cluster (config or RAY_ADDRESS), a Ray already running on this machine, or a local instance of
the job's own.

``ray.address`` (config) decides, as ``ray.init`` does for Ray users:

* unset: inside ``ray job submit`` the job's cluster; else RAY_ADDRESS; else a Ray already running on this
  machine (``ray start --head``) is joined, and the log says so; else a local Ray is started for this job.
* ``local``: always start a separate local Ray for this job, even when one is running.
* ``auto`` or ``HOST:PORT`` / ``ray://…``: that cluster (``auto`` fails when none is running).

A local Ray that does not start (a loaded machine: "The current node timed out during startup") is tried
``ray.start_attempts`` times with backoff, then `RayUnavailable` says what to do (the job exits 3). The job's
own SIGINT/SIGTERM handlers are put back after ``ray.init`` (which installs its own: a SIGTERM then aborted the
driver with exit 134). `shutdown_ray` leaves no process of a Ray the job started.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

from eagle.config import JobConfig, StageResources
from eagle.io.storage import SECRET_ENV_VARS, SETTING_ENV_VARS
from eagle.logs import QUIET_ENV, quiet_ray_loggers, ray_logging_level

log = logging.getLogger(__name__)

# Passed to workers in the job's runtime env so they reach the same object store as the driver. Never the
# secrets: Ray keeps a runtime env in its job table, which the dashboard and `ray list jobs --detail` show.
_FORWARDED_ENV = (*SETTING_ENV_VARS, "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "HF_HUB_OFFLINE", "HF_HOME",
                  "EAGLE_TORCH_THREADS", *QUIET_ENV)


# Set by Ray's job supervisor for the entrypoint of a submitted job.
_SUBMITTED_JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


_started_local = False  # this driver started the local Ray it runs on (see ray_options)


def running_local_cluster() -> str | None:
    """Address of a live Ray started on this machine (``ray start``), or None.

    Ray's own lookup (the address file of the last ``ray start``) checked against the GCS processes that are
    alive, so a stale address file from a stopped cluster is not joined.
    """
    from ray._private import services

    address = services.find_bootstrap_address(None)
    return address if address and address in services.find_gcs_addresses() else None


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached: the job exits 3 with this one line."""


# The session folder of the Ray this process started (None: none, or one it joined): `shutdown_ray` reaps it.
_own_session: str | None = None

_START_BACKOFF_S = (10.0, 20.0, 40.0)


def init_ray(cfg: JobConfig) -> None:
    """ray.init once, as the module docstring says; a Ray this job starts gets at least 8 logical CPUs so
    fractional actors never starve read tasks. The caller's SIGINT/SIGTERM handlers stay in place."""
    import ray

    if not ray.is_initialized():
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            _connect(cfg)
        except SystemExit as exc:  # ray.init's own SIGTERM handler, set while it connects: sys.exit(15)
            if exc.code != signal.SIGTERM or not callable(handlers[signal.SIGTERM]):
                raise
            _restore(handlers)
            handlers[signal.SIGTERM](signal.SIGTERM, None)  # the caller's: KeyboardInterrupt, exit 143
            raise
        finally:
            _restore(handlers)
    quiet_ray_loggers()


def _restore(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


_before_shutdown: list[Any] = []


def before_shutdown(stop: Any) -> None:
    """Have `shutdown_ray` call `stop()` first (a stopped run's Ray Data executor, which would otherwise
    fail noisily when Ray goes away under it)."""
    _before_shutdown.append(stop)


def shutdown_ray() -> None:
    """Disconnect from Ray; a Ray this process started is stopped, and any of its processes that outlive
    ``ray.shutdown`` (agents that ignore SIGTERM) are killed. Safe to call more than once."""
    global _own_session
    import ray

    while _before_shutdown:
        try:
            _before_shutdown.pop(0)()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.debug("while stopping before Ray's shutdown: %s", exc)
    ray.shutdown()
    session, _own_session = _own_session, None
    if session:
        reap_session(session)


def session_processes(session: str) -> list[int]:
    """Live processes of a Ray session (Linux, from /proc): those whose command line names its folder (GCS,
    raylet, agents, workers) and their descendants."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if session in cmdline:
            found.add(int(entry))
    grew = True
    while grew:  # descendants of what was found
        more = {pid for pid, parent in parents.items() if parent in found and pid not in found}
        found |= more
        grew = bool(more)
    found.discard(os.getpid())
    return sorted(found)


def reap_session(session: str, wait_s: float = 2.0) -> int:
    """Stop what is left of a Ray session this process started: SIGTERM, then SIGKILL after `wait_s`. Returns
    how many processes were left."""
    left = session_processes(session)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in left):
            time.sleep(0.1)
        if not any(_alive(pid) for pid in left):
            break
    if left:
        log.debug("stopped %d leftover process(es) of Ray session %s", len(left), session)
    return len(left)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie of ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_local(cfg: JobConfig, **kwargs: Any) -> None:
    """``ray.init`` of a local Ray, tried ``ray.start_attempts`` times; what a failed try left is stopped."""
    global _own_session
    import ray

    attempts = cfg.ray.start_attempts
    for attempt in range(1, attempts + 1):
        before = _sessions()
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - "timed out during startup" and its kin: retried, then one line
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            ray.shutdown()
            for session in _sessions() - before:  # a node that failed half-way is not ray.shutdown's to stop
                reap_session(session)
            if attempt == attempts:
                raise RayUnavailable(
                    f"could not start a local Ray ({attempts} tries; last: {cause}). The machine is probably "
                    f"overloaded or short of memory, /dev/shm or disk under {_temp_dir()}: free some, or set "
                    f"ray.address to a running "
                    f"cluster, then run the same command again (with --run-id, to resume a run)") from None
            pause = _START_BACKOFF_S[min(attempt, len(_START_BACKOFF_S)) - 1]
            log.warning("starting a local Ray failed (%s); trying again in %.0f s (try %d of %d, "
                        "ray.start_attempts)", cause, pause, attempt + 1, attempts)
            time.sleep(pause)
        else:
            _own_session = _session_dir()
            return


def _sessions() -> set[str]:
    """Session folders under Ray's temp folder ($RAY_TMPDIR/ray, else /tmp/ray)."""
    import glob

    return {p for p in glob.glob(os.path.join(_temp_dir(), "session_*")) if not p.endswith("_latest")}


def _temp_dir() -> str:
    from ray._common.utils import get_default_ray_temp_dir

    return get_default_ray_temp_dir()


def _session_dir() -> str | None:
    """The session folder of the Ray this process started or joined, if any."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a node that failed half-way
        return None


def _connect(cfg: JobConfig) -> None:
    import ray

    global _started_local
    _started_local = False

    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    secrets = [k for k in SECRET_ENV_VARS if os.environ.get(k)]
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get(_SUBMITTED_JOB_VAR):
        # Started by `ray job submit`: the job's runtime env already reaches the workers, and Ray refuses to
        # merge a second one that sets the same variables.
        ray.init(address=address, log_to_driver=True, logging_level=ray_logging_level())
        return
    if address is None and (running := running_local_cluster()):
        log.info("joining the Ray already running on this machine at %s (ray.address=local starts a separate "
                 "one for this job)", running)
        address = running
    if address and address != "local":
        if secrets and cfg.ray.forward_credentials:
            log.warning("ray.forward_credentials: sending %s to the cluster's workers in the job's runtime env "
                        "(readable by anyone who can read the Ray dashboard)", ", ".join(secrets))
            env.update({k: os.environ[k] for k in secrets})
        elif secrets:
            log.info("not sending %s to the cluster (Ray would show them in its job table): its workers use "
                     "their own credentials (instance profile, IRSA, a Secret in the pod env, a credentials file "
                     "or AWS_PROFILE); ray.forward_credentials=true sends them anyway", ", ".join(secrets))
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=True,
                     logging_level=ray_logging_level())
        except (ConnectionError, TimeoutError) as exc:
            raise RayUnavailable(f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0]}): check "
                                 f"ray.address / RAY_ADDRESS and that the cluster is up, then run the same command "
                                 f"again") from None
        resources = ray.cluster_resources()
        log.info("connected to Ray at %s: %g CPUs, %g GPUs", address, resources.get("CPU", 0),
                 resources.get("GPU", 0))
        return
    num_cpus = cfg.ray.num_cpus or max(8, os.cpu_count() or 1)
    log.info("starting a local Ray with %d logical CPUs on %d cores (ray.num_cpus; fractional stages share "
             "them)", num_cpus, os.cpu_count() or 1)
    # Ray 2.60 turns token authentication on for a local cluster and warns about it when RAY_AUTH_MODE is unset;
    # saying so explicitly keeps it on (a token is made in ~/.ray/auth_token if missing) without the WARNING.
    # Ray reads the mode into its cached config, refreshed here as Ray does when it turns the mode on itself.
    if "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
    _started_local = True
    # Workers of a Ray this job starts inherit its environment, credentials included: no runtime env needed.
    _start_local(cfg, address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env} if env else None, logging_level=ray_logging_level())


def ray_options(res: StageResources, actor: bool) -> dict[str, Any]:
    """Ray resource options of one stage from its config (``map_batches`` or ``ray.remote(...).options``)."""
    import ray

    args: dict[str, Any] = {"num_cpus": res.num_cpus}
    if res.num_gpus:
        args["num_gpus"] = res.num_gpus
    if res.accelerator_type:
        args["accelerator_type"] = res.accelerator_type
    if actor:
        args["compute"] = ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors)
        # Ray Data hands every actor of a pool its function and context as object-store references; with
        # restarts on, Ray logs an `E ... core_worker.cc` line about them (a false alarm, ray-project/ray#57733:
        # Ray Data holds those references for the pool's life). On a local Ray of the job's own a dead actor is
        # not restarted unless max_restarts says so (the run fails and its --run-id resumes it); on a cluster,
        # where nodes come and go, Ray Data's default (unlimited restarts) stays, and so does that line.
        restarts = res.max_restarts if res.max_restarts is not None else 0 if _started_local else None
        if restarts is not None:  # Ray Data takes these only as (deprecated) ray_remote_args
            args["max_restarts"] = restarts
            args["max_task_retries"] = -1 if restarts else 0
    return args


def configure_data_context(progress: type | None = None, verbose: bool = False) -> None:
    """Ray Data's reporting for this driver's datasets: its progress bars only when `verbose`, else the
    `progress` execution callback class (eagle.pipeline.progress) reports."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    if not verbose:
        # Its memory figure is the worker process's, which holds models an earlier task loaded: a false alarm
        # for the light listing/decode tasks, many lines long.
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if progress is not None and not verbose:
        ctx.custom_execution_callback_classes = [progress]


def configure_threads(torch: Any) -> int:
    """Torch threads inside a Ray worker (Ray sets OMP_NUM_THREADS=1 there): EAGLE_TORCH_THREADS if set, else
    the CPUs Ray assigned to this worker (at least 1)."""
    wanted = os.environ.get("EAGLE_TORCH_THREADS")
    if wanted:
        n = int(wanted)
    else:
        import ray

        cpus = 1.0  # outside Ray, or in a driver (get_runtime_context() would start a Ray outside one)
        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        n = max(1, math.floor(cpus))
    torch.set_num_threads(n)
    return n
