"""Cluster and schedule manifests, checked offline: Ray's own validators, the KubeRay CRD schemas (vendored in
tests/data/kuberay/) and the Kubernetes API schemas (kubernetes-validate) with unknown fields reported, KubeRay's
own reading of rayStartParams, the IAM policies the launcher needs, cross-file consistency (the commands exist
and parse, the config loads, the clusters can host the configured actors), and no credentials anywhere.
The CronJob's submit wrapper (infra/run_ray_job.py) is exercised in tests/test_run_ray_job.py.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray._private.utils import parse_resources_json
from ray.autoscaler._private.cli_logger import cf, cli_logger
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util.accelerators import accelerators as ray_accelerators

from eagle.config import JobConfig, deep_merge, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CLUSTER_YAML = ROOT / "ray_cluster.yaml"  # the default: infra/Dockerfile's image, nothing installed at boot
VENV_CLUSTER_YAML = ROOT / "infra" / "ray_cluster.venv.yaml"  # the same cluster, a venv built on each node
LAUNCHERS = [CLUSTER_YAML, VENV_CLUSTER_YAML]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
IAM = ROOT / "infra" / "iam"
RUN_RAY_JOB = "infra/run_ray_job.py"
CRDS = ROOT / "tests" / "data" / "kuberay"  # KubeRay's CRDs, version in its README.md
KUBERAY_CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# The oldest Kubernetes the manifests are checked against, and the minimum docs/CLUSTER.md states: CronJob timeZone
# (GA), the batch.kubernetes.io/job-name label and podFailurePolicy (beta, on by default) all need 1.27.
K8S_VERSION = "1.27"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KNOWN_ACCELERATORS = {v for k, v in vars(ray_accelerators).items() if k.isupper() and isinstance(v, str)}
SENSITIVE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no document"
    return docs


def _one(kind: str, name: str | None = None) -> tuple[Path, dict]:
    found = [(p, d) for p in MANIFESTS for d in _docs(p)
             if d.get("kind") == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} under infra/kuberay, found {len(found)}"
    return found[0]


REAUDIT, MAINTAIN = "eagle-audit-reaudit", "eagle-audit-maintain"  # the two CronJobs
CRON_JOBS = {REAUDIT: "jobs/inspect.py", MAINTAIN: "jobs/maintain.py"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lock_pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", lock.read_text(), flags=re.M))


def _pin(name: str) -> str:
    for dep in _project()["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


# ---------------------------------------------------------------------------------------------- helpers
_CRON_FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    (0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
]


def cron_ok(expr: str) -> bool:
    """A standard 5-field cron expression (what a batch/v1 CronJob schedule takes, macros aside)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in field.lower().split(","):
            m = re.fullmatch(r"(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/(\d+))?", part)
            if not m or (m.group(2) is not None and int(m.group(2)) < 1):
                return False
            if m.group(1) == "*":
                continue
            bounds = []
            for tok in m.group(1).split("-"):
                value = names.get(tok, int(tok) if tok.isdigit() else None)
                if value is None or not lo <= value <= hi:
                    return False
                bounds.append(value)
            if len(bounds) == 2 and bounds[0] > bounds[1]:
                return False
    return True


def unplaceable(node_types: dict[str, dict], cfg: JobConfig) -> list[str]:
    """Stages the cluster cannot run: no worker type fits one task/actor, or too few fit at max scale."""
    workers = {name: t for name, t in node_types.items() if t.get("max_workers", 0) > 0}
    problems = []
    for stage in ("decode", "expert", "mllm"):
        r = getattr(cfg.resources, stage)
        demand = {"CPU": r.num_cpus, "GPU": r.num_gpus}
        if r.accelerator_type:
            demand[f"accelerator_type:{r.accelerator_type}"] = 0.001  # what Ray Data asks for
        per_node = {}
        for name, t in workers.items():
            fit = min((t["resources"].get(k, 0) / v for k, v in demand.items() if v > 0), default=math.inf)
            if fit >= 1:
                per_node[name] = math.floor(fit + 1e-9)
        if not per_node:
            problems.append(f"{stage}: no worker type offers {demand}")
        elif stage != "decode":  # decode runs tasks, not an actor pool
            capacity = sum(n * workers[name]["max_workers"] for name, n in per_node.items())
            if capacity < r.max_actors:
                problems.append(f"{stage}: max_actors={r.max_actors} but only {capacity} fit at max scale")
    return problems


def _configmap_config() -> str:
    _, cm = _one("ConfigMap")
    return cm["data"]["audit.yaml"]


def _example_config(tmp_path: Path) -> JobConfig:
    path = tmp_path / "audit.yaml"
    path.write_text(_configmap_config())
    return load_config(path, env={})


