"""Every pipeline stage in-process on hand-built batches (no Ray): its work, its column contract, and its
failure paths (bad files, missing experts, a broken artifact, an image that breaks a batch, a failing MLLM).
`stages_at_work` takes every stage down each of its paths at once (tests/test_architecture.py checks the
columns they set against their declarations)."""

from __future__ import annotations

import hashlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from eagle.config import load_config
from eagle.expert.ensemble import ProductExpert, ensemble_version, member_versions
from eagle.io.schema import OUTPUT_SCHEMA
from eagle.pipeline.mllm_pool import InProcessPool
from eagle.pipeline.stages.base import Batch, Stage, StageContractError, batch_of, fail, rows_of, set_boxes
from eagle.pipeline.stages.decode_stage import DecodeStage
from eagle.pipeline.stages.expert_stage import ExpertStage
from eagle.pipeline.stages.finish_stage import FinishStage
from eagle.pipeline.stages.mllm_stage import MLLMStage
from eagle.pipeline.stages.stamp_stage import StampStage

LISTING = ["image_uri", "product", "image_version", "image_size_bytes"]


def _cfg():
    return load_config(overrides={"resources": {"expert": {"batch_size": 4}, "mllm": {"batch_size": 3}},
                                  "routing": {"policy": "not-confident-normal"}}, env={})


@pytest.fixture()
def cfg():
    return _cfg()


