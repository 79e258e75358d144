"""Confidence-aware attention sharpening (CAAS) as a registered transformers attention function.

`register()` adds one attention function and its mask function under the name `ATTENTION_NAME`; a model
loaded with ``attn_implementation={"text_config": ATTENTION_NAME}`` runs it in every decoder layer. The
function reads the active `GuidanceContext` from a context variable (generate() rejects unknown kwargs, and a
context variable keeps concurrent threads apart). Without an active context, or in a layer the context does
not name, it *is* transformers' sdpa. In a guided layer it passes a per-sample additive bias on the query
image's key columns (and optionally the text-prior span) to sdpa as `position_bias`, which sdpa folds into the
causal/padding mask. It can also record the softmax of the last query row (the one that emits the next
token), so that `region_share` can say how much image attention falls inside the expert's region.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from eagle.findings import Box
from eagle.mllm.families import Piece, layout_coverage

ATTENTION_NAME = "eagle_guided_sdpa"
Span = tuple[int, int]  # [start, end) token positions in the padded prompt

# EAGLE guides layers 9-14 of Qwen2.5-VL-7B's 28: a band starting at 9/28 of the depth, 6/28 of it wide.
_BAND_START, _BAND_WIDTH, _REFERENCE_DEPTH = 9, 6, 28


def middle_band(num_layers: int) -> tuple[int, ...]:
    """The paper's middle band scaled to `num_layers` (9-14 for 28 layers, 3-4 for 8, at least one layer)."""
    start = round(_BAND_START * num_layers / _REFERENCE_DEPTH)
    width = max(1, round(_BAND_WIDTH * num_layers / _REFERENCE_DEPTH))
    return tuple(range(min(start, num_layers - 1), min(start + width, num_layers)))


def resolve_layers(num_layers: int, configured: Sequence[int] | None) -> tuple[int, ...]:
    """Configured decoder layers (checked against the model's depth) or the scaled middle band."""
    if configured is None:
        return middle_band(num_layers)
    bad = [i for i in configured if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"guidance.layers {bad} out of range for a model with {num_layers} decoder layers")
    return tuple(sorted(set(configured)))


@dataclass
class GuidanceContext:
    """What the attention function does while this context is active (one generate call).

    column_bias: (batch, prompt_len) additive logit bias per key column, zero for unguided samples; None
    disables biasing (record only). Key columns past the prompt (generated tokens) get no bias.
    """

    layers: frozenset[int]
    column_bias: torch.Tensor | None
    rows: Literal["last", "all"] = "last"
    record_layers: frozenset[int] = frozenset()
    record_decode: bool = False
    records: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> per call (B, heads, kv)
    _bias_cache: tuple[tuple, torch.Tensor] | None = field(default=None, repr=False)

    def bias(self, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive bias for sdpa: (B, 1, q_len, kv_len) for rows='last', (B, 1, 1, kv_len) for rows='all'."""
        key = (q_len, kv_len, dtype, device)
        if self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        cols = self.column_bias[:, :kv_len].to(device=device, dtype=dtype)
        cols = torch.nn.functional.pad(cols, (0, kv_len - cols.shape[1]))  # (B, kv)
        if self.rows == "all" or q_len == 1:
            bias = cols[:, None, None, :]
        else:
            bias = cols.new_zeros(cols.shape[0], 1, q_len, kv_len)
            bias[:, 0, -1, :] = cols
        self._bias_cache = (key, bias)
        return bias

    def prefill_attention(self) -> dict[int, torch.Tensor]:
        """Recorded last-row attention of the prefill pass per layer: (B, heads, prompt_len), float32 on CPU."""
        return {layer: calls[0] for layer, calls in self.records.items() if calls}


_ACTIVE: ContextVar[GuidanceContext | None] = ContextVar("eagle_guidance", default=None)


@contextmanager
def guidance(ctx: GuidanceContext) -> Iterator[GuidanceContext]:
    """Activate `ctx` for the model calls inside the block (this thread/task only); always restored."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def active() -> GuidanceContext | None:
    return _ACTIVE.get()


def _last_row_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, scaling: float | None,
) -> torch.Tensor:
    """Softmax of the last query row as sdpa computes it, per head: (B, heads, kv), float32."""
    q = query[:, :, -1:, :].float()  # (B, H, 1, D)
    k = repeat_kv(key, getattr(module, "num_key_value_groups", 1)).float()  # (B, H, kv, D)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-1, -2)) * scale  # (B, H, 1, kv)
    if mask is not None:
        row = mask[:, :, -1:, :]
        logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
    if bias is not None:
        logits = logits + bias[:, :, -1:, :].float()
    return logits.softmax(dim=-1)[:, :, 0, :]


