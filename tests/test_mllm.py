"""The MLLM runner on tiny random models: batching equals one-by-one, routing of guidance, no leaked state,
baseline mode, model sources (local dir, s3:// prefix) and the command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from eagle.config import GuidanceConfig, PromptConfig, load_config
from eagle.findings import Box
from eagle.io.storage import list_files, write_bytes
from eagle.mllm import guidance as g
from eagle.mllm.__main__ import main
from eagle.mllm.download import resolve_model_source
from eagle.mllm.runner import MLLMRequest, MLLMResult, MLLMRunner
from eagle.testing.tiny_mllm import FAMILIES

TINY = ["mllm.dtype=float32", "mllm.min_pixels=3136", "mllm.max_pixels=50176", "mllm.max_new_tokens=6"]
DEVICE = os.environ.get("EAGLE_TEST_DEVICE", "cpu")  # "cuda" runs the same checks on a GPU machine


def _runner(path: str, *overrides: str) -> MLLMRunner:
    cfg = load_config(overrides=[*TINY, f"mllm.model={path}", *overrides])
    return MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=DEVICE)


def _requests() -> list[MLLMRequest]:
    rng = np.random.default_rng(7)

    def img(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    mask = np.zeros((50, 60), bool)
    mask[10:30, 5:25] = True
    return [
        MLLMRequest(img(112, 140), "bolt", "anomalous", "uncertain", [Box(10, 10, 60, 70, 0.9)]),
        MLLMRequest(img(200, 90), "bolt", "normal", "confident_normal"),
        MLLMRequest(img(84, 84), "nut", "anomalous", "confident_anomalous", [Box(0, 0, 40, 40, 0.8)]),
        MLLMRequest(img(100, 120), "nut", "anomalous", "uncertain", [], mask=mask),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def runner(request: pytest.FixtureRequest, tiny_mllm) -> MLLMRunner:
    return _runner(tiny_mllm(request.param))


def _same(a: MLLMResult, b: MLLMResult) -> None:
    assert (a.raw_text, a.answer, a.explanation, a.guided) == (b.raw_text, b.answer, b.explanation, b.guided)
    if a.image_attention_share is None:
        assert b.image_attention_share is None
    else:
        assert a.image_attention_share == pytest.approx(b.image_attention_share, abs=1e-5)


def test_batch_equals_one_by_one_and_guidance_follows_apply_to(runner: MLLMRunner) -> None:
    requests = _requests()
    batched = runner.run(requests)
    assert [r.guided for r in batched] == [True, False, False, True]  # apply_to="uncertain"
    shares = [r.image_attention_share for r in batched]
    assert shares[1] is None and all(0.0 < s < 1.0 for s in (shares[0], shares[2], shares[3]))
    assert all(r.raw_text for r in batched)
    for req, res in zip(requests, batched, strict=True):
        _same(runner.run([req])[0], res)


def test_no_state_leaks_between_batches(runner: MLLMRunner) -> None:
    plain = _requests()[1]
    before = runner.run([plain])[0]
    runner.run([r for r in _requests() if r.confidence == "uncertain"])  # a fully guided batch
    assert g.active() is None
    _same(runner.run([plain])[0], before)


def test_guidance_changes_the_guided_sample_only(runner: MLLMRunner) -> None:
    requests = _requests()
    saved = runner.guidance_cfg
    try:
        runner.guidance_cfg = GuidanceConfig(image_bias=0.0)
        unbiased = runner.run(requests)
        runner.guidance_cfg = GuidanceConfig(image_bias=3.0)
        biased = runner.run(requests)
        runner.guidance_cfg = GuidanceConfig(apply_to="anomalous")
        assert [r.guided for r in runner.run(requests)] == [True, False, True, True]
    finally:
        runner.guidance_cfg = saved
    for i in (0, 3):  # guided: heads are re-weighted by their image mass, later layers see the change
        assert abs(biased[i].image_attention_share - unbiased[i].image_attention_share) > 1e-6
    for i in (1, 2):  # unguided samples in the same batch are untouched
        _same(biased[i], unbiased[i])


def test_baseline_mode_sends_the_plain_image_without_guidance(runner: MLLMRunner) -> None:
    saved = runner.prompt_cfg
    try:
        runner.prompt_cfg = PromptConfig(use_expert=False)
        prompts = [runner.prompt(r) for r in _requests()]
        results = runner.run(_requests())
    finally:
        runner.prompt_cfg = saved
    assert all(len(p.images) == 1 and p.prior is None for p in prompts)
    assert not any(r.guided for r in results)


def test_encoded_spans_point_at_the_query_image_and_the_prior(runner: MLLMRunner) -> None:
    requests = _requests()
    enc = runner.encode([runner.prompt(r) for r in requests])
    ids = enc.inputs["input_ids"]
    tok = runner.processor.tokenizer
    for b, req in enumerate(requests):
        s, e = enc.image_spans[b]
        assert (ids[b, s:e] == runner.image_token_id).all() and e - s == sum(p.tokens for p in enc.layouts[b])
        assert ids[b, s - 1] != runner.image_token_id and ids[b, e] != runner.image_token_id
        cfg = runner.prompt_cfg
        prior = cfg.prior_anomalous if req.expert_verdict == "anomalous" else cfg.prior_normal
        ps, pe = enc.prior_spans[b]
        assert tok.decode(ids[b, ps:pe]).strip() == prior
    # an anomalous request with boxes has a second (boxed) image after the query image
    assert len(g.token_runs(ids[0].tolist(), runner.image_token_id)) == 2
    assert len(g.token_runs(ids[1].tolist(), runner.image_token_id)) == 1


@pytest.mark.filterwarnings("error::UserWarning")
def test_read_only_images_as_decoded_encode_without_warnings(runner: MLLMRunner) -> None:
    # decoded images are read-only arrays; processors hand them to torch.from_numpy, which warns on those
    requests = _requests()
    for r in requests:
        r.image.setflags(write=False)
    enc = runner.encode([runner.prompt(r) for r in requests])
    assert len(enc.image_spans) == len(requests)


def test_model_from_s3_prefix_is_downloaded_once(tiny_qwen25vl: str, s3_bucket: str, tmp_path: Path) -> None:
    prefix = f"{s3_bucket}/models/tiny"
    for f in Path(tiny_qwen25vl).iterdir():
        write_bytes(f"{prefix}/{f.name}", f.read_bytes())
    local = resolve_model_source(prefix, cache_dir=str(tmp_path))
    assert sorted(p.name for p in Path(local).iterdir() if p.name != ".complete") == sorted(
        p.name for p in Path(tiny_qwen25vl).iterdir())
    assert (Path(local) / "model.safetensors").read_bytes() == (Path(tiny_qwen25vl) / "model.safetensors").read_bytes()
    assert resolve_model_source(prefix + "/", cache_dir=str(tmp_path)) == local  # cached
    write_bytes(f"{prefix}/extra.txt", b"changed")  # a changed prefix is a new version
    assert resolve_model_source(prefix, cache_dir=str(tmp_path)) != local
    assert len(list_files(prefix)) == len(list(Path(tiny_qwen25vl).iterdir())) + 1
    cfg = load_config(overrides=[*TINY, f"mllm.model={prefix}"])
    res = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, cache_dir=str(tmp_path)).run(_requests()[:1])
    assert res[0].guided and res[0].raw_text


def test_command_prints_one_json_line_per_image(tiny_qwen3vl: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    paths = []
    for i, size in enumerate([(96, 128), (64, 64)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((*size, 3), 40 * (i + 1), np.uint8)).save(path)
        paths.append(str(path))
    main(["--model", tiny_qwen3vl, "--image", paths[0], "--image", paths[1], "--box", "4,4,40,40",
          "--device", "cpu", *sum((["--set", o] for o in TINY), [])])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["image"] for line in lines] == paths
    assert all(line["guided"] and line["answer"] in ("yes", "no", "unparsed") for line in lines)
    assert all(line["verdict"] == {"yes": "anomalous", "no": "normal"}.get(line["answer"], "anomalous")
               for line in lines)


# ------------------------------------------------------------------------------- throughput options (GPU)
def test_sorted_batches_return_the_answers_in_input_order(runner: MLLMRunner) -> None:
    """run_all cuts batches after sorting by prompt length; each request's result is the one it gets unsorted."""
    requests = [_requests()[i] for i in (1, 0, 3, 2, 0, 1)]
    order = runner.length_order(requests)
    assert order != list(range(len(requests)))  # the sort moves something here
    sorted_results = runner.run_all(requests, batch_size=3)
    unsorted_results = runner.run_all(requests, batch_size=3, sort=False)
    for a, b in zip(sorted_results, unsorted_results, strict=True):
        _same(a, b)
    for req, res in zip(requests, sorted_results, strict=True):
        _same(runner.run([req])[0], res)