def _kuberay_node_types(cluster_spec: dict) -> dict[str, dict]:
    cr = {"metadata": {"name": "eagle-audit", "namespace": "default"}, "spec": copy.deepcopy(cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]  # runs validate_config too


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(p.name, d["spec"]) for p in MANIFESTS for d in _docs(p) if d.get("kind") == "RayCluster"]
    specs += [(p.name, d["spec"]["rayClusterSpec"]) for p in MANIFESTS for d in _docs(p)
              if d.get("kind") == "RayJob" and "rayClusterSpec" in d["spec"]]
    return specs


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _dicts(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dicts(v)


_JOB_CALL = re.compile(r"(?:^|[\s;&|(])python3?\s+(\S*jobs/[\w.-]+\.py)([^\n;&|]*)")


def job_calls(text: str) -> list[tuple[str, list[str]]]:
    """`python jobs/X.py ARGS` invocations in a shell string: (repo-relative script, argv)."""
    text = text.replace("\\\n", " ")
    calls = []
    for m in _JOB_CALL.finditer(text):
        script = m.group(1)[m.group(1).index("jobs/"):]
        # Shell variables get a sample value (e.g. the CronJob's Job name as --run-id).
        argv = [re.sub(r"\$\{?\w+\}?|\$\(\w+\)", "sample-run-1", a) for a in shlex.split(m.group(2))]
        calls.append((script, argv))
    return calls


def _load_job_module(script: str):
    """A script's module; for a thin `jobs/X.py`, the command-line module it runs (eagle.cli.X_cmd)."""
    if script.startswith("jobs/"):
        name = f"eagle.cli.{Path(script).stem}_cmd"
        assert f"from {name} import main" in (ROOT / script).read_text(), f"{script} does not run {name}"
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"_infra_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(module, argv: list[str]):
    try:
        return module.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{module.__name__}.parse_args rejects {argv}") from exc


def _head_file(head_pod: dict, path: str, configmaps: dict[str, dict]) -> str:
    """Content of `path` inside the head container when it comes from a ConfigMap volume."""
    container = head_pod["containers"][0]
    volumes = {v["name"]: v for v in head_pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            cm_ref = volumes[mount["name"]].get("configMap")
            assert cm_ref, f"{mount['mountPath']} is not a ConfigMap volume"
            assert cm_ref["name"] in configmaps, f"ConfigMap {cm_ref['name']} is not defined under infra/kuberay"
            key = path[len(prefix):]
            items = {i["path"]: i["key"] for i in cm_ref.get("items", [])} or {key: key}
            assert key in items, f"{path}: ConfigMap volume does not project {key}"
            return configmaps[cm_ref["name"]]["data"][items[key]]
    raise AssertionError(f"{path} is not mounted on the head")


# ---------------------------------------------------------------------------------------------- Ray launcher
_IMAGE_INSTALLERS = re.compile(r"\b(pip3?|uv|conda|mamba|apt(-get)?|yum|dnf)\b[^;&|]*\binstall\b|install\.sh|\buv (venv|pip)\b")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_validation(path: Path):
    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and prepared["provider"]["type"] == "aws"
    # The validator is live: the same config with a fractional resource or an undeclared head type fails.
    bad = copy.deepcopy(prepared)
    bad["available_node_types"]["mllm_gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(prepared)
    bad["head_node_type"] = "missing"
    with pytest.raises(ValueError):
        validate_config(bad)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_cluster_yaml_node_types_and_limits(path: Path):
    cfg = yaml.safe_load(path.read_text())
    types = cfg["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "expert_gpu", "mllm_gpu"}
    for name, t in types.items():
        # Declared, since `ray up` offline (or without EC2 describe rights) cannot autodetect them.
        assert "CPU" in t["resources"], name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["node_config"]["InstanceType"], name
    assert types["head"]["max_workers"] == 0
    for gpu_type in ("expert_gpu", "mllm_gpu"):
        res = types[gpu_type]["resources"]
        assert res["GPU"] >= 1
        accels = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        assert len(accels) == 1 and accels[0] in KNOWN_ACCELERATORS, res
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in types.values()), "per-type maxima unreachable"


def _boot_commands(cfg: dict) -> list[str]:
    return [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                          "worker_setup_commands") for c in cfg.get(key, [])]


def _check_token_auth(cfg: dict) -> None:
    assert cfg["file_mounts"].get("~/ray-auth") == "infra/ray-auth" and (ROOT / "infra" / "ray-auth").is_dir()
    assert any("ray get-auth-token --generate" in c for c in cfg["head_setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=$HOME/ray-auth/auth_token" in start, key


# ------------------------------------------------------------------ Ray's own NodeUpdater, on a simulated node
TOKEN = "f" * 32  # what the head generated
_HOME = "/home/ray"  # the image's HOME (rayproject/ray's user)


class _SimulatedNode:
    """A worker node as Ray's NodeUpdater sees it through a fake process runner (`check_call`/`check_output`):
    the host's files (what rsync and ssh put there), the container started by `docker run` (its bind mounts) and
    files copied into it (`docker cp`, `rsync -e 'docker exec -i'`). Every command is recorded."""

    DEVNULL = subprocess.DEVNULL

    def __init__(self) -> None:
        self.host: dict[str, bytes] = {}
        self.container: dict[str, bytes] = {}
        self.mounts: list[tuple[str, str]] = []  # (host folder, container folder)
        self.running = False
        self.commands: list[str] = []  # remote commands, in order
        self.container_commands: list[str] = []

    # the process-runner interface
    def check_call(self, cmd, **_: Any) -> int:
        self._run(cmd)
        return 0

    def check_output(self, cmd, **_: Any) -> bytes:
        return self._run(cmd).encode()

    def _run(self, cmd: list[str]) -> str:
        if cmd[0] == "rsync":  # local (the head's container) -> this node's host
            source, target = cmd[-2], cmd[-1].split(":", 1)[1]
            self._copy_local(source, target)
            return ""
        assert cmd[0] in ("ssh", "scp"), cmd
        remote = _unwrap_login_shell(cmd[cmd.index("bash"):] if "bash" in cmd else cmd[-1:])
        self.commands.append(remote)
        return self._remote(remote)

    def _copy_local(self, source: str, target: str) -> None:
        src = Path(source)
        if src.is_dir():
            for f in src.rglob("*"):
                if f.is_file():
                    self.host[posix_join(target, str(f.relative_to(src)))] = f.read_bytes()
        else:
            self.host[target.rstrip("/")] = src.read_bytes()

    def _remote(self, remote: str) -> str:
        body = re.sub(r"^(export [^;]*; )+", "", remote)
        if body.startswith("command -v docker"):
            return "/usr/bin/docker"
        if body.startswith("cat /proc/meminfo"):
            return "MemAvailable: 16000000 kB"
        if body.startswith("docker info"):
            return "map[runc:{...}]"
        if body.startswith("docker inspect -f '{{json .Config.Env}}'"):
            return json.dumps([f"HOME={_HOME}", "PATH=/usr/bin"])
        if body.startswith("docker inspect"):
            if not self.running:
                return "Error: No such object: ray_container"
            if ".State.Running" in body:
                return "true"
            if ".Mounts" in body:
                return json.dumps([{"Source": s, "Destination": d} for s, d in self.mounts])
            return "registry.example.com/eagle-audit:0.1.0"
        if body.startswith("docker run"):
            for src, dst in re.findall(r"-v (\S+):(\S+)", body):
                self.mounts.append((src, dst.replace("~/", _HOME + "/")))
            self.running = True
            return ""
        if body.startswith("docker exec ray_container printenv HOME"):
            return _HOME
        m = re.match(r"(?:mkdir -p \S+ && )?rsync -e '\w+ exec -i' -avz (\S+) ray_container:(\S+)$", body) or \
            re.match(r"docker cp (\S+) ray_container:(\S+)$", body)
        if m:  # host -> container
            src, dst = m.group(1).removesuffix("/."), m.group(2)
            for path, data in list(self.host.items()):
                if path == src or path.startswith(src.rstrip("/") + "/"):
                    self.container[posix_join(dst, path[len(src):].lstrip("/")) if path != src else dst] = data
            return ""
        if body.startswith("docker exec"):
            argv = shlex.split(body)
            inner = argv[argv.index("-c") + 1]
            self.container_commands.append(_unwrap_login_shell(shlex.split(inner)) if inner.startswith("bash ")
                                           else inner)
            return ""
        return ""  # uptime, mkdir/chown on the host, docker pull, ...

    def read_in_container(self, path: str) -> bytes | None:
        """A file as a process in the container sees it: copied in, or under a bind mount."""
        path = path.replace("$HOME", _HOME).replace("~/", _HOME + "/")
        if path in self.container:
            return self.container[path]
        for src, dst in self.mounts:
            if path.startswith(dst.rstrip("/") + "/"):
                found = self.host.get(posix_join(src, path[len(dst.rstrip("/")) + 1:]))
                if found is not None:
                    return found
        return None


_LOGIN = re.compile(r"^source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && \((.*)\)$", re.S)


def _unwrap_login_shell(argv: list[str]) -> str:
    """The command inside Ray's login-shell wrapper (`bash --login -c -i 'source ~/.bashrc; ... && (CMD)'`)."""
    if argv[:4] == ["bash", "--login", "-c", "-i"]:
        text = " ".join(argv[4:])
        text = shlex.split(text)[0] if text.startswith("'") else text
        m = _LOGIN.match(text)
        return m.group(1) if m else text
    return argv[-1]


def posix_join(*parts: str) -> str:
    import posixpath

    return posixpath.join(*parts)


def _head_home(tmp_path: Path, cfg: dict) -> Path:
    """The head container's home after `ray up`: file_mounts synced there, then head_setup_commands run (with a
    fake `ray` whose `get-auth-token --generate` writes ~/.ray/auth_token as Ray's does)."""
    home = tmp_path / "head-home"
    for remote, local in cfg["file_mounts"].items():
        dest = home / remote.removeprefix("~/")
        src = ROOT / local
        if src.is_dir() and local != ".":
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
        else:
            dest.mkdir(parents=True, exist_ok=True)
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!/bin/bash\n[ \"$1 $2\" = 'get-auth-token --generate' ] || exit 2\nmkdir -p ~/.ray\n"
                    f"test -s ~/.ray/auth_token || printf {TOKEN} > ~/.ray/auth_token\ncat ~/.ray/auth_token\n")
    fake.chmod(0o755)
    for command in cfg["head_setup_commands"]:
        subprocess.run(["bash", "-ec", command], env={"HOME": str(home), "PATH": f"{fake.parent}:/usr/bin:/bin"},
                       check=True, timeout=30)
    return home


def _update_worker(cfg: dict, head_home: Path, monkeypatch) -> _SimulatedNode:
    """Ray's NodeUpdater for a new worker, as the head's autoscaler runs it (StandardAutoscaler.spawn_updater:
    the bootstrap config's file_mounts, remapped to the head's own copies, and cluster_synced_files)."""
    from ray.autoscaler._private.updater import NodeUpdater
    from ray.autoscaler.node_provider import NodeProvider
    from ray.autoscaler.tags import STATUS_UP_TO_DATE, TAG_RAY_NODE_STATUS

    class Provider(NodeProvider):
        def __init__(self):
            super().__init__({"type": "fake"}, cfg["cluster_name"])
            self.tags: dict[str, str] = {}

        def node_tags(self, node_id):
            return dict(self.tags)

        def set_node_tags(self, node_id, tags):
            self.tags.update(tags)

        def internal_ip(self, node_id):
            return "10.0.0.5"

        def external_ip(self, node_id):
            return "10.0.0.5"

        def is_terminated(self, node_id):
            return False

        def is_running(self, node_id):
            return True

    from ray.autoscaler._private.util import with_head_node_ip

    monkeypatch.setenv("HOME", str(head_home))  # the head container's home: the sources of every sync
    node, provider = _SimulatedNode(), Provider()
    updater = NodeUpdater(
        node_id="i-worker", provider_config={"type": "fake"}, provider=provider,
        auth_config={"ssh_user": "ubuntu", "ssh_private_key": "~/ray_bootstrap_key.pem"},
        cluster_name=cfg["cluster_name"], file_mounts={remote: remote for remote in cfg["file_mounts"]},
        initialization_commands=cfg["initialization_commands"],
        setup_commands=cfg["setup_commands"] + cfg["worker_setup_commands"],
        ray_start_commands=with_head_node_ip(cfg["worker_start_ray_commands"], "10.0.0.1"),
        runtime_hash="h1", file_mounts_contents_hash="f1", is_head_node=False,
        cluster_synced_files=cfg["cluster_synced_files"],
        rsync_options={"rsync_exclude": cfg.get("rsync_exclude"), "rsync_filter": cfg.get("rsync_filter")},
        process_runner=node, use_internal_ip=True, docker_config=cfg["docker"])
    updater.run()
    assert provider.tags.get(TAG_RAY_NODE_STATUS) == STATUS_UP_TO_DATE, node.commands[-5:]
    return node


def _token_the_worker_reads(node: _SimulatedNode) -> bytes | None:
    start = next(c for c in node.container_commands if "ray start" in c)
    assert "RAY_AUTH_MODE=token" in start
    m = re.search(r"RAY_AUTH_TOKEN_PATH=([^;\s]+)", start)
    return node.read_in_container(m.group(1) if m else "~/.ray/auth_token")


def test_a_new_worker_container_gets_the_heads_auth_token(tmp_path, monkeypatch):
    """`ray up` in docker mode: Ray's own NodeUpdater sets up a worker the head's autoscaler launches; the token
    the head generated must be readable inside the worker's container where its `ray start` looks for it."""
    cfg = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    home = _head_home(tmp_path, cfg)
    assert (home / "ray-auth" / "auth_token").read_text() == TOKEN == (home / ".ray" / "auth_token").read_text()
    node = _update_worker(cfg, home, monkeypatch)
    assert node.running and any(c.startswith("docker run") for c in node.commands)
    assert _token_the_worker_reads(node) == TOKEN.encode()
    # The check bites: the token only in cluster_synced_files (rsynced to the worker's host, never into the
    # container, which bind-mounts file_mounts folders only) leaves the container without it.
    old = copy.deepcopy(cfg)
    old["file_mounts"].pop("~/ray-auth")
    old["cluster_synced_files"] = ["~/.ray/auth_token"]
    old["worker_start_ray_commands"] = [c.replace(" RAY_AUTH_TOKEN_PATH=$HOME/ray-auth/auth_token", "")
                                        for c in old["worker_start_ray_commands"]]
    node = _update_worker(old, home, monkeypatch)
    assert any(path.endswith("/.ray/auth_token") for path in node.host), "synced to the host ..."
    assert _token_the_worker_reads(node) is None, "... but not into the container"


def test_cluster_yaml_boots_the_image_and_installs_nothing():
    """Every node runs infra/Dockerfile's image: a scale-up pulls it and starts Ray, it installs nothing."""
    cfg = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    docker = cfg["docker"]
    assert docker["image"] == _manifest_image(), "the launcher runs the image the KubeRay manifests run"
    assert docker["pull_before_run"] is True, "a rebuilt image under the same tag must reach new nodes"
    assert not docker.get("head_image") and not docker.get("worker_image")
    installs = [c for c in _boot_commands(cfg) if _IMAGE_INSTALLERS.search(c)]
    assert installs == [], f"the image has everything; these run on every node at boot: {installs}"
    # The check bites on the venv variant's boot commands.
    venv = prepare_config(yaml.safe_load(VENV_CLUSTER_YAML.read_text()))
    assert [c for c in _boot_commands(venv) if _IMAGE_INSTALLERS.search(c)]
    _check_token_auth(cfg)


def test_venv_cluster_yaml_installs_this_project_with_token_auth():
    cfg = prepare_config(yaml.safe_load(VENV_CLUSTER_YAML.read_text()))
    remote = next(r for r, local in cfg["file_mounts"].items() if Path(local) == Path("."))
    commands = cfg["head_setup_commands"]  # setup_commands + head_setup_commands after prepare_config
    assert any(re.search(rf"pip install\b.*--require-hashes -r {re.escape(remote)}/requirements.lock\b", c)
               for c in commands), commands
    assert any(re.search(rf"pip install\b.*--no-deps -e {re.escape(remote)}\b", c) for c in commands), commands
    assert any("--python 3.11" in c for c in commands)
    assert not cfg.get("docker", {}).get("image"), "docker disabled: nodes run the synced working tree"
    assert {".venv", ".git"} <= set(cfg["rsync_exclude"])
    _check_token_auth(cfg)


def test_venv_cluster_yaml_mirrors_cluster_yaml():
    """The two launcher configs differ only in how nodes get the software: same nodes, IAM, Ray start."""
    a, b = (yaml.safe_load(p.read_text()) for p in LAUNCHERS)
    differ = {"docker", "setup_commands", "initialization_commands"}
    assert a.keys() - differ == b.keys() - differ
    for key in a.keys() - differ:
        assert a[key] == b[key], key


def _iam_setup(tmp_path: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    """Run infra/iam/create.sh against a fake `aws` that logs each call (file:// arguments: their content)."""
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "aws.jsonl"
    fake.write_text(f"""#!{sys.executable}
import json, sys
argv = [open(a[7:]).read() if a.startswith("file://") else a for a in sys.argv[1:]]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if argv[:2] == ["sts", "get-caller-identity"]:
    print("123456789012")
elif argv[:2] == ["eks", "describe-cluster"]:
    print("https://oidc.eks.us-west-2.amazonaws.com/id/EXAMPLE0123")
""")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(IAM / "create.sh")], env={"PATH": f"{fake.parent}:/usr/bin:/bin", **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def _flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def _iam_roles(calls: list[list[str]]) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """(instance profile -> role, role -> its policy documents) as create.sh sets them up."""
    profiles, policies = {}, {}
    for c in calls:
        if c[:2] == ["iam", "add-role-to-instance-profile"]:
            profiles[_flag(c, "--instance-profile-name")] = _flag(c, "--role-name")
        elif c[:2] == ["iam", "put-role-policy"]:
            policies.setdefault(_flag(c, "--role-name"), []).append(json.loads(_flag(c, "--policy-document")))
    return profiles, policies


def iam_allows(documents: list[dict], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether identity policies allow `action` on `resource`: Allow statements, * and ? wildcards,
    StringEquals conditions (enough for the policies in infra/iam, which have no Deny and no NotAction)."""
    for doc in documents:
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow" and not {"NotAction", "NotResource"} & st.keys(), st
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
                continue
            if not any(fnmatch.fnmatchcase(resource, r) for r in resources):
                continue
            conditions = st.get("Condition", {})
            assert set(conditions) <= {"StringEquals"}, conditions
            if all((context or {}).get(k) == v for k, v in conditions.get("StringEquals", {}).items()):
                return True
    return False


def _s3_locations(cfg: JobConfig) -> tuple[set[str], list[str], list[str]]:
    """(buckets, prefixes read, prefixes written) of a job config's s3:// URIs."""
    def split(uri: str) -> tuple[str, str]:
        assert uri.startswith("s3://"), uri
        bucket, _, key = uri[5:].partition("/")
        return bucket, key.rstrip("/")
    reads = [split(u) for u in [*cfg.inputs.uris, cfg.model_store, cfg.output.uri]]
    writes = [split(cfg.output.uri), split(cfg.model_store)]
    return {b for b, _ in reads}, [f"{b}/{k}" for b, k in reads], [f"{b}/{k}" for b, k in writes]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_iam_roles_let_the_head_launch_workers(path: Path, tmp_path):
    """The head has its own instance profile whose role may pass the workers' role (iam:PassRole) and run the
    autoscaler; every node's role reaches the example config's S3 locations. The roles are the ones
    infra/iam/create.sh creates once."""
    cfg = prepare_config(yaml.safe_load(path.read_text()))
    types = cfg["available_node_types"]
    profile = {n: t["node_config"].get("IamInstanceProfile", {}).get("Name") for n, t in types.items()}
    assert all(profile.values()), f"every node type names an instance profile (the head too, else `ray up` " \
                                  f"creates ray-autoscaler-v1, which may not pass a role): {profile}"
    profiles, policies = _iam_roles(_iam_setup(tmp_path))
    assert set(profile.values()) <= profiles.keys(), "infra/iam/create.sh creates every profile the config names"
    head_role = profiles[profile["head"]]
    account = "arn:aws:iam::123456789012"
    for name, p in profile.items():
        if name != "head":
            role = profiles[p]
            assert role != head_role, "workers must not get the head's EC2 rights"
            assert iam_allows(policies[head_role], "iam:PassRole", f"{account}:role/{role}",
                              {"iam:PassedToService": "ec2.amazonaws.com"}), f"head cannot launch {name} with {p}"
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances"):
        assert iam_allows(policies[head_role], action, "arn:aws:ec2:us-west-2:123456789012:instance/i-0"), action
    image = types["head"]["node_config"]["ImageId"]
    if image.startswith("resolve:ssm:"):
        parameter = f"arn:aws:ssm:{cfg['provider']['region']}::parameter{image[len('resolve:ssm:'):]}"
        assert iam_allows(policies[head_role], "ssm:GetParameters", parameter), "RunInstances resolves the AMI"
    # Never a blanket PassRole: only the node role, only to EC2.
    assert not iam_allows(policies[head_role], "iam:PassRole", f"{account}:role/admin",
                          {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not iam_allows(policies[head_role], "iam:PassRole", f"{account}:role/{profiles[profile['cpu_worker']]}",
                          {"iam:PassedToService": "lambda.amazonaws.com"})
    # Storage: every node (the head runs the driver) reads the config's inputs and models and writes its output.
    job = load_config(_write(tmp_path / "audit.yaml", _configmap_config()), env={})
    buckets, reads, writes = _s3_locations(job)
    for name, p in profile.items():
        docs = policies[profiles[p]]
        for bucket in buckets:
            assert iam_allows(docs, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), (name, bucket)
        for prefix in reads:
            assert iam_allows(docs, "s3:GetObject", f"arn:aws:s3:::{prefix}/x/part-0.parquet"), (name, prefix)
        for prefix in writes:
            for action in ("s3:PutObject", "s3:DeleteObject"):
                assert iam_allows(docs, action, f"arn:aws:s3:::{prefix}/x/part-0.parquet"), (name, action, prefix)
        assert not iam_allows(docs, "s3:PutObject", f"arn:aws:s3:::{min(buckets)}-other/x"), name


def test_iam_allows_bites():
    doc = [{"Statement": [{"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::*:role/node",
                           "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
                          {"Effect": "Allow", "Action": ["s3:Get*"], "Resource": "arn:aws:s3:::b/in/*"}]}]
    ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}
    assert iam_allows(doc, "iam:PassRole", "arn:aws:iam::1:role/node", ec2)
    assert not iam_allows(doc, "iam:PassRole", "arn:aws:iam::1:role/node")
    assert not iam_allows(doc, "iam:PassRole", "arn:aws:iam::1:role/node2", ec2)
    assert iam_allows(doc, "s3:GetObject", "arn:aws:s3:::b/in/x") and not iam_allows(doc, "s3:GetObject", "arn:aws:s3:::b/out/x")


def test_irsa_role_trusts_the_manifests_service_account(tmp_path):
    """infra/iam/create.sh's optional IRSA role: assumable by exactly the ServiceAccount the Ray pods run as."""
    _, sa = _one("ServiceAccount")
    calls = _iam_setup(tmp_path, {"EKS_CLUSTER": "c1", "NAMESPACE": "audit"})
    create = next(c for c in calls if c[:2] == ["iam", "create-role"] and _flag(c, "--role-name") == "eagle-audit-irsa")
    trust = json.loads(_flag(create, "--assume-role-policy-document"))
    (st,) = trust["Statement"]
    oidc = "oidc.eks.us-west-2.amazonaws.com/id/EXAMPLE0123"
    assert st["Principal"]["Federated"] == f"arn:aws:iam::123456789012:oidc-provider/{oidc}"
    assert st["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert st["Condition"]["StringEquals"] == {f"{oidc}:sub": f"system:serviceaccount:audit:{sa['metadata']['name']}",
                                               f"{oidc}:aud": "sts.amazonaws.com"}
    _, policies = _iam_roles(calls)
    assert policies["eagle-audit-irsa"] == [json.loads((IAM / "node-policy.json").read_text())]
    annotation = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
    assert annotation is None or annotation.endswith(":role/eagle-audit-irsa")
    assert "eagle-audit-irsa" in (KUBERAY / "serviceaccount.yaml").read_text()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_shape(path: Path):
    for doc in _docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        name = doc["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 52, name  # room for KubeRay/Job suffixes
        kind = doc["kind"]
        if kind == "RayCluster":
            assert doc["apiVersion"] == "ray.io/v1"
            _check_cluster_spec(doc["spec"])
        elif kind == "RayJob":
            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"]
            assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
            assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
            if "rayClusterSpec" in spec:
                _check_cluster_spec(spec["rayClusterSpec"])
            assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict)
        elif kind == "CronJob":
            assert doc["apiVersion"] == "batch/v1"
            assert cron_ok(doc["spec"]["schedule"]), doc["spec"]["schedule"]
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert pod["restartPolicy"] in ("Never", "OnFailure")
            _check_containers(pod["containers"])
        elif kind == "ConfigMap":
            assert doc["apiVersion"] == "v1"
            assert doc["data"] and all(isinstance(v, str) for v in doc["data"].values())
        elif kind == "ServiceAccount":
            assert doc["apiVersion"] == "v1"
            # KubeRay's autoscaler (in the head pod) talks to the Kubernetes API with this account's token.
            assert doc.get("automountServiceAccountToken", True) is not False
        else:
            raise AssertionError(f"unexpected kind {kind} in {path.name}")


def _check_containers(containers: list[dict]) -> None:
    assert containers, "no containers"
    for c in containers:
        assert DNS_LABEL.match(c["name"]) and c["image"], c.get("name")
        for env in c.get("env", []):
            assert env["name"] and (("value" in env) != ("valueFrom" in env)), env
        for section in ("requests", "limits"):
            for resource, quantity in c.get("resources", {}).get(section, {}).items():
                parse_quantity(str(quantity))  # raises on a malformed quantity
        assert c.get("securityContext", {}).get("runAsNonRoot") is True, c["name"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__ == _pin("ray")
    assert spec["enableInTreeAutoscaling"] is True
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        # KubeRay's rayStartParams is map[string]string: an unquoted number is rejected by the CRD.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        _check_containers(g["template"]["spec"]["containers"])
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names) and all(DNS_LABEL.match(n) for n in names), names
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if "nvidia.com/gpu" in res.get("requests", {}):
            assert res["requests"]["nvidia.com/gpu"] == gpus, "extended resources need requests == limits"
        if gpus:
            assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))


# ---------------------------------------------------------------------------------------------- schemas
def _strict(node: Any) -> Any:
    """A CRD's structural schema with unknown fields forbidden: the API server prunes fields a CRD does not
    declare, silently, so a misspelt or misplaced field would simply vanish. Objects with declared properties
    get additionalProperties: false (maps declare additionalProperties themselves; x-kubernetes-preserve-
    unknown-fields keeps anything)."""
    if isinstance(node, dict):
        if (node.get("type") == "object" and isinstance(node.get("properties"), dict)
                and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type, as the API server enforces it: no duplicate keys in a map list, no duplicates
    in a set (e.g. two env entries or two volumes with one name)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, key))} in a list keyed by {keys}")
            seen.add(key)
    elif list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a set")
            seen.append(item)


def _cel(validator, rules, instance, schema):
    """CEL rules (x-kubernetes-validations) are not evaluated offline: a manifest that sets such a field
    gets an error here, so someone looks at the rule (none of ours does)."""
    yield jsonschema.ValidationError(f"field has CEL rules not checked offline: {[r['rule'] for r in rules]}")


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
_CRDValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {  # OpenAPI v3.0 schemas: Draft 4 rules
    "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel})


@functools.cache
def _crd_validator(kind: str):
    text = (CRDS / KUBERAY_CRD_FILES[kind]).read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    _CRDValidator.check_schema(schema)
    return _CRDValidator(schema, format_checker=_FORMATS)


def crd_errors(doc: dict) -> list[str]:
    """Every way `doc` departs from its vendored KubeRay CRD schema, unknown fields included."""
    errors = _crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def _ray_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in _docs(p) if d["kind"] in KUBERAY_CRD_FILES]


def test_kuberay_manifests_match_the_crds_without_unknown_fields():
    docs = _ray_docs()
    assert {d["kind"] for _, d in docs} == {"RayCluster", "RayJob"}
    for name, doc in docs:
        assert crd_errors(doc) == [], name


def test_crd_check_bites():
    _, job = _one("RayJob")
    assert crd_errors(job) == []
    head = ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec")
    expert = ("spec", "rayClusterSpec", "workerGroupSpecs", 1)
    cases = [  # (where, what it sets, the error's path, a word of its message)
        # misspelt or misplaced fields, which the API server would drop without a word
        (("spec",), {"preRunningDeadline": 60}, "spec", "'preRunningDeadline' was unexpected"),
        ((*head, "containers", 0), {"imagePullPolice": "Always"}, ".".join(map(str, head)) + ".containers.0",
         "imagePullPolice"),
        (expert, {"maxReplica": 3}, "spec.rayClusterSpec.workerGroupSpecs.1", "maxReplica"),
        # wrong types and values
        ((*expert, "rayStartParams"), {"num-gpus": 1}, "spec.rayClusterSpec.workerGroupSpecs.1.rayStartParams.num-gpus",
         "not of type 'string'"),
        (("spec",), {"preRunningDeadlineSeconds": 0}, "spec.preRunningDeadlineSeconds", "minimum"),
        (("spec",), {"activeDeadlineSeconds": 2**31}, "spec.activeDeadlineSeconds", "int32"),
        # a field with a CEL rule we cannot evaluate
        (("spec",), {"managedBy": "ray.io/kuberay-operator"}, "spec.managedBy", "CEL"),
    ]
    for where, update, path, needle in cases:
        bad = copy.deepcopy(job)
        functools.reduce(lambda node, key: node[key], where, bad).update(update)
        errors = crd_errors(bad)
        assert len(errors) == 1 and errors[0].startswith(path + ":") and needle in errors[0], (update, errors)
    # duplicate keys in a list-map (two volumes with one name)
    bad = copy.deepcopy(job)
    functools.reduce(lambda node, key: node[key], head, bad)["volumes"].append({"name": "dshm", "emptyDir": {}})
    assert crd_errors(bad) == [".".join(map(str, head)) + ".volumes: duplicate entry {'name': 'dshm'} in a list "
                               "keyed by ['name']"]


def _k8s_objects() -> list[tuple[str, dict]]:
    """Core Kubernetes objects: the manifests' own (CronJob, ConfigMap, ServiceAccount) and, as v1 PodTemplates,
    the pod templates inside the Ray resources (KubeRay creates pods from them)."""
    objects = [(p.name, d) for p in MANIFESTS for d in _docs(p) if d["kind"] not in KUBERAY_CRD_FILES]
    for name, spec in _cluster_specs():
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": g.get("groupName", "head")},
                        "template": g["template"]}
            objects.append((f"{name}:{g.get('groupName', 'head')}", template))
    return objects


def k8s_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_core_objects_match_the_kubernetes_api_strictly():
    objects = _k8s_objects()
    assert {d["kind"] for _, d in objects} == {"CronJob", "ConfigMap", "ServiceAccount", "PodTemplate"}
    for name, doc in objects:
        assert k8s_errors(doc) == [], name
    # The check bites: an unknown field in the CronJob's container, a string where an integer belongs.
    _, cron = _one("CronJob", REAUDIT)
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert "imagePullPolice" in " ".join(k8s_errors(bad))
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "2"
    assert k8s_errors(bad)


# ---------------------------------------------------------------------------------------------- KubeRay's reading
# How the KubeRay operator reads rayStartParams (ray-project/kuberay, tag v1.6.2,
# ray-operator/controllers/ray/common/pod.go: getResourcesMap, addWellKnownAcceleratorResources,
# generateRayStartCommand, convertParamMap; ray-operator/controllers/ray/utils/resources.go: IsGPUResourceKey).
def kuberay_resources_map(params: dict[str, str]) -> dict[str, float]:
    """getResourcesMap: strings.Trim(resources, "'\"` "), then json.Unmarshal into map[string]float64."""
    if "resources" not in params:
        return {}
    text = params["resources"].strip("'\"` ")

    def reject(constant):  # Go's JSON has no NaN/Infinity
        raise ValueError(f"invalid JSON constant {constant}")

    try:
        value = json.loads(text, parse_constant=reject)
    except ValueError as exc:
        raise ValueError(f"KubeRay cannot parse rayStartParams.resources {params['resources']!r}: {exc}") from exc
    if not isinstance(value, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                          for v in value.values()):
        raise ValueError(f"not a map of numbers: {params['resources']!r}")
    return {k: float(v) for k, v in value.items()}


def _is_gpu_resource_key(key: str) -> bool:
    return key.endswith("gpu") or re.search(r"nvidia\.com/mig-\d+g\.\d+gb$", key) is not None


def kuberay_start_params(group: dict) -> dict[str, str]:
    """The group's rayStartParams after addWellKnownAcceleratorResources: --num-gpus from the GPU limit, unless
    the resources map does not parse, in which case the operator logs an error and derives nothing."""
    params = dict(group["rayStartParams"])
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if not limits:
        return params
    try:
        kuberay_resources_map(params)
    except ValueError:
        return params
    for key in sorted(limits):
        if "num-gpus" not in params and _is_gpu_resource_key(key) and parse_quantity(str(limits[key])) != 0:
            params["num-gpus"] = str(int(parse_quantity(str(limits[key]))))
    return params


def kuberay_start_argv(params: dict[str, str]) -> list[str]:
    """convertParamMap's flags as the container's shell splits them (boolean flags aside)."""
    flags = "".join(f" --{k}={v} " for k, v in sorted(params.items()) if v.lower() not in ("true", "false"))
    return shlex.split(flags)


def test_ray_start_params_as_kuberay_reads_them():
    for name, spec in _cluster_specs():
        autoscaler = _kuberay_node_types(spec)
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            group = g.get("groupName", "headgroup")
            resources = kuberay_resources_map(g["rayStartParams"])  # raises where the operator fails to parse
            params = kuberay_start_params(g)
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus = limits.get("nvidia.com/gpu")
            assert params.get("num-gpus") == (str(gpus) if gpus else None), (name, group, params)
            # `ray start` gets the same custom resources, and the autoscaler plans with them.
            flags = dict(a[2:].split("=", 1) for a in kuberay_start_argv(params))
            ray_reads = parse_resources_json(flags["resources"], cli_logger, cf) if "resources" in flags else {}
            assert ray_reads == resources, (name, group, flags.get("resources"))
            planned = {k: v for k, v in autoscaler[group]["resources"].items() if k not in ("CPU", "GPU", "memory")}
            assert planned == resources, (name, group)


def test_kuberay_resource_rule_bites():
    """The old form: Ray's autoscaler and `ray start` read it, the operator does not (and then derives no
    --num-gpus from the nvidia.com/gpu limit, so the worker would join with GPU 0)."""
    _, cluster = _one("RayCluster")
    group = copy.deepcopy(next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "expert-gpu"))
    group["rayStartParams"]["resources"] = '"{\\"accelerator_type:A10G\\": 1}"'
    with pytest.raises(ValueError, match="KubeRay cannot parse"):
        kuberay_resources_map(group["rayStartParams"])
    assert "num-gpus" not in kuberay_start_params(group)
    flags = dict(a[2:].split("=", 1) for a in kuberay_start_argv(group["rayStartParams"]))
    assert parse_resources_json(flags["resources"], cli_logger, cf) == {"accelerator_type:A10G": 1}
    # The operator's own output format parses, and so does plain JSON.
    for ok in ("'{\"accelerator_type:A10G\":1}'", '{"accelerator_type:A10G": 1}'):
        assert kuberay_resources_map({"resources": ok}) == {"accelerator_type:A10G": 1.0}


# ---------------------------------------------------------------------------------------------- pods
def _ray_pod_templates() -> list[tuple[str, dict]]:
    return [(f"{name}:{g.get('groupName', 'head')}", g["template"]["spec"])
            for name, spec in _cluster_specs() for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def _all_containers() -> list[tuple[str, dict]]:
    return [(p.name, c) for p in MANIFESTS for d in _docs(p) for x in _dicts(d)
            for c in x.get("containers", []) if isinstance(c, dict)]


def test_every_ray_pod_has_shared_memory_and_the_service_account():
    _, sa = _one("ServiceAccount")
    for name, pod in _ray_pod_templates():
        # Ray's object store lives in /dev/shm; a container's default 64 MiB would spill to disk at once.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1 and volumes[mounts[0]["name"]].get("emptyDir", {}).get("medium") == "Memory", name
        # Every Ray pod runs as the documented ServiceAccount (an IRSA role reaches all of them).
        assert pod.get("serviceAccountName") == sa["metadata"]["name"], name


def test_images_are_pulled_again_and_required_secrets_are_required():
    for name, c in _all_containers():
        # A reused tag with IfNotPresent never pulls a rebuilt image; a digest pins one.
        assert c.get("imagePullPolicy") == "Always" or "@sha256:" in c["image"], (name, c["name"])
    cluster = (ROOT / "docs" / "CLUSTER.md").read_text()
    for path in MANIFESTS:
        for doc in _docs(path):
            for d in _dicts(doc):
                ref = d.get("secretKeyRef")
                if ref:
                    # A missing Secret then stops the pod at start (CreateContainerConfigError), not the job later.
                    assert ref.get("optional") is not True, (path.name, ref)
                    assert re.search(rf"kubectl create secret generic {re.escape(ref['name'])}\b", cluster), \
                        f"docs/CLUSTER.md does not say how to create Secret {ref['name']}"


def test_rayjob_cannot_wait_forever():
    _, job = _one("RayJob")
    spec = job["spec"]
    pre, active = spec.get("preRunningDeadlineSeconds"), spec.get("activeDeadlineSeconds")
    assert isinstance(pre, int) and isinstance(active, int) and 0 < pre < active, (pre, active)
    assert spec.get("shutdownAfterJobFinishes") is True, "a failed (deadline) job must also free its cluster"


def test_kuberay_groups_as_the_autoscaler_reads_them():
    specs = _cluster_specs()
    assert {name for name, _ in specs} == {"raycluster.yaml", "rayjob.yaml"}
    for name, spec in specs:
        types = _kuberay_node_types(spec)
        assert set(types) == {"headgroup", "cpu", "expert-gpu", "mllm-gpu"}, name
        assert types["headgroup"]["resources"]["CPU"] == 0, "stage work must not land on the head"
        assert types["cpu"]["resources"].get("GPU", 0) == 0
        for group, accel in (("expert-gpu", "A10G"), ("mllm-gpu", "H100")):
            res = types[group]["resources"]
            assert res["GPU"] == 1 and res[f"accelerator_type:{accel}"] == 1, (name, group, res)


def test_rayjob_cluster_mirrors_raycluster():
    _, cluster = _one("RayCluster")
    _, job = _one("RayJob")
    a, b = cluster["spec"], job["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in a["workerGroupSpecs"]] == [g["groupName"] for g in b["workerGroupSpecs"]]
    for ga, gb in zip([a["headGroupSpec"], *a["workerGroupSpecs"]], [b["headGroupSpec"], *b["workerGroupSpecs"]]):
        for key in ("rayStartParams", "minReplicas", "maxReplicas"):
            assert ga.get(key) == gb.get(key), key
        assert ga["template"] == gb["template"], ga.get("groupName", "head")


def test_clusters_can_host_the_example_config(tmp_path):
    cfg = _example_config(tmp_path)
    assert {cfg.resources.expert.accelerator_type, cfg.resources.mllm.accelerator_type} <= KNOWN_ACCELERATORS
    launcher = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))["available_node_types"]
    clusters = [("ray_cluster.yaml", launcher), *((n, _kuberay_node_types(s)) for n, s in _cluster_specs())]
    for name, types in clusters:
        assert unplaceable(types, cfg) == [], name
    # The check bites: an accelerator no group has, or more actors than fit.
    wrong = cfg.model_copy(deep=True)
    wrong.resources.mllm.accelerator_type = "A100"
    assert any(p.startswith("mllm:") for p in unplaceable(launcher, wrong))
    wrong = cfg.model_copy(deep=True)
    wrong.resources.expert.max_actors = 3
    assert any(p.startswith("expert:") for p in unplaceable(launcher, wrong))


def test_configmap_config_loads_and_holds_no_credentials(tmp_path):
    cfg = _example_config(tmp_path)
    assert cfg.mllm.model and cfg.output.uri and cfg.model_store and cfg.inputs.uris
    assert cfg.storage.access_key_id is None and cfg.storage.secret_access_key is None
    assert cfg.storage.session_token is None


# ---------------------------------------------------------------------------------------------- commands
def _all_job_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for path in [*MANIFESTS, CLUSTER_YAML]:
        for doc in _docs(path):
            for text in _strings(doc):
                calls += [(path.name, script, argv) for script, argv in job_calls(text)]
    return calls


def test_job_call_extraction():
    script = ('ray job submit --address "$a" \\\n'
              '  -- python jobs/inspect.py --mode incremental --run-id "$JOB" &\nwait $!')
    assert job_calls(script) == [("jobs/inspect.py", ["--mode", "incremental", "--run-id", "sample-run-1"])]
    assert job_calls("cd /app && python3 /app/jobs/fit.py --data d; echo") == [("jobs/fit.py", ["--data", "d"])]
    assert job_calls("pythonic jobs/inspect.py") == []


def test_referenced_jobs_exist_and_accept_their_flags():
    calls = _all_job_calls()
    assert {f for f, _, _ in calls} >= {"rayjob.yaml", "reaudit-cronjob.yaml"}
    for file, script, argv in calls:
        assert (ROOT / script).is_file(), f"{file} runs {script}, which is not in the repository"
        _parse(_load_job_module(script), argv)
    inspect = _load_job_module("jobs/inspect.py")
    with pytest.raises(AssertionError):  # the parse check bites on an unknown flag
        _parse(inspect, ["--config", "/config/audit.yaml", "--no-such-flag"])


def test_job_commands_build_a_valid_config_on_their_cluster(tmp_path):
    """Flags + overrides + the --config file (from the ConfigMap mounted on the head) load as a JobConfig."""
    configmaps = {d["metadata"]["name"]: d for p in MANIFESTS for d in _docs(p) if d["kind"] == "ConfigMap"}
    _, cluster = _one("RayCluster")
    _, job = _one("RayJob")
    heads = {"rayjob.yaml": job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
             "reaudit-cronjob.yaml": cluster["spec"]["headGroupSpec"]["template"]["spec"]}
    inspect = _load_job_module("jobs/inspect.py")
    modes = {}
    for file, script, argv in _all_job_calls():
        if script != "jobs/inspect.py":
            continue
        args = _parse(inspect, argv)
        assert args.config, f"{file}: no --config"
        path = tmp_path / f"{file}.yaml"
        path.write_text(_head_file(heads[file], args.config, configmaps))
        overrides = deep_merge(inspect._flag_overrides(args), parse_overrides(args.overrides))
        modes[file] = load_config(path, overrides=overrides, env={}).mode
    assert modes == {"rayjob.yaml": "full", "reaudit-cronjob.yaml": "incremental"}


@pytest.mark.parametrize("name", CRON_JOBS)
def test_cronjob_submits_to_the_raycluster(name):
    _, cluster = _one("RayCluster")
    _, cron = _one("CronJob", name)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    # The submit wrapper (one driver per Kubernetes Job, exit status = the Ray job's), not bare `ray job submit`,
    # run as the container's main process so that it gets the kubelet's SIGTERM.
    assert re.search(rf"(^|\n)\s*exec python3? {re.escape(RUN_RAY_JOB)} ", script), script
    assert "ray job submit" not in script
    wrapper = _load_job_module(RUN_RAY_JOB)
    argv = shlex.split(script[script.index(RUN_RAY_JOB) + len(RUN_RAY_JOB):].replace("\\\n", " ").split("\n")[0])
    args = wrapper.parse_args([a.replace("$JOB_NAME", "eagle-audit-reaudit-29000000") for a in argv])
    assert args.submission_id == "eagle-audit-reaudit-29000000", "the submission id is the Kubernetes Job's name"
    assert args.max_attempts == job["backoffLimit"] + 1, "one Ray attempt for each pod the Job may run"
    assert args.stop_timeout < pod["terminationGracePeriodSeconds"], "`ray job stop` must finish before SIGKILL"
    assert args.entrypoint[:2] == ["python", CRON_JOBS[name]]
    address = re.fullmatch(r"https?://([\w.-]+):(\d+)", args.address)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    assert address.group(1).split(".")[0] == f"{cluster['metadata']['name']}-head-svc"
    assert int(address.group(2)) == dashboard
    assert container["image"] == head["image"], "client and cluster Ray versions must match"
    # The wrapper is in the image, where the container starts.
    workdir = [a for op, a in _dockerfile_instructions() if op == "WORKDIR"][-1]
    assert container["workingDir"] == workdir
    copied = {s: dest for op, a in _dockerfile_instructions() if op == "COPY"
              for s, dest in [(s, a.split()[-1]) for s in a.split()[:-1] if not s.startswith("--")]}
    assert RUN_RAY_JOB in copied and copied[RUN_RAY_JOB].rstrip("/") in ("./infra", f"{workdir}/infra")
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token_secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert token_secret == cluster["spec"]["authOptions"]["secretName"]
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"


def _pod_failure_action(policy: dict, exit_code: int | None = None, conditions: tuple[str, ...] = ()) -> str:
    """What Kubernetes does with a failed pod under `policy` (batch/v1 podFailurePolicy): the first rule that
    matches decides (FailJob, Ignore, Count); none matches: Count (retried while backoffLimit allows)."""
    for rule in policy["rules"]:
        if "onExitCodes" in rule and exit_code is not None:
            req = rule["onExitCodes"]
            hit = exit_code in req["values"]
            if (hit if req["operator"] == "In" else not hit) and exit_code != 0:
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


@pytest.mark.parametrize("name", CRON_JOBS)
def test_cronjob_retries_job_failures_but_not_mistakes(name):
    """A retry resumes the same run (the run id is the Job's name, which the CronJob derives from the scheduled
    time); podFailurePolicy: exit 2 (a mistake) and 4 (attempts used up) fail the Job at once, 3 (a job failure),
    a killed driver and 5 (no answer from the job server) are retried, a disrupted pod is retried uncounted.
    For maintenance, 4 is also a busy output (an audit holds it): not retried, the next day's run does it."""
    _, cron = _one("CronJob", name)
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy: Never"
    policy = job["podFailurePolicy"]
    containers = {c["name"] for c in pod["containers"]}
    assert all(r["onExitCodes"]["containerName"] in containers for r in policy["rules"] if "onExitCodes" in r)
    actions = {code: _pod_failure_action(policy, code) for code in (1, 2, 3, 4, 5, 130, 137, 143)}
    assert actions == {1: "Count", 2: "FailJob", 3: "Count", 4: "FailJob", 5: "Count", 130: "Count",
                       137: "Count", 143: "Count"}
    assert _pod_failure_action(policy, 137, ("DisruptionTarget",)) == "Ignore"
    assert job["backoffLimit"] >= 1
    script = "\n".join(pod["containers"][0]["args"])
    assert '--submission-id "$JOB_NAME"' in script
    if name == REAUDIT:
        assert '--run-id "$JOB_NAME"' in script
    # the exit codes the policy names are the wrapper's and the driver's own
    wrapper = _load_job_module(RUN_RAY_JOB)
    from eagle.cli.exit_codes import BUSY, EXIT_CODES, USAGE

    assert USAGE == 2 and 2 in EXIT_CODES["inspect"] and wrapper.EXIT_EXHAUSTED == 4 == BUSY
    assert BUSY in EXIT_CODES["maintain"] and BUSY not in EXIT_CODES["inspect"]


def test_pod_failure_rule_check_bites():
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "c", "operator": "NotIn",
                                                             "values": [3]}}]}
    assert _pod_failure_action(policy, 2) == "FailJob" and _pod_failure_action(policy, 3) == "Count"
    assert _pod_failure_action(policy, None, ("DisruptionTarget",)) == "Count"


