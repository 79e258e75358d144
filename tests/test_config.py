"""Config: validation messages name the key and what is allowed, round trips, stable hash, overrides, env."""

from __future__ import annotations

import pytest

from eagle.config import ConfigError, JobConfig, config_hash, described_yaml, dump_config, load_config, parse_overrides


def _load_yaml(tmp_path, text: str, **kw):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_config(path, env={}, **kw)


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load_yaml(tmp_path, "expert:\n  batchsize: 4\n")
    msg = str(exc.value)
    assert "expert.batchsize" in msg
    assert "backbone" in msg and "patchcore" in msg  # the allowed keys of that section


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"expertt: unknown key; allowed here: .*expert"):
        _load_yaml(tmp_path, "expertt: {}\n")


def test_bad_literal_value_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _load_yaml(tmp_path, "threshold:\n  method: sigma\n")
    msg = str(exc.value)
    assert "threshold.method" in msg and "'k-sigma'" in msg and "'evt'" in msg and "'sigma'" in msg


def test_bad_number_and_pool_bounds():
    with pytest.raises(ConfigError, match=r"resources.expert.batch_size"):
        load_config(overrides=["resources.expert.batch_size=0"], env={})
    with pytest.raises(ConfigError, match=r"max_actors \(1\) must be >= min_actors \(2\)"):
        load_config(overrides=["resources.mllm.min_actors=2"], env={})


@pytest.mark.parametrize("uri", ["http://host/x", "gs://bucket/x", "s3:///nobucket", ""])
def test_bad_uri(uri):
    with pytest.raises(ConfigError, match=r"model_store"):
        load_config(overrides={"model_store": uri}, env={})


@pytest.mark.parametrize("uri", ["s3://bucket/prefix", "file:///tmp/x", "/tmp/x", "relative/dir"])
def test_good_uri(uri):
    assert load_config(overrides={"model_store": uri}, env={}).model_store == uri


def test_round_trip(tmp_path):
    cfg = load_config(overrides=["expert.backbone=resnet18", "mllm.model=none", "routing.policy=uncertain",
                                 "guidance.layers=[3, 4]", "inputs.uris=[s3://b/p, /data]"], env={})
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path, env={})
    assert again == cfg
    assert again.mllm.model is None and again.guidance.layers == [3, 4]


def test_hash_stable_and_sensitive_to_results_only(tmp_path):
    a = load_config(env={})
    # same content written with a different key order gives the same hash
    b = _load_yaml(tmp_path, "threshold:\n  k: 3.0\n  method: k-sigma\nexpert:\n  seed: 0\n  backbone: wide_resnet50_2\n")
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16
    # resources, run id and storage do not change results, so not the hash
    c = load_config(overrides=["resources.expert.batch_size=64", "run_id=abc", "expert.cache_size=9"], env={})
    assert config_hash(c) == config_hash(a)
    # result-affecting settings do
    d = load_config(overrides=["threshold.method=mad"], env={})
    assert config_hash(d) != config_hash(a)


def test_overrides_beat_file_and_env_fills_storage(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("resources:\n  expert:\n    batch_size: 4\n")
    cfg = load_config(path, overrides=["resources.expert.batch_size=16"],
                      env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
                           "RAY_ADDRESS": "ray://head:10001"})
    assert cfg.resources.expert.batch_size == 16
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000" and cfg.storage.region == "eu-west-1"
    assert cfg.ray.address == "ray://head:10001"


def test_parse_overrides_rejects_garbage():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["expert.batch_size"])
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_secrets_never_dumped():
    cfg = JobConfig.model_validate({"storage": {"access_key_id": "AKIAXXXX", "secret_access_key": "s3cr3t"}})
    text = dump_config(cfg) + described_yaml(cfg) + repr(cfg) + str(cfg)
    assert "s3cr3t" not in text and "AKIAXXXX" not in text


def test_device_resolution():
    cfg = load_config(overrides=["resources.expert.num_gpus=1"], env={})
    assert cfg.resources.expert.resolved_device() == "cuda"
    assert cfg.resources.mllm.resolved_device() == "cpu"
    with pytest.raises(ConfigError, match="device"):
        load_config(overrides=["resources.mllm.device=tpu"], env={})


def test_described_yaml_is_the_config_with_each_description_above_its_setting(tmp_path):
    cfg = load_config(overrides=["routing.score_range=[0.9, 1.1]", "prompts.notes={bottle: glass}",
                                 "resources.finish.batch_size=128"], env={"RAY_ADDRESS": "ray://head:10001"})
    text = described_yaml(cfg)
    path = tmp_path / "described.yaml"
    path.write_text(text)
    assert load_config(path, env={}) == cfg  # comments aside, it is the effective config
    lines = text.splitlines()
    for setting, described in (("  address: ray://head:10001", "Cluster address"),
                               ("resources:", "Per-stage sizing"), ("    batch_size: 128", "Rows per batch"),
                               ("  score_range: [0.9, 1.1]", "the band as [low, high)")):
        at = lines.index(setting)
        comment = []
        while lines[at - 1 - len(comment)].lstrip().startswith("# "):
            comment.insert(0, lines[at - 1 - len(comment)].lstrip()[2:])
        assert described in " ".join(comment), setting