def test_static_cache_gives_the_same_replies(tiny_qwen25vl: str) -> None:
    """mllm.cache=static (fixed shapes for compile / CUDA graphs) changes nothing in the replies, guided or not."""
    requests = _requests()
    dynamic = _runner(tiny_qwen25vl).run(requests)
    static = _runner(tiny_qwen25vl, "mllm.cache=static").run(requests)
    for a, b in zip(dynamic, static, strict=True):
        _same(a, b)


@pytest.mark.parametrize(("text", "answer_done", "sentence_done"), [
    ("", False, False),
    ("No", False, False),  # "No" may still become "None" or "Not"
    ("Not sure", False, False),
    ("No,", True, False),
    ("Yes ", True, False),
    ("**Yes.** There is a scratch", True, False),
    ("**Yes.** There is a scratch on the top left.", True, True),
    ("Answer: no. The bolt is intact!", True, True),
    ("No. It is 0.5", True, False),
    ("There is a scratch. Yes.", False, False),  # the answer does not lead: runs to eos
])
def test_reply_done(text: str, answer_done: bool, sentence_done: bool) -> None:
    from eagle.mllm.runner import reply_done

    assert reply_done(text, "answer") is answer_done
    assert reply_done(text, "sentence") is sentence_done
    assert reply_done(text, "eos") is False


