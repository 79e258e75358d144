"""Every user mistake of issues 16's and 28's tables, run as the user runs it: exit 2 before Ray starts, one message that
names the problem and says what to do, no traceback, and nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eagle.cli import preflight
from eagle.cli.exit_codes import markdown
from eagle.cli.preflight import check_inputs, check_mllm
from eagle.config import ConfigError, InputConfig, load_config


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """Inputs with one image, an empty input folder, a model store with one product, a file where a folder
    belongs, a local MLLM folder too large for a CPU, and an empty hub cache."""
    (tmp_path / "data" / "grid" / "test" / "good").mkdir(parents=True)
    (tmp_path / "data" / "grid" / "test" / "good" / "000.png").write_bytes(b"png")
    (tmp_path / "bad-data" / "grid" / "train" / "good").mkdir(parents=True)  # a test image outside any class folder
    (tmp_path / "bad-data" / "grid" / "train" / "good" / "000.png").write_bytes(b"png")
    (tmp_path / "bad-data" / "grid" / "test").mkdir(parents=True)
    (tmp_path / "bad-data" / "grid" / "test" / "000.png").write_bytes(b"png")
    (tmp_path / "data" / "grid" / "train" / "good").mkdir(parents=True)
    (tmp_path / "data" / "grid" / "train" / "good" / "000.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "list.csv").write_text(f"path,product\n{tmp_path}/data/grid/test/good/000.png,grid\n")
    (tmp_path / "empty" / "grid").mkdir(parents=True)
    (tmp_path / "empty" / "grid" / "notes.txt").write_text("no images here")
    (tmp_path / "models" / "grid" / "v1").mkdir(parents=True)  # a PatchCore expert fitted with random weights
    (tmp_path / "models" / "grid" / "LATEST").write_text("v1\n")
    (tmp_path / "models" / "grid" / "LATEST.patchcore").write_text("v1\n")
    (tmp_path / "models" / "grid" / "v1" / "meta.json").write_text(
        '{"backbone": {"name": "resnet18", "weights": "random"}}')
    (tmp_path / "no-models").mkdir()
    (tmp_path / "imagenet-models" / "grid" / "v1").mkdir(parents=True)  # an expert fitted with ImageNet weights
    (tmp_path / "imagenet-models" / "grid" / "LATEST").write_text("v1\n")
    (tmp_path / "imagenet-models" / "grid" / "v1" / "meta.json").write_text(
        '{"backbone": {"name": "wide_resnet50_2", "weights": "imagenet"}}')
    (tmp_path / "a-file").write_text("")
    big = tmp_path / "big-mllm"
    big.mkdir()
    (big / "config.json").write_text("{}")
    with open(big / "model.safetensors", "wb") as fh:  # sparse: 5 GiB on paper, nothing on disk
        fh.truncate(5 * 2**30)
    (tmp_path / "llama-mllm").mkdir()
    (tmp_path / "llama-mllm" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "hf").mkdir()
    return tmp_path


INSPECT = ["--input", "{t}/data", "--model-store", "{t}/models", "--output", "{t}/out"]
FIT = ["--data", "{t}/data", "--model-store", "{t}/models-out", "--weights", "random"]

NO_AWS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
          "AWS_CONTAINER_CREDENTIALS_FULL_URI": None, "AWS_WEB_IDENTITY_TOKEN_FILE": None}

# (job, arguments, message that must appear[, environment changes]); each exits 2.
MISTAKES = {
    "mllm left out: the 7B default, not cached, offline": ("inspect", INSPECT, "HF_HUB_OFFLINE is set"),
    "mistyped input": ("inspect", [*INSPECT, "--mllm", "none", "--input", "/data/nope"],
                       "input path /data/nope does not exist"),
    "empty input prefix": ("inspect", ["--input", "{t}/empty", *INSPECT[2:], "--mllm", "none"],
                           "input path {t}/empty holds no images"),
    "missing config file": ("inspect", [*INSPECT, "--mllm", "none", "--config", "nope.yaml"],
                            "cannot read the config file nope.yaml"),
    "missing output": ("inspect", [*INSPECT[:4], "--mllm", "none"], "no output: pass --output"),
    "output is a file": ("inspect", [*INSPECT[:4], "--output", "{t}/a-file", "--mllm", "none"],
                         "output {t}/a-file is a file"),
    "model store without experts": ("inspect", [*INSPECT[:2], "--model-store", "{t}/no-models", *INSPECT[4:],
                                                "--mllm", "none"], "run jobs/fit.py --model-store"),
    "experts fitted with ImageNet weights, offline, not cached": (
        "inspect", [*INSPECT[:2], "--model-store", "{t}/imagenet-models", *INSPECT[4:], "--mllm", "none"],
        "the experts of grid were fitted with ImageNet weights (wide_resnet50_2)"),
    "missing MLLM folder": ("inspect", [*INSPECT, "--mllm", "{t}/no-such-mllm"],
                            "MLLM folder {t}/no-such-mllm does not exist"),
    "MLLM of an unsupported family": ("inspect", [*INSPECT, "--mllm", "{t}/llama-mllm"],
                                      "a 'llama' model, a family the guided MLLM stage does not support"),
    "large MLLM without a GPU": ("inspect", [*INSPECT, "--mllm", "{t}/big-mllm"], "--force-cpu-mllm"),
    "unknown config key": ("inspect", [*INSPECT, "--mllm", "none", "expert.batchsize=3"],
                           "expert.batchsize: unknown key"),
    "mistyped weights": ("fit", [*FIT, "--weights", "imagnet"], "did you mean imagenet or random?"),
    "default weights offline, not cached": ("fit", [*FIT[:4]], "--weights random"),
    "weights path that does not exist": ("fit", [*FIT, "--weights", "{t}/wrn50.safetensors"],
                                         "'{t}/wrn50.safetensors': no such file"),
    "fit without a model store": ("fit", FIT[:2], "no model store: pass --model-store"),
    "fit with a missing data root": ("fit", ["--data", "{t}/nope", *FIT[2:]], "data root {t}/nope does not exist"),
    # issue 28
    "a text file as input": ("inspect", ["--input", "{t}/notes.txt", *INSPECT[2:], "--mllm", "none"],
                             "input {t}/notes.txt is neither an image folder"),
    "CSV manifest without a uri column": ("inspect", ["--input", "{t}/list.csv", *INSPECT[2:], "--mllm", "none"],
                                          "manifest {t}/list.csv has no 'uri' column (its columns: path, product)"),
    "model store pointing at the data folder": (
        "inspect", [*INSPECT[:2], "--model-store", "{t}/data", *INSPECT[4:], "--mllm", "none"],
        "model store {t}/data has no fitted expert for any listed product (grid) (it looks like an image folder"),
    "expert model fitted for no listed product": ("inspect", [*INSPECT, "--mllm", "none", "expert.model=padim"],
                                                  "expert.model=padim: no listed product (grid) has a fitted padim "
                                                  "expert in {t}/models (fitted there: patchcore)"),
    "ensemble member fitted for no listed product": (
        "inspect", [*INSPECT, "--mllm", "none", "expert.ensemble.models=[patchcore,padim]"],
        "expert.ensemble member padim: no listed product (grid) has a fitted padim expert"),
    "fit of a product that does not exist": ("fit", [*FIT, "--products", "grid,bolt"],
                                             "--products bolt: no such product under {t}/data"),
    "fit on a dataset its layout parser cannot read": ("fit", ["--data", "{t}/bad-data", *FIT[2:]],
                                                       "anomalib's parser: expected str"),
    "fit with an unknown timm backbone": ("fit", [*FIT, "expert.backbone=resnet181"],
                                          "expert.backbone 'resnet181' is not a timm model (did you mean resnet18"),
    "Iceberg output on s3:// without a catalog": (
        "inspect", [*INSPECT[:4], "--output", "s3://audit-bucket/out", "--mllm", "none", "output.format=iceberg"],
        "output.format iceberg with an s3:// output needs output.catalog"),
    "s3:// output with no credentials anywhere": (
        "inspect", [*INSPECT[:4], "--output", "s3://audit-bucket/out", "--mllm", "none"],
        "no S3 credentials were found for s3://audit-bucket/out", NO_AWS),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_mistake_exits_2_with_a_message_and_writes_nothing(case, site, repo_root):
    job, args, message, *changes = MISTAKES[case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(site / "hf"), "HF_HUB_CACHE": str(site / "hf"),
           "PYICEBERG_HOME": str(site / "hf")}
    for name, value in (changes[0] if changes else {}).items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    before = _tree(site)
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / f"{job}.py"),
                           *[a.format(t=site) for a in args]], cwd=site, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message.format(t=site) in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr  # refused before Ray started
    assert len(re.findall(r"^\d{4}-\d\d-\d\d ", proc.stderr, re.M)) == 1  # one message (one log record)
    assert _tree(site) == before  # nothing written: no output folder, no run manifest, no model store


def test_help_and_docs_show_the_exit_codes(repo_root):
    jobs = (repo_root / "docs" / "JOBS.md").read_text()
    assert markdown() in jobs, "regenerate the exit-code table in docs/JOBS.md with `python -m eagle.cli.exit_codes`"
    for job in ("inspect", "fit"):
        out = subprocess.run([sys.executable, str(repo_root / "jobs" / f"{job}.py"), "--help"], capture_output=True,
                             text=True, timeout=60).stdout
        assert "Exit codes:" in out and "  2  a mistake found before any work" in out


def test_an_empty_input_passes_only_when_allowed(site):
    with pytest.raises(ConfigError, match="holds no images"):
        check_inputs(InputConfig(uris=[str(site / "empty")]), None)
    check_inputs(InputConfig(uris=[str(site / "empty")], allow_empty=True), None)
    check_inputs(InputConfig(uris=[str(site / "data")]), None)
    with pytest.raises(ConfigError, match="holds no images"):  # its only image is excluded
        check_inputs(InputConfig(uris=[str(site / "data")], exclude=["*/test/*", "*/train/*"]), None)


def test_a_hub_mllm_is_found_in_the_cache_and_sized(site, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(preflight, "_hub_snapshot", lambda model, revision: {
        "org/small": site / "hf-small", "org/big": site / "big-mllm"}.get(model))
    (site / "hf-small").mkdir()
    cfg = load_config(overrides={"mllm": {"model": "org/small"}}, env={})
    check_mllm(cfg, force_cpu=False)  # cached and small: fine on CPU
    big = load_config(overrides={"mllm": {"model": "org/big"}}, env={})
    with pytest.raises(ConfigError, match="5.0 GiB of weights and resources.mllm.num_gpus is 0"):
        check_mllm(big, force_cpu=False)
    check_mllm(big, force_cpu=True)
    check_mllm(load_config(overrides={"mllm": {"model": "org/big"}, "resources": {"mllm": {"num_gpus": 1}}},
                           env={}), force_cpu=False)
    with pytest.raises(ConfigError, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        check_mllm(load_config(overrides={"mllm": {"model": "org/absent"}}, env={}), force_cpu=False)


def test_a_model_some_listed_products_lack_stays_a_warning(site):
    """Only a model that no listed product has is refused; one product without it becomes error rows later."""
    (site / "data" / "screw" / "test" / "good").mkdir(parents=True)
    (site / "data" / "screw" / "test" / "good" / "000.png").write_bytes(b"png")
    (site / "models" / "screw").mkdir()
    (site / "models" / "screw" / "LATEST.padim").write_text("v2\n")
    inputs = InputConfig(uris=[str(site / "data")])
    assert preflight.listed_products(inputs, None) == {"grid", "screw"}
    for override in ({"model": "padim"}, {"ensemble": {"models": ["patchcore", "padim"]}}, {"model": "auto"}):
        cfg = load_config(overrides={"model_store": str(site / "models"), "expert": override}, env={})
        preflight.check_experts_for(str(site / "models"), {"grid", "screw"}, cfg)
    cfg = load_config(overrides={"model_store": str(site / "models"), "expert": {"model": "stfpm"}}, env={})
    with pytest.raises(ConfigError, match=r"no listed product \(grid, screw\) has a fitted stfpm expert .*"
                                          r"fitted there: padim, patchcore"):
        preflight.check_experts_for(str(site / "models"), {"grid", "screw"}, cfg)
    with pytest.raises(ConfigError, match="no fitted expert for any listed product"):  # listed, but not in the store
        preflight.check_experts_for(str(site / "models"), {"bolt"}, cfg)
    preflight.check_experts_for(str(site / "models"), set(), cfg)  # an empty input (--allow-empty) needs none
    manifest = site / "m.csv"
    manifest.write_text(f"uri,product\n{site}/data/grid/test/good/000.png,grid\n{site}/x/1.png,cable\n")
    assert preflight.listed_products(InputConfig(manifest=str(manifest)), None) == {"grid", "cable"}


def test_the_summary_json_says_mode_status_models_and_config_hash(tmp_path):
    from eagle.cli.inspect_cmd import summary_doc
    from eagle.config import config_hash
    from eagle.pipeline.inspection import Summary

    (tmp_path / "mllm").mkdir()
    (tmp_path / "mllm" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    cfg = load_config(overrides={"run_id": "r1", "mode": "incremental", "mllm": {"model": str(tmp_path / "mllm")},
                                 "routing": {"policy": "uncertain"}, "expert": {"ensemble": {"models": ["patchcore", "padim"]}},
                                 "output": {"uri": str(tmp_path / "out")}}, env={})
    summary = Summary(run_id="r1", output=str(tmp_path / "out"), listed=3, skipped=0, audited=3, seconds=1.0,
                      status={"ok": 2, "error": 1})
    doc = summary_doc(cfg, "completed", summary)
    assert doc["mode"] == "incremental" and doc["final_status"] == "completed" and doc["audited"] == 3
    assert doc["counts_by_status"] == {"error": 1, "ok": 2} and doc["config_hash"] == config_hash(cfg)
    assert doc["models"]["expert"]["ensemble"] == ["patchcore", "padim"]
    assert doc["models"]["mllm"] == {"model": str(tmp_path / "mllm"), "family": "qwen2_5_vl", "routing": "uncertain",
                                     "guidance": cfg.guidance.enabled}
    failed = summary_doc(cfg, "failed", error="error rate 100%")
    assert failed["final_status"] == "failed" and failed["error"] == "error rate 100%"
    assert failed["run_id"] == "r1" and failed["counts_by_status"] == {}
