"""Tiny random multimodal LLMs for tests and the offline demo: real architectures, noise for words.

`build_tiny_mllm(family, out_dir)` writes a checkpoint that loads through `AutoProcessor` and
`AutoModelForImageTextToText` with HF_HUB_OFFLINE=1: random weights, a byte-level BPE tokenizer trained
here with the `tokenizers` library (the family's special tokens and chat template), and the family's image
processor with a small pixel budget (InternVL3: 112 px tiles, LLaVA-OneVision: 56 px crops). It exercises
prompts, batching, guidance and parsing, not answers. Importing it is cheap (the CLI lists FAMILIES).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The Qwen byte-level pre-tokenizer (transformers' Qwen2Tokenizer uses the same split).
_QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
_QWEN3_EXTRA = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen2-VL / Qwen2.5-VL-Instruct chat template, verbatim.
_QWEN25_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct chat template (render_content macro, system/user/assistant/tool turns); the tool-list
# preamble is left out because the audit never passes tools.
_QWEN3_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Enough English for a few hundred merges: the prompt vocabulary plus the answers the parser expects.
_CORPUS = [
    "You are an industrial quality inspector. Answer precisely and briefly.",
    "The query image is predicted as normal. The query image is predicted as anomalous.",
    "The second image marks the suspected anomalous regions with red boxes.",
    "Is there any defect in the object? Answer with Yes or No first, then one sentence.",
    "Yes, there is a scratch on the upper left of the bolt. No, the object is normal and intact.",
    "Reference images of normal products follow. Inspect the query image of the product.",
    "crack hole contamination missing part broken bent cut color stain print fabric screw bottle cable",
    "Answer: A. Yes B. No. The defect is a small dent near the center, at the bottom right edge.",
    "0 1 2 3 4 5 6 7 8 9 10 the a an of in on at with where what which why because",
    "system user assistant You are a helpful assistant. Picture Video Query image: Notes on this product:",
]


def _train_tokenizer(specials: list[str], vocab_size: int = 640) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _hf_tokenizer(specials: list[str], template: str, named: dict[str, str] | None = None) -> Any:
    from transformers import Qwen2Tokenizer

    trained = _train_tokenizer(specials)
    extra = named or [t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")]
    hf = Qwen2Tokenizer(
        tokenizer_object=trained,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=extra,
        model_max_length=32768,
    )
    hf.chat_template = template
    return hf


def _round_up(n: int, k: int = 64) -> int:
    return (n + k - 1) // k * k


def _qwen2_text(ids: dict[str, int], vocab: int, **extra: Any) -> dict[str, Any]:
    """A tiny Qwen2-style language model config (the LLM of Qwen2.5-VL, InternVL3 and LLaVA-OneVision)."""
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, use_sliding_window=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, **extra,
    )


def _qwen25_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = _qwen2_text(ids, vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def _qwen3_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import Qwen3VLConfig

    text = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[1],
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def _qwen_processor(tokenizer: Any, qwen3: bool) -> Any:
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    patch = 16 if qwen3 else 14
    factor = patch * 2  # patch size x spatial merge: one visual token per factor x factor pixels
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 64 * factor * factor}
    vision_kwargs: dict[str, Any] = dict(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    if qwen3:
        vision_kwargs.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = (Qwen3VLVideoProcessor if qwen3 else Qwen2VLVideoProcessor)(**vision_kwargs)
    return (Qwen3VLProcessor if qwen3 else Qwen2_5_VLProcessor)(
        image_processor=Qwen2VLImageProcessor(**vision_kwargs), tokenizer=tokenizer, video_processor=video,
        chat_template=tokenizer.chat_template)


# InternVL3: 112 px tiles of 8x8 patches, pixel-shuffled to 4x4 = 16 tokens; up to 4 tiles plus a thumbnail.
_INTERNVL_TILE, _INTERNVL_TOKENS = 112, 16


def _internvl_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import InternVLConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=_INTERNVL_TILE, patch_size=14)
    return InternVLConfig(text_config=dict(_qwen2_text(ids, vocab), model_type="qwen2"), vision_config=vision,
                          image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=_INTERNVL_TOKENS,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def _internvl_processor(tokenizer: Any) -> Any:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tile = {"height": _INTERNVL_TILE, "width": _INTERNVL_TILE}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, min_patches=1, max_patches=4),  # the processor tiles
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=_INTERNVL_TOKENS, chat_template=tokenizer.chat_template)


# LLaVA-OneVision: 56 px SigLIP crops of 4x4 patches = 16 tokens; anyres up to 2x2 crops (+ newline per row).
_LLAVA_CROP, _LLAVA_PINPOINTS = 56, [[56, 56], [56, 112], [112, 56], [112, 112]]


def _llava_ov_config(ids: dict[str, int], vocab: int) -> Any:
    from transformers import LlavaOnevisionConfig

    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=_LLAVA_CROP, patch_size=14, vision_use_head=False)
    return LlavaOnevisionConfig(
        text_config=dict(_qwen2_text(ids, vocab), model_type="qwen2"), vision_config=vision,
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=_LLAVA_PINPOINTS,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)


def _llava_ov_processor(tokenizer: Any) -> Any:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    crop = {"height": _LLAVA_CROP, "width": _LLAVA_CROP}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=crop, image_grid_pinpoints=_LLAVA_PINPOINTS),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size=crop),
        num_image_tokens=(_LLAVA_CROP // 14) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=tokenizer.chat_template)


def _chatml_template(image: str) -> str:
    """ChatML turns with `image` and a newline for each image item (InternVL3's and LLaVA-OneVision's layout)."""
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == "
            f"'image' %}}{image}\n{{% elif content['type'] == 'text' %}}{{{{ content['text'] }}}}{{% endif %}}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% endif %}")


@dataclass(frozen=True)
class _Family:
    """How to build one tiny family: tokenizer specials (named ones as tokenizer attributes), template, parts."""

    specials: list[str]
    template: str
    config: Callable[[dict[str, int], int], Any]
    processor: Callable[[Any], Any]
    named: dict[str, str] | None = None


_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
_TINY = {
    "qwen2_5_vl": _Family(_QWEN_SPECIALS, _QWEN25_TEMPLATE, _qwen25_config, lambda t: _qwen_processor(t, False)),
    "qwen3_vl": _Family(_QWEN_SPECIALS + _QWEN3_EXTRA, _QWEN3_TEMPLATE, _qwen3_config,
                        lambda t: _qwen_processor(t, True)),
    "internvl": _Family(_CHATML + list(_INTERNVL_NAMED.values()), _chatml_template("<IMG_CONTEXT>"),
                        _internvl_config, _internvl_processor, _INTERNVL_NAMED),
    "llava_onevision": _Family(_CHATML + ["<image>", "<video>"], _chatml_template("<image>"), _llava_ov_config,
                               _llava_ov_processor, {"image_token": "<image>", "video_token": "<video>"}),
}
FAMILIES = tuple(_TINY)


def build_tiny_mllm(family: str, out_dir: str, seed: int = 0) -> str:
    """Write a tiny random checkpoint of `family` (one of FAMILIES) to `out_dir`; return `out_dir`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in _TINY:
        raise ValueError(f"unknown tiny MLLM family {family!r}; choose from {FAMILIES}")
    spec = _TINY[family]
    tokenizer = _hf_tokenizer(spec.specials, spec.template, spec.named)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    config = spec.config(ids, _round_up(len(tokenizer)))
    processor = spec.processor(tokenizer)

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(build_tiny_mllm(args.family, args.out_dir))


if __name__ == "__main__":
    main()