def guided_sdpa_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa plus the active context's bias (and recording) in the layers it names."""
    ctx = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if ctx is None or (layer not in ctx.layers and layer not in ctx.record_layers):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    bias = None
    if layer in ctx.layers and ctx.column_bias is not None:
        bias = ctx.bias(q_len, kv_len, query.dtype, query.device)
    if layer in ctx.record_layers and (q_len > 1 or ctx.record_decode or not ctx.records.get(layer)):
        probs = _last_row_attention(module, query, key, attention_mask, bias, kwargs.get("scaling"))
        ctx.records.setdefault(layer, []).append(probs.cpu())
    if bias is not None:
        extra = kwargs.pop("position_bias", None)
        kwargs["position_bias"] = bias if extra is None else extra + bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its mask function (idempotent); return the name to load with."""
    AttentionInterface.register(ATTENTION_NAME, guided_sdpa_attention)
    # Without a mask entry transformers builds no causal/padding mask at all for an unknown name.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


# ------------------------------------------------------------------------------------------- spans
def token_runs(ids: Sequence[int], token_id: int) -> list[Span]:
    """Maximal runs of `token_id` in one row of input ids, in order."""
    runs: list[Span] = []
    start = None
    for i, t in enumerate(ids):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def char_span_tokens(offsets: Sequence[tuple[int, int]], span: Span) -> Span | None:
    """Tokens whose character offsets overlap `span` (offsets as the tokenizer returns them; (0, 0) = none)."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < span[1] and b > span[0]]
    return (hits[0], hits[-1] + 1) if hits else None


def column_bias(
    length: int, image_spans: Sequence[Span | None], prior_spans: Sequence[Span | None],
    image_bias: Sequence[float], prior_bias: Sequence[float],
) -> torch.Tensor:
    """(batch, length) float32 key-column bias: image_bias[b] on image_spans[b], prior_bias[b] on prior_spans[b]."""
    bias = torch.zeros(len(image_spans), length)
    for b, (img, prior) in enumerate(zip(image_spans, prior_spans, strict=True)):
        if img is not None:
            bias[b, img[0]:img[1]] = image_bias[b]
        if prior is not None:
            bias[b, prior[0]:prior[1]] = prior_bias[b]
    return bias


# ------------------------------------------------------------------------------------------- diagnostics
def region_coverage(
    image_hw: tuple[int, int], layout: Sequence[Piece], boxes: Sequence[Box] = (), mask: np.ndarray | None = None,
) -> np.ndarray | None:
    """Per image token (in the family's layout), the share of the pixels it shows that the boxes or mask cover.

    The boxes (original pixels) and mask (any resolution, resized to the image) are unioned, then averaged by
    area over each token's cell: values in [0, 1], NaN for tokens with no place in the image (newlines). None
    when there is no region.
    """
    h, w = image_hw
    region = np.zeros((h, w), np.float32)
    if mask is not None and mask.any():
        region = np.maximum(region, cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST))
    for box in boxes:
        region[max(box.y1, 0):min(box.y2, h), max(box.x1, 0):min(box.x2, w)] = 1.0
    if not region.any():
        return None
    return layout_coverage(region, layout)


def region_share(attention: torch.Tensor, span: Span, coverage: np.ndarray) -> float:
    """Share of the attention on the image tokens `span` that falls inside the region (area-weighted).

    attention: (heads, kv) or (kv,) last-row attention; averaged over heads. coverage: one value per token of
    the span (`region_coverage`); tokens with NaN coverage count in neither the region nor the total.
    """
    attn = attention.float().reshape(-1, attention.shape[-1]).mean(dim=0)[span[0]:span[1]].numpy()
    if attn.size != coverage.size:
        raise ValueError(f"image span has {attn.size} tokens but the image's token layout has {coverage.size}")
    placed = ~np.isnan(coverage)
    total = float(attn[placed].sum())
    return float((attn[placed] * coverage[placed]).sum() / total) if total > 0 else 0.0