def test_reply_stop_marks_rows_done_as_their_replies_complete() -> None:
    import torch

    from eagle.mllm.runner import ReplyStop

    replies = {(1, 2): "No,", (1, 3): "Yes", (2, 3): "No, it", (3, 4): "Yes, a dent."}

    def decode(ids: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        return [replies.get(tuple(row.tolist()), "") for row in ids]

    stop = ReplyStop(decode, prompt_len=1, stop="sentence")  # prompt token 0, then the new tokens
    assert stop(torch.tensor([[0, 1, 2], [0, 1, 3], [0, 3, 4]])).tolist() == [False, False, True]
    assert stop(torch.tensor([[0, 1, 3], [0, 1, 3], [0, 1, 3]])).tolist() == [False, False, True]  # stays done
    stop = ReplyStop(decode, prompt_len=1, stop="answer")
    assert stop(torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 3]])).tolist() == [True, False, True]


def test_stop_options_reach_generate(tiny_qwen25vl: str) -> None:
    """With mllm.stop a stopping criterion is passed; replies of a random model never complete, so they
    equal the 'eos' replies (the criterion only ends replies, it never changes a token)."""
    requests = _requests()[:2]
    plain = _runner(tiny_qwen25vl)
    stopping = _runner(tiny_qwen25vl, "mllm.stop=sentence")
    assert "stopping_criteria" in stopping.generate_options(10) and "stopping_criteria" not in plain.generate_options(10)
    for a, b in zip(plain.run(requests), stopping.run(requests), strict=True):
        _same(a, b)
