"""Cluster and schedule manifests, checked offline: Ray's own validators, Kubernetes shapes, cross-file
consistency (the commands exist and parse, the config loads, the clusters can host the configured actors),
and no credentials anywhere.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
import shlex
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.util.accelerators import accelerators as ray_accelerators

from eagle.config import JobConfig, deep_merge, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KNOWN_ACCELERATORS = {v for k, v in vars(ray_accelerators).items() if k.isupper() and isinstance(v, str)}
SENSITIVE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} holds no document"
    return docs


def _one(kind: str) -> tuple[Path, dict]:
    found = [(p, d) for p in MANIFESTS for d in _docs(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under infra/kuberay, found {len(found)}"
    return found[0]


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
    """The command-line module behind a thin `jobs/X.py` (eagle.cli.X_cmd), checked to be the one it runs."""
    name = f"eagle.cli.{Path(script).stem}_cmd"
    assert f"from {name} import main" in (ROOT / script).read_text(), f"{script} does not run {name}"
    return importlib.import_module(name)


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
def test_cluster_yaml_passes_ray_validation():
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
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


def test_cluster_yaml_node_types_and_limits():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
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


def test_cluster_yaml_installs_this_project_with_token_auth():
    cfg = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    remote = next(r for r, local in cfg["file_mounts"].items() if Path(local) == Path("."))
    commands = cfg["head_setup_commands"]  # setup_commands + head_setup_commands after prepare_config
    assert any(re.search(rf"pip install\b.*--require-hashes -r {re.escape(remote)}/requirements.lock\b", c)
               for c in commands), commands
    assert any(re.search(rf"pip install\b.*--no-deps -e {re.escape(remote)}\b", c) for c in commands), commands
    assert any("--python 3.11" in c for c in commands)
    assert not cfg.get("docker", {}).get("image"), "docker disabled: nodes run the synced working tree"
    assert {".venv", ".git"} <= set(cfg["rsync_exclude"])
    assert "~/.ray/auth_token" in cfg["cluster_synced_files"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start, key


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


def test_cronjob_submits_to_the_raycluster():
    _, cluster = _one("RayCluster")
    _, cron = _one("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    assert "ray job submit" in script
    address = re.search(r"https?://([\w.-]+):(\d+)", script)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    assert address.group(1).split(".")[0] == f"{cluster['metadata']['name']}-head-svc"
    assert int(address.group(2)) == dashboard
    assert container["image"] == head["image"], "client and cluster Ray versions must match"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token_secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert token_secret == cluster["spec"]["authOptions"]["secretName"]


def _run_cron_script(tmp_path: Path, submit_rc: int, terminate: bool = False) -> tuple[int, list[str]]:
    """Run the CronJob's script with a stub `ray` on PATH that logs its arguments."""
    _, cron = _one("CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/bash", "-c"]
    log = tmp_path / "ray.log"
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir(parents=True)
    stub.write_text(f'#!/bin/bash\necho "$*" >> {log}\n'
                    f'if [ "$1 $2" = "job submit" ]; then {"sleep 30; " if terminate else ""}exit {submit_rc}; fi\n')
    stub.chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin", "JOB_NAME": "eagle-audit-reaudit-29000000"}
    proc = subprocess.Popen(["/bin/bash", "-c", container["args"][0]], env=env, start_new_session=True)
    try:
        if terminate:  # like the kubelet: SIGTERM to the container's main process only
            deadline = time.time() + 10
            while not (log.exists() and "job submit" in log.read_text()) and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    finally:
        try:  # the stub left sleeping in the background, in the group started above
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return rc, log.read_text().splitlines()


def test_cron_script_submits_follows_and_cleans_up(tmp_path):
    rc, calls = _run_cron_script(tmp_path / "ok", submit_rc=0)
    assert rc == 0 and len(calls) == 1
    assert calls[0].endswith("-- python jobs/inspect.py --config /config/audit.yaml --mode incremental "
                             "--run-id eagle-audit-reaudit-29000000")
    assert "--submission-id eagle-audit-reaudit-29000000-" in calls[0]
    rc, _ = _run_cron_script(tmp_path / "fail", submit_rc=1)
    assert rc == 1, "a failed Ray job must fail the Kubernetes Job (so it is retried and visible)"
    rc, calls = _run_cron_script(tmp_path / "term", submit_rc=0, terminate=True)
    sid = re.search(r"--submission-id (\S+)", calls[0]).group(1)
    assert rc != 0 and any(c.startswith("job stop") and c.endswith(sid) for c in calls[1:]), calls


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
    for op, a in ins:
        if op == "COPY":
            sources = [s for s in a.split()[:-1] if not s.startswith("--")]
            assert all((ROOT / s).exists() for s in sources), a
    # The job's working directory is the image's WORKDIR, and the images carry this project's version.
    _, job = _one("RayJob")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    _, cron = _one("CronJob")
    assert f"--working-dir {workdir}" in " ".join(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                                                  ["containers"][0]["args"])
    images = {c["image"] for p in MANIFESTS for d in _docs(p) for x in _dicts(d)
              for c in x.get("containers", []) if isinstance(c, dict)}
    assert len(images) == 1 and images.pop().endswith(f"/eagle-audit:{_project()['version']}")


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