def _png(shape=(20, 30, 3)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(rows: list[dict]) -> dict[str, np.ndarray]:
    """A batch as the decode stage leaves it."""
    full = [{"image_uri": f"/x/{i}.png", "product": "p", "image_version": "v", "image_size_bytes": 1,
             "content_sha256": "h", "status": "ok", "error": None, "error_stage": None, "decode_ms": 1.0,
             "expert_input": np.zeros((8, 8, 3), np.uint8), "width": 24, "height": 16, **r}
            for i, r in enumerate(rows)]
    return batch_of(full, list(full[0]))


# ---------------------------------------------------------------------------------------------- base
class _Double(Stage):
    name, sized_by = "double", "decode"
    requires = ("x",)
    produces = ("y",)
    drops = ("x",)
    defaults = {"y": -1}

    def process(self, rows):
        for row in rows:
            row["y"] = 2 * row["x"]


def test_base_checks_contract_passes_failed_rows_and_fills_defaults(cfg):
    stage = _Double(cfg)
    out = stage(batch_of([{"x": 1, "status": "ok"}, {"x": 5, "status": "error"}], ["x", "status"]))
    assert set(out) == {"status", "y"}  # x dropped, y produced
    assert list(out["y"]) == [2, -1]  # the failed row was not processed, it got the default
    with pytest.raises(StageContractError, match=r"double stage needs columns \['x'\]"):
        stage(batch_of([{"z": 1}], ["z"]))


class _Forgetful(Stage):
    """Declares `y`, sets it (to None, too) on some rows, fails others and forgets it on the rest."""

    name, sized_by = "forgetful", "decode"
    requires = ("x",)
    produces = ("y",)

    def process(self, rows):
        for row in rows:
            if row["x"] == 0:
                fail(row, self.name, "zero")  # a failed row needs none of the stage's columns
            elif row["x"] == 1:
                row["y"] = None  # set, to None


def test_a_row_that_leaves_without_a_declared_column_fails_the_stage_by_name(cfg):
    out = _Forgetful(cfg)(batch_of([{"x": 0}, {"x": 1}, {"x": 5, "status": "error"}], ["x", "status"]))
    assert list(out["status"]) == ["error", None, "error"] and list(out["y"]) == [None, None, None]
    with pytest.raises(StageContractError, match=r"forgetful stage declares columns \['y'\] but left them unset "
                                                 r"on row '/x/2.png'"):
        _Forgetful(cfg)(batch_of([{"x": 1}, {"x": 2, "image_uri": "/x/2.png"}], ["x", "image_uri"]))


def test_in_chunks_isolates_the_row_that_breaks_its_batch(cfg):
    stage = _Double(cfg)
    rows = [{"v": v} for v in [1, 2, 0, 3, 4]]
    calls = []

    def run(chunk):
        calls.append(len(chunk))
        if any(r["v"] == 0 for r in chunk):
            raise ZeroDivisionError("boom")
        return [10 / r["v"] for r in chunk]

    stage.in_chunks(rows, 2, run, apply=lambda r, res, ms: r.update(res=res),
                    failed=lambda r, exc: r.update(err=str(exc)))
    assert [r.get("res") for r in rows] == [10.0, 5.0, None, 10 / 3, 2.5]
    assert rows[2]["err"] == "boom" and "err" not in rows[3]
    assert calls == [2, 2, 1, 1, 1]  # the failing chunk [0, 3] again one by one


# ---------------------------------------------------------------------------------------------- decode
def _listing(tmp_path) -> Batch:
    """A listing of an image, a file that is no image and one that is missing."""
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    listing = [{"image_uri": str(tmp_path / n), "product": "p", "image_version": "", "image_size_bytes": None}
               for n in ("ok.png", "bad.png", "missing.png")]
    return batch_of(listing, LISTING)


def test_decode_stage_reads_decodes_and_turns_failures_into_rows(cfg, tmp_path):
    out = rows_of(DecodeStage(cfg, input_sizes={"p": (16, 12)})(_listing(tmp_path)))
    ok, bad, missing = out
    assert ok["status"] == "ok" and (ok["width"], ok["height"]) == (30, 20)
    assert "image" not in ok  # the decoded image stays in this task: only the expert's small input travels
    assert ok["expert_input"].shape == (12, 12, 3) and ok["expert_input"].dtype == np.uint8
    assert int(ok["expert_input"].mean()) == 90  # the uniform test image, resized and cropped
    assert ok["image_version"] == f"sha256:{ok['content_sha256']}"  # manifest images get a content token
    assert (bad["status"], bad["error_stage"]) == ("error", "decode") and "not an image" in bad["error"]
    assert (missing["status"], missing["error_stage"], missing["error"]) == ("error", "read", "file not found")


# ---------------------------------------------------------------------------------------------- expert
class _FakeExpert:
    """Scores a model input by its mean brightness (map at the original size); one whose first pixel is 255
    breaks scoring."""

    def score_inputs(self, inputs, sizes):
        if any(x[0, 0, 0] == 255 for x in inputs):
            raise ValueError("cannot score this one")
        out = []
        for x, size in zip(inputs, sizes, strict=True):
            amap = np.zeros(size, np.float32)
            amap[2:6, 3:9] = x.mean()
            out.append(SimpleNamespace(score=float(x.mean()), anomaly_map=amap))
        return out


def _art(threshold, score_max, version="v1", model="patchcore", method="k-sigma"):
    """What ProductExpert reads of an artifact."""
    return SimpleNamespace(threshold=threshold, version=version, meta={
        "model": model, "threshold": {"value": threshold, "score_max": score_max, "method": method}})


def _expert_stage(cfg, broken=()):
    stage = ExpertStage(cfg, versions={"p": "v1", "broken": "v1"})
    expert = ProductExpert("v1", [(_art(50.0, 80.0), _FakeExpert())])

    def load(product):
        if product in broken:
            raise OSError("artifact unreadable")
        return expert

    stage._expert = load
    return stage


def _expert_batch() -> Batch:
    """Images of every confidence, one that breaks its batch, an unknown product, a broken artifact, a failed row."""
    inputs = [np.full((8, 8, 3), v, np.uint8) for v in (10, 60, 255, 90, 20)]
    return _decoded([{"expert_input": x} for x in inputs]
                    + [{"product": "unknown"}, {"product": "broken"}, {"status": "error", "error": "x"}])


def test_expert_stage_scores_classifies_and_isolates_failures(cfg):
    out = rows_of(_expert_stage(cfg, broken={"broken"})(_expert_batch()))
    verdicts = [(r["status"], r["expert_verdict"], r["confidence"]) for r in out[:5]]
    assert verdicts == [("ok", "normal", "confident_normal"), ("ok", "anomalous", "uncertain"),
                        ("error", None, None), ("ok", "anomalous", "confident_anomalous"),
                        ("ok", "normal", "confident_normal")]
    assert "scoring failed: ValueError: cannot score this one" in out[2]["error"]  # only the breaking image
    assert out[1]["boxes_json"] != "[]" and out[1]["mask_png"] and out[0]["mask_png"] is None
    assert out[5]["error_stage"] == "expert" and "no fitted expert for product 'unknown'" in out[5]["error"]
    assert "could not load expert for 'broken': OSError: artifact unreadable" in out[6]["error"]
    assert out[7]["error"] == "x" and out[7]["expert_score"] is None  # failed upstream: untouched
    assert all(r["expert_model_version"] == "v1" for r in out[:5] if r["status"] == "ok")
    assert json.loads(out[1]["expert_members_json"]) == [
        {"model": "patchcore", "version": "v1", "score": 60.0, "threshold": 50.0}]


class _Inverted(_FakeExpert):
    """A member that disagrees: scores dark images high."""

    def score_inputs(self, inputs, sizes):
        out = super().score_inputs(inputs, sizes)
        return [SimpleNamespace(score=255.0 - r.score, anomaly_map=r.anomaly_map[::-1].copy()) for r in out]


@pytest.mark.parametrize("how", ["max", "mean"])
def test_an_ensemble_verdict_is_the_rule_applied_to_its_members_scores(cfg, how):
    cfg.expert.ensemble.combine = how
    members = [(_art(50.0, 80.0, "a1"), _FakeExpert()), (_art(300.0, 330.0, "b2", "padim", "mad"), _Inverted())]
    version = ensemble_version({"patchcore": "a1", "padim": "b2"})
    stage = ExpertStage(cfg, versions={"p": version})
    stage._expert = lambda product: ProductExpert(version, members, how)
    values = (10, 40, 60, 120, 250)
    out = rows_of(stage(_decoded([{"expert_input": np.full((8, 8, 3), v, np.uint8)} for v in values])))
    combine = max if how == "max" else (lambda a, b: (a + b) / 2)
    for v, row in zip(values, out, strict=True):
        by_hand = combine(v / 50.0, (255.0 - v) / 300.0)
        band_max = combine(80.0 / 50.0, 330.0 / 300.0)
        assert row["expert_score"] == pytest.approx(by_hand)
        assert row["expert_verdict"] == ("anomalous" if by_hand >= 1 else "normal")
        assert (row["threshold"], row["score_max"]) == (1.0, pytest.approx(band_max))
        assert row["confidence"] == ("confident_normal" if by_hand < 1 else
                                     "uncertain" if by_hand < band_max else "confident_anomalous")
        assert row["threshold_method"] == f"{how}(patchcore k-sigma, padim mad)"
        assert row["expert_model_version"] == "patchcore:a1+padim:b2" and member_versions(version) == ["a1", "b2"]
        assert [(m["model"], m["score"], m["threshold"]) for m in json.loads(row["expert_members_json"])] == [
            ("patchcore", pytest.approx(v), 50.0), ("padim", pytest.approx(255.0 - v), 300.0)]
    assert {r["expert_verdict"] for r in out} == {"normal", "anomalous"}


# ---------------------------------------------------------------------------------------------- mllm / finish
def _image_file(tmp_path) -> dict:
    """An image on disk as the decode stage saw it (its URI and content hash): the MLLM stage reads it again."""
    path = tmp_path / "img.png"
    path.write_bytes(_png((300, 400, 3)))
    return {"image_uri": str(path), "content_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.fixture()
def image_file(tmp_path) -> dict:
    return _image_file(tmp_path)


def _scored(confidences: list[str], **extra) -> dict[str, np.ndarray]:
    rows = []
    for c in confidences:
        verdict = "normal" if c == "confident_normal" else "anomalous"
        row = {"expert_verdict": verdict, "confidence": c, "expert_score": 1.0, "threshold": 0.5, **extra}
        set_boxes(row, [])
        rows.append(row)
    return _decoded(rows)


class _FakeRunner:
    family = SimpleNamespace(uses_pixel_budget=True)  # as Qwen-VL's

    def __init__(self, fail_on_product=None):
        self.fail_on_product, self.calls, self.shapes = fail_on_product, [], []

    def run(self, requests):
        self.calls.append(len(requests))
        self.shapes += [r.image.shape for r in requests]
        if any(r.product == self.fail_on_product for r in requests):
            raise RuntimeError("CUDA out of memory")
        return [SimpleNamespace(answer="no", explanation="Looks fine.", guided=r.confidence == "uncertain",
                                image_attention_share=0.5) for r in requests]


def _mllm_stage(cfg, runner):
    stage = MLLMStage.__new__(MLLMStage)  # without loading a model
    Stage.__init__(stage, cfg)
    stage.runner, stage.received = runner, [0, 0]
    return stage


class _Pool(InProcessPool):
    """The MLLM pool in this process, noting the columns it was sent."""

    def __init__(self, stage):
        super().__init__(stage)
        self.sent = []

    def ask(self, batch):
        self.sent.append(sorted(batch))
        return super().ask(batch)


def _finish(cfg, runner):
    return FinishStage(cfg, pool=_Pool(_mllm_stage(cfg, runner)))


def _routed_batch(image_file: dict) -> Batch:
    """A row the MLLM is not asked about, two it answers and one ('cursed') on which it fails."""
    batch = _scored(["confident_normal", "uncertain", "confident_anomalous", "uncertain"], **image_file)
    batch["product"][3] = "cursed"
    return batch


def test_only_routed_rows_reach_the_mllm_and_a_failure_keeps_the_expert(cfg, image_file):
    batch = _routed_batch(image_file)
    batch["status"][0] = "ok"
    runner = _FakeRunner(fail_on_product="cursed")
    cfg.mllm.max_pixels = 30_000
    finish = _finish(cfg, runner)
    out = rows_of(finish(batch))
    assert [r["image_uri"] for r in out] == list(batch["image_uri"])  # the batch leaves whole, in order
    assert finish.pool.stage.traffic()[0] == 3  # the confident-normal row never reached the MLLM
    (sent,) = finish.pool.sent  # one call with the routed rows' decision columns: no pixels
    assert "image" not in sent and "expert_input" not in sent and "image_uri" in sent
    assert "image" not in out[0]  # no pixels travel on
    # the routed images, read again and capped at the processor's pixel budget (aspect kept)
    assert set(runner.shapes) == {(150, 200, 3)}
    tiling = _FakeRunner()
    tiling.family = SimpleNamespace(uses_pixel_budget=False)  # InternVL3, LLaVA-OneVision: they tile themselves
    _finish(cfg, tiling)(batch)
    assert set(tiling.shapes) == {(300, 400, 3)}
    normal, unsure, anomalous, cursed = out
    assert (normal["mllm_ran"], normal["verdict"], normal["explanation_source"]) == (False, "normal", "expert")
    assert (unsure["mllm_ran"], unsure["guided"], unsure["verdict"]) == (True, True, "normal")  # the MLLM decides
    assert (anomalous["mllm_ran"], anomalous["guided"], anomalous["explanation"]) == (True, False, "Looks fine.")
    assert (cursed["mllm_ran"], cursed["verdict"], cursed["status"], cursed["error_stage"]) == (
        False, "anomalous", "ok", "mllm")
    assert "MLLM generation failed, expert verdict kept: RuntimeError: CUDA out of memory" in cursed["error"]
    assert runner.calls == [3, 1, 1, 1]  # the batch of 3 failed, then one by one
    assert all(r["error"] is None for r in (normal, unsure, anomalous))


class _DeadPool:
    def ask(self, batch):
        from ray.exceptions import ActorDiedError

        raise ActorDiedError()


def test_a_pool_that_fails_for_good_keeps_the_expert_verdict_of_the_routed_rows(cfg, image_file):
    class Broken:
        def ask(self, batch):
            raise KeyError("a bug in the MLLM stage")

    batch = _scored(["confident_normal", "uncertain", "confident_anomalous"], **image_file)
    with pytest.raises(KeyError):  # a bug fails the task (Ray Data retries it, then the job stops)
        FinishStage(cfg, pool=Broken())(batch)
    out = rows_of(FinishStage(cfg, pool=_DeadPool())(batch))
    assert [r["status"] for r in out] == ["ok"] * 3
    assert [r["verdict"] for r in out] == ["normal", "anomalous", "anomalous"]
    assert out[0]["error"] is None and not any(r["mllm_ran"] for r in out)
    assert all("MLLM generation failed, expert verdict kept: ActorDiedError: The actor died" in r["error"]
               for r in out[1:])


def test_a_routed_image_changed_since_decoding_keeps_the_expert_verdict(cfg, image_file):
    batch = _scored(["uncertain"], **{**image_file, "content_sha256": "0" * 64})
    (row,) = rows_of(_mllm_stage(cfg, _FakeRunner())(batch))
    assert (row["mllm_ran"], row["verdict"], row["status"], row["error_stage"]) == (False, "anomalous", "ok", "mllm")
    assert "changed since it was decoded for the expert" in row["error"]


_UNPARSED = SimpleNamespace(family=_FakeRunner.family, run=lambda requests: [
    SimpleNamespace(answer="unparsed", explanation="bolt bolt zq", raw_text="bolt bolt zq", guided=True,
                    image_attention_share=None) for _ in requests])


def test_an_unparsed_answer_keeps_the_expert_explanation_and_stores_the_reply(cfg, image_file):
    (row,) = rows_of(_mllm_stage(cfg, _UNPARSED)(_scored(["uncertain"], **image_file)))
    assert (row["answer"], row["verdict"], row["explanation_source"], row["mllm_reply"]) == (
        "unparsed", "anomalous", "expert", "bolt bolt zq")
    assert row["explanation"].startswith("Expert: uncertain")


def test_failed_rows_get_the_not_asked_columns_in_both_stages(cfg, image_file):
    batch = _scored(["uncertain", "uncertain"], **image_file)
    batch["status"][1] = "error"
    for stage, verdict in ((_finish(cfg, _FakeRunner()), "normal"), (FinishStage(cfg), "anomalous")):
        out = rows_of(stage(batch))
        assert (out[1]["mllm_ran"], out[1]["guided"], out[1]["verdict"]) == (False, False, None)
        assert out[0]["verdict"] == verdict  # the MLLM's 'no', or the expert's verdict
    assert set(rows_of(FinishStage(cfg)(batch))[0]) == set(rows_of(_finish(cfg, _FakeRunner())(batch))[0])


# ---------------------------------------------------------------------------------------------- stamp
_STAMP = {"run_id": "r", "audit_date": "2026-11-30", "config_hash": "c", "eagle_version": "0", "mllm_model": None}


def test_stamp_stage_gives_the_output_schema(cfg):
    batch = _scored(["uncertain"], mllm_ran=False, verdict="anomalous")
    table = StampStage(cfg, stamp=_STAMP)(batch)
    assert isinstance(table, pa.Table) and table.schema == OUTPUT_SCHEMA
    assert table.column("run_id").to_pylist() == ["r"] and table.column("boxes").to_pylist() == [[]]
    with pytest.raises(ValueError, match="stamp lacks"):
        StampStage(cfg, stamp={"run_id": "r"})


# ---------------------------------------------------------------------------------------------- every stage
def stages_at_work(tmp_path) -> list[tuple[Stage, Batch]]:
    """Every stage with a batch that takes it down each of its paths: success, each kind of failure, rows that
    failed upstream (the MLLM stage through the finish stage's pool, and on its own for an unparsed answer)."""
    cfg, image = _cfg(), _image_file(tmp_path)
    routed = _routed_batch(image)
    routed["status"][0] = "error"
    return [(DecodeStage(cfg, input_sizes={"p": (16, 12)}), _listing(tmp_path)),
            (_expert_stage(cfg, broken={"broken"}), _expert_batch()),
            (_finish(cfg, _FakeRunner(fail_on_product="cursed")), routed),
            (FinishStage(cfg, pool=_DeadPool()), routed),
            (_mllm_stage(cfg, _UNPARSED), _scored(["uncertain"], **image)),
            (StampStage(cfg, stamp=_STAMP), _scored(["uncertain", "uncertain"], **image, status="error"))]


def test_every_stage_at_work_keeps_one_row_per_image(tmp_path):
    for stage, batch in stages_at_work(tmp_path):
        out = stage(batch)
        uris = out.column("image_uri").to_pylist() if isinstance(out, pa.Table) else list(out["image_uri"])
        assert uris == list(batch["image_uri"]), stage.name