def test_rayjob_retries_resume_its_run():
    """KubeRay retries a failed RayJob (backoffLimit) on a new cluster with the same entrypoint: its fixed
    --run-id (the RayJob's name) makes the retry resume the run."""
    _, rayjob = _one("RayJob")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[argv.index("--run-id") + 1] == rayjob["metadata"]["name"]
    assert rayjob["spec"]["backoffLimit"] >= 1


def test_cron_validator():
    for good in ("0 2 * * *", "*/15 * * * *", "0 0-6/2 1,15 jan-jun mon-fri", "59 23 31 12 7"):
        assert cron_ok(good), good
    for bad in ("0 2 * *", "60 * * * *", "0 24 * * *", "0 0 0 * *", "* * * 13 *", "*/0 * * * *", "0 5-1 * * *",
                "@daily", "0 2 * * * *"):
        assert not cron_ok(bad), bad


# ---------------------------------------------------------------------------------------------- image
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile():
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    base = next(a for op, a in ins if op == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311(-gpu|-cu\d+)?", base), base
    runs = " ".join(a for op, a in ins if op == "RUN")
    # The image installs the hash-checked runtime lock, then only the project itself.
    assert "pip install --no-cache-dir --require-hashes -r requirements.lock" in runs
    assert re.search(r"pip install [^&]*--no-deps [^&]*\.(\s|$)", runs), "the project itself is installed"
    pins = _lock_pins(ROOT / "requirements.lock")
    for pkg in ("torch", "torchvision", "ray"):
        assert pins[pkg] == _pin(pkg), pkg
    user = [a for op, a in ins if op == "USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must end as a non-root user"
    env = " ".join(a for op, a in ins if op == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=0\b", env)
    workdir = [a for op, a in ins if op == "WORKDIR"][-1]
    included = [line[1:].rstrip("/") for line in (ROOT / "infra" / "Dockerfile.dockerignore").read_text().splitlines()
                if line.startswith("!")]
    for op, a in ins:
        if op == "COPY":
            sources = [s for s in a.split()[:-1] if not s.startswith("--")]
            assert all((ROOT / s).exists() for s in sources), a
            # infra/Dockerfile.dockerignore excludes everything else from the build context.
            assert all(any(s == i or s.startswith(i + "/") for i in included) for s in sources), a
    # The job's working directory is the image's WORKDIR, and the images carry this project's version.
    _, job = _one("RayJob")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    _, cron = _one("CronJob", REAUDIT)
    assert f"--working-dir {workdir}" in " ".join(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                                                  ["containers"][0]["args"])
    assert _manifest_image().endswith(f"/eagle-audit:{_project()['version']}")
    assert yaml.safe_load(CLUSTER_YAML.read_text())["docker"]["image"] == _manifest_image()


def _manifest_image() -> str:
    images = {c["image"] for _, c in _all_containers()}
    assert len(images) == 1, images
    return images.pop()


# ---------------------------------------------------------------------------------------------- secrets
_SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    # AWS_SECRET_ACCESS_KEY / aws_secret_access_key / storage.secret_access_key with a value
    re.compile(r"(?i)secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}"),
    re.compile(r"(?i)session_token[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}"),
    re.compile(r"(?i)auth_token[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_-]{16,}"),
]


def _secret_hits(text: str) -> list[str]:
    return [m.group(0) for p in _SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_scanner_bites():
    key_id = "AKIA" + "Q" * 16
    secret = "wJalr" + "X" * 35
    assert _secret_hits(f"id: {key_id}")
    assert _secret_hits(f"aws_secret_access_key = {secret}")
    assert _secret_hits(f'AWS_SECRET_ACCESS_KEY: "{secret}"')
    assert _secret_hits(f"storage:\n  secret_access_key: {secret}")
    assert _secret_hits(f"auth_token: {'f' * 32}")
    assert not _secret_hits("valueFrom: {secretKeyRef: {name: eagle-audit-aws, key: AWS_SECRET_ACCESS_KEY}}")


def test_no_credentials_in_infra_files():
    files = [CLUSTER_YAML, *sorted(p for p in (ROOT / "infra").rglob("*") if p.is_file())]
    for path in files:
        assert _secret_hits(path.read_text()) == [], path
    for path in MANIFESTS:
        for doc in _docs(path):
            assert doc["kind"] != "Secret", f"{path.name}: create Secrets out of band, never in the repository"
            for d in _dicts(doc):
                if d.get("name") in SENSITIVE_ENV and ("value" in d or "valueFrom" in d):
                    assert "value" not in d and "secretKeyRef" in d["valueFrom"], (path.name, d["name"])
