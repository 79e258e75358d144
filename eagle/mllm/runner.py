"""The guided MLLM stage: prompts from the expert's result, batched greedy generation, parsed answers.

`MLLMRunner` loads a processor and an image-text-to-text model once (hub id, local path or s3:// prefix),
with the guided attention function from `eagle.mllm.guidance` when guidance or attention recording is on; what
differs between families (Qwen-VL, InternVL3, LLaVA-OneVision) is in `eagle.mllm.families`. `run`
builds one prompt per request, encodes the batch with left padding, finds each sample's query-image and
text-prior token spans from the processor's own ids, activates guidance for the samples that get it
(GuidanceConfig.apply_to) and generates. The final verdict rule is `eagle.findings.final_verdict`.

For throughput on a GPU: `run_all` sorts requests by their estimated prompt length before cutting them into
batches (less padding; results in input order), ``mllm.stop`` ends each reply at its answer or at the first
sentence after it (`ReplyStop`), and ``mllm.cache: static`` / ``mllm.compile`` give generate fixed shapes and a
compiled decoding step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eagle.config import GuidanceConfig, MLLMConfig, PromptConfig, StorageConfig
from eagle.findings import Answer, Box, Confidence, Verdict
from eagle.mllm import guidance as g
from eagle.mllm.answers import clean_reply, parse_answer
from eagle.mllm.download import resolve_model_source
from eagle.mllm.families import Layout, family_for
from eagle.mllm.prompts import Prompt, build_prompt


@dataclass(frozen=True)
class MLLMRequest:
    """One query image with the expert's result. Boxes are in original-image pixels."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    product: str
    expert_verdict: Verdict
    confidence: Confidence
    boxes: list[Box] = field(default_factory=list)
    mask: np.ndarray | None = None  # (h, w) bool anomalous region at any resolution
    references: list[np.ndarray] = field(default_factory=list)  # normal images of the same product


@dataclass(frozen=True)
class MLLMResult:
    answer: Answer
    explanation: str
    raw_text: str
    guided: bool
    image_attention_share: float | None  # share of query-image attention inside the expert's region


@dataclass
class Encoded:
    """A processed batch and, per sample, where its evidence sits in the padded token sequence."""

    inputs: dict[str, torch.Tensor]
    image_spans: list[g.Span]  # the query image's tokens
    prior_spans: list[g.Span | None]  # the text prior's tokens (None in baseline mode)
    layouts: list[Layout]  # which part of the query image each of its tokens shows


# A reply's leading Yes/No, complete (a non-word character follows it), and the first sentence after it.
_LEAD = re.compile(r"^\W*(?:(?:the\s+|my\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?\W*(yes|no)\b(?=\W)", re.I)
_SENTENCE = re.compile(r"\w[^.!?]*[.!?]$")


def reply_done(text: str, stop: str) -> bool:
    """Whether a partial reply is complete under ``mllm.stop`` ('sentence' or 'answer'; 'eos': never here)."""
    if stop == "eos":
        return False
    reply = clean_reply(text) + (" " if text[-1:].isspace() else "")
    lead = _LEAD.match(reply)
    if lead is None:
        return False
    if stop == "answer":
        return True
    rest = reply[lead.end():].lstrip(" \t.,:;!-\u2013\u2014)").rstrip()
    return bool(_SENTENCE.search(rest)) and text.rstrip()[-1:] in ".!?"


class ReplyStop:
    """A transformers stopping criterion: per row, True once its reply is complete under ``mllm.stop``
    (`reply_done`); generate pads finished rows and ends when all are."""

    def __init__(self, decode: Any, prompt_len: int, stop: str) -> None:
        self.decode, self.prompt_len, self.stop = decode, prompt_len, stop
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        rows = (~self.done).nonzero().squeeze(1).tolist()
        if rows:
            texts = self.decode(input_ids[rows, self.prompt_len:].cpu(), skip_special_tokens=True)
            for row, text in zip(rows, texts, strict=True):
                self.done[row] = reply_done(text, self.stop)
        return self.done.to(input_ids.device)