def test_a_stage_s_resources_keep_its_defaults_when_one_is_overridden():
    cfg = load_config(overrides=["resources.finish.batch_size=128", "resources.decode.num_cpus=1"], env={})
    assert (cfg.resources.finish.batch_size, cfg.resources.finish.num_cpus) == (128, 0.25)
    assert (cfg.resources.decode.batch_size, cfg.resources.decode.num_cpus) == (16, 1)


# The expert section's settings in the flat layout they had before the model sub-sections, the same in the nested
# layout, and the hashes main (c06f75f) gave them: (config_hash of all result sections, of expert + threshold, of
# the fit_view of patchcore / padim / stfpm: what each model's artifact records).
EXPERT_LAYOUTS = {
    "default": ("seed: 0\n", "seed: 0\n", ("34f7ed1bceab90c5", "78fd542690dc20f0", "78fd542690dc20f0", "3bcf169ca8ab52a3",
                         "1a43d8df0a6024e3")),
    "patchcore": ("coreset_ratio: 0.2\n  coreset_projection_dim: 64\n  scoring: mean_k\n  k: 7\n  num_neighbors: 3\n"
                  "  patch_size: 5\n  projection_dim: 100\n  search: exact\n  seed: 3\n",
                  "patchcore: {coreset_ratio: 0.2, coreset_projection_dim: 64, scoring: mean_k, k: 7, "
                  "num_neighbors: 3, patch_size: 5, projection_dim: 100, search: exact}\n  seed: 3\n",
                  ("0473a58573d4bdca", "cb6de08834359a6a", "cb6de08834359a6a", "f3071b382d7bdb6d",
                   "17b3c3e60baa3cd9")),
    "ensemble": ("ensemble: [patchcore, padim]\n  combine: mean\n",
                 "ensemble: {models: [patchcore, padim], combine: mean}\n",
                 ("cd91bc0b4f02d9ed", "2b617e7b7304d897", "78fd542690dc20f0", "3bcf169ca8ab52a3",
                  "1a43d8df0a6024e3")),
    "all": ("model: stfpm\n  coreset_ratio: 0.2\n  scoring: mean_k\n  search: float16\n  ensemble: [patchcore, stfpm]\n"
            "  combine: mean\n  stfpm: {lr: 0.1}\n  backbone: resnet18\n  weights: random\n  dtype: auto\n"
            "  cache_size: 9\n",
            "model: stfpm\n  patchcore: {coreset_ratio: 0.2, scoring: mean_k, search: float16}\n"
            "  ensemble: {models: [patchcore, stfpm], combine: mean}\n  stfpm: {lr: 0.1}\n  backbone: resnet18\n"
            "  weights: random\n  dtype: auto\n  cache_size: 9\n",
            ("8fd732c5f4ef4c8e", "286b4d8335b2b89f", "18bb09bd5fae10c5", "4e099f58b7e682b8", "ab2e55c2ff63373d")),
}


@pytest.mark.parametrize("name", EXPERT_LAYOUTS)
def test_expert_sub_sections_keep_every_hash_and_old_keys_load(tmp_path, name: str):
    import warnings

    from eagle.config.hashing import fit_view

    flat, nested, hashes = EXPERT_LAYOUTS[name]
    threshold = "threshold: {folds: 3}\n" if name == "all" else ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = _load_yaml(tmp_path, f"expert:\n  {flat}{threshold}")
        new = _load_yaml(tmp_path, f"expert:\n  {nested}{threshold}")
    deprecated = [str(w.message) for w in caught if w.category is FutureWarning]
    assert len(deprecated) == (flat != nested) and all(" is now expert." in m for m in deprecated)
    assert old == new
    for cfg in (old, new):
        ours = (config_hash(cfg), config_hash(cfg, sections=("expert", "threshold")),
                *(config_hash(fit_view(cfg, m), sections=("expert", "threshold")) for m in ("patchcore", "padim",
                                                                                            "stfpm")))
        assert ours == hashes


def test_old_expert_keys_move_once_and_records_read_back_silently():
    import warnings

    from eagle.config import ExpertConfig

    with pytest.raises(ConfigError, match="expert.patchcore.k is given twice"):
        load_config(overrides=["expert.k=3", "expert.patchcore.k=4"], env={})
    with pytest.warns(FutureWarning, match="expert.ensemble is now expert.ensemble.models"):
        cfg = load_config(overrides=["expert.ensemble=[padim,stfpm]", "expert.combine=mean"], env={})
    assert cfg.expert.ensemble.models == ["padim", "stfpm"] and cfg.expert.ensemble.combine == "mean"
    record = cfg.expert.record()  # what artifacts hold: the flat layout
    assert record["ensemble"] == ["padim", "stfpm"] and record["combine"] == "mean" and record["k"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert ExpertConfig.from_record(record) == cfg.expert