def estimated_tokens(height: int, width: int, images: int, max_pixels: int) -> int:
    """A prompt's length for sorting, without the processor: image tokens grow with the pixels each image is
    shown at (28 x 28 pixels a token for Qwen-VL; roughly proportional for tiled families)."""
    return images * max(1, min(height * width, max_pixels) // (28 * 28))


class MLLMRunner:
    """Loads the MLLM once; `run` audits a batch of requests in one generate call."""

    def __init__(
        self,
        mllm: MLLMConfig,
        prompts: PromptConfig,
        guidance: GuidanceConfig,
        device: str = "cpu",
        storage: StorageConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if mllm.model is None:
            raise ValueError("mllm.model is not set; the MLLM stage is disabled")
        self.mllm_cfg, self.prompt_cfg, self.guidance_cfg = mllm, prompts, guidance
        self.device = torch.device(device)
        source = resolve_model_source(mllm.model, storage, cache_dir)
        hub = {"revision": mllm.revision} if mllm.revision and not Path(source).exists() else {}
        trust = {"trust_remote_code": mllm.trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(source, **hub, **trust)
        config = AutoConfig.from_pretrained(source, **hub, **trust)
        self.family = family_for(config.model_type)
        attn: str | dict[str, str] = "sdpa"
        if guidance.enabled or guidance.record_attention:
            name = g.register()
            attn = {"text_config": name} if "text_config" in getattr(config, "sub_configs", {}) else name
        self.attn_implementation = attn
        self.model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=getattr(torch, mllm.dtype), attn_implementation=attn, **hub, **trust
        ).to(self.device).eval()
        self.layers = g.resolve_layers(config.get_text_config().num_hidden_layers, guidance.layers)
        self.image_token_id = self.processor.image_token_id
        self.processor_kwargs = self.family.processor_kwargs(mllm)

    # ------------------------------------------------------------------ steps
    def wants_guidance(self, req: MLLMRequest) -> bool:
        """Guidance applies to the classes GuidanceConfig.apply_to names, and never in baseline mode."""
        cfg = self.guidance_cfg
        if not (cfg.enabled and self.prompt_cfg.use_expert):
            return False
        return {"uncertain": req.confidence == "uncertain", "anomalous": req.expert_verdict == "anomalous",
                "all": True}[cfg.apply_to]

    def prompt(self, req: MLLMRequest) -> Prompt:
        return build_prompt(self.prompt_cfg, req.image, req.product, req.expert_verdict, req.boxes, req.references,
                            req.confidence)

    def encode(self, prompts: list[Prompt]) -> Encoded:
        """Tokenize with left padding; locate each sample's query image and text prior in the padded ids."""
        texts = [self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        # processors hand the arrays to torch.from_numpy, which wants them writable (a decoded image is not)
        images = [np.require(img, requirements="W") for p in prompts for img in p.images]
        batch = self.processor(
            text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
            return_offsets_mapping=True, return_text_replacement_offsets=True, **self.processor_kwargs,
        )
        offsets = batch.pop("offset_mapping").tolist()
        replacements = batch.pop("text_replacement_offsets")
        layouts = self.family.layouts(self.processor, batch, [img.shape[:2] for img in images])
        image_spans, prior_spans, query_layouts = [], [], []
        first_image = 0
        for b, p in enumerate(prompts):
            runs = g.token_runs(batch["input_ids"][b].tolist(), self.image_token_id)
            if len(runs) != len(p.images):
                raise RuntimeError(f"sample {b}: {len(runs)} image token runs for {len(p.images)} images")
            image_spans.append(runs[p.query_index])
            query_layouts.append(layouts[first_image + p.query_index])
            first_image += len(p.images)
            prior_spans.append(self._prior_span(texts[b], p.prior, offsets[b], replacements[b]))
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return Encoded(inputs, image_spans, prior_spans, query_layouts)

    @staticmethod
    def _prior_span(text: str, prior: str | None, offsets: list, replacements: list[dict]) -> g.Span | None:
        """Tokens of the prior sentence: its characters, shifted past expanded image placeholders."""
        if not prior or (start := text.find(prior)) < 0:
            return None
        shift = sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                    for r in replacements if r["span"][1] <= start)
        return g.char_span_tokens(offsets, (start + shift, start + shift + len(prior)))

    def guidance_context(self, enc: Encoded, guided: list[bool]) -> g.GuidanceContext | None:
        """The context for one generate call; None (stock attention) when nothing is guided or recorded."""
        cfg = self.guidance_cfg
        if not any(guided) and not cfg.record_attention:
            return None
        bias = None
        if any(guided):
            length = enc.inputs["input_ids"].shape[1]
            bias = g.column_bias(
                length, enc.image_spans, enc.prior_spans,
                [cfg.image_bias if x else 0.0 for x in guided], [cfg.prior_bias if x else 0.0 for x in guided],
            )
        return g.GuidanceContext(
            layers=frozenset(self.layers) if bias is not None else frozenset(), column_bias=bias, rows=cfg.rows,
            record_layers=frozenset(self.layers) if cfg.record_attention else frozenset(),
        )

    def generate_options(self, prompt_len: int) -> dict[str, Any]:
        """generate()'s arguments beyond the inputs: length, greedy, stopping, cache and compilation."""
        from transformers import StoppingCriteriaList

        cfg = self.mllm_cfg
        options: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False,
                                   "disable_compile": not cfg.compile}
        if cfg.cache == "static":
            options["cache_implementation"] = "static"
        if cfg.stop != "eos":
            options["stopping_criteria"] = StoppingCriteriaList(
                [ReplyStop(self.processor.batch_decode, prompt_len, cfg.stop)])
        return options

    def generate(self, enc: Encoded, ctx: g.GuidanceContext | None) -> list[str]:
        """Greedy generation under `ctx`; the decoded new text per sample."""
        prompt_len = enc.inputs["input_ids"].shape[1]
        with (g.guidance(ctx) if ctx is not None else nullcontext()), torch.inference_mode():
            out = self.model.generate(**enc.inputs, **self.generate_options(prompt_len))
        new = out[:, prompt_len:]
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def attention_shares(self, enc: Encoded, ctx: g.GuidanceContext | None,
                         requests: list[MLLMRequest]) -> list[float | None]:
        """Share of query-image attention inside the expert's region, from the prefill's recorded last row."""
        recorded = ctx.prefill_attention() if ctx is not None else {}
        if not recorded:
            return [None] * len(requests)
        attention = torch.stack(list(recorded.values())).mean(dim=0)  # (B, heads, kv), mean over layers
        shares: list[float | None] = []
        for b, req in enumerate(requests):
            coverage = g.region_coverage(req.image.shape[:2], enc.layouts[b], req.boxes, req.mask)
            shares.append(None if coverage is None else g.region_share(attention[b], enc.image_spans[b], coverage))
        return shares

    # ------------------------------------------------------------------ public
    def length_order(self, requests: Sequence[MLLMRequest]) -> list[int]:
        """Indices of `requests` by estimated prompt length (stable): batches cut from this order pad less."""
        def cost(i: int) -> int:
            req = requests[i]
            images = 2 if self.prompt_cfg.use_expert and req.expert_verdict == "anomalous" and req.boxes else 1
            return estimated_tokens(*req.image.shape[:2], images + self.prompt_cfg.few_shot, self.mllm_cfg.max_pixels)
        return sorted(range(len(requests)), key=cost)

    def run_all(self, requests: Sequence[MLLMRequest], batch_size: int, sort: bool = True) -> list[MLLMResult]:
        """Audit any number of requests in batches of `batch_size`, cut after sorting them by prompt length
        (`sort`); the results in the order of `requests`."""
        order = self.length_order(requests) if sort else list(range(len(requests)))
        results: list[MLLMResult | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, res in zip(chunk, self.run([requests[i] for i in chunk]), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def run(self, requests: list[MLLMRequest]) -> list[MLLMResult]:
        """Audit `requests` in one batch (size them with resources.mllm.batch_size)."""
        if not requests:
            return []
        guided = [self.wants_guidance(r) for r in requests]
        enc = self.encode([self.prompt(r) for r in requests])
        ctx = self.guidance_context(enc, guided)
        texts = self.generate(enc, ctx)
        shares = self.attention_shares(enc, ctx, requests)
        results = []
        for text, was_guided, share in zip(texts, guided, shares, strict=True):
            parsed = parse_answer(text, self.prompt_cfg.answer_options)
            results.append(MLLMResult(parsed.answer, parsed.explanation, text, was_guided, share))
        return results
