"""Tiny random Qwen2.5-VL checkpoints, written offline in the published layout.

The architecture is the real one (14-px patches over 2 frames, window attention with full-attention
blocks, the 2x2 patch merger, Qwen2 with GQA and multimodal RoPE) at small widths, with a
byte-level BPE tokenizer trained here that carries Qwen2.5-VL's special tokens, the processor's
settings and the published chat template. Its outputs are random text: it is for tests and
demos. :func:`write_random_qwen_checkpoint` writes a named full-size architecture the same way
(random bf16 weights, the tiny tokenizer), for speed measurements only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from aim_llava.model.qwen2_5_vl.chat import QWEN2_5_VL_CHAT_TEMPLATE
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLConfig, config_from_dict
from aim_llava.model.qwen2_5_vl.processor import CLIP_MEAN, CLIP_STD
from aim_llava.tiny_checkpoint import MAX_SHARD_BYTES, TINY_TEXT, build_tokenizer, write_shards

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TINY_QWEN_TEXT = TINY_TEXT  # the tiny LLaVA-OneVision's LLM: 6 layers, 4 heads of 16, 2 key/value heads
TINY_QWEN_MROPE_SECTION = [2, 3, 3]  # half the text head size (16 / 2)
TINY_QWEN_VISION = {
    "depth": 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_chans": 3,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1, 3],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
# The published image bounds; smaller video frames than the published 128 to 768 tokens, to keep
# tests fast (16 to 64 tokens a frame).
TINY_IMAGE_PIXELS = (56 * 56, 28 * 28 * 16384)
TINY_VIDEO_PIXELS = (16 * 28 * 28, 64 * 28 * 28)


def published_config(text: dict, vision: dict, mrope_section: list[int], token_ids: dict[str, int],
                     dtype: str) -> dict:
    """A config.json as the published Instruct checkpoints have it (flat text fields)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
        "vision_config": vision,
        **token_ids,
        "torch_dtype": dtype,
    }


def random_weights(config: Qwen2_5_VLConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the published names for ``config``: norms near 1, matrices with a spread
    shrinking with their width (activations of a full-size model stay of order one)."""
    from aim_llava.model.qwen2_5_vl.modeling import Qwen2_5_VLForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Qwen2_5_VLForCausalLM(config).state_dict().items()}
    if config.text.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(*shape, generator=generator)
        if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
            value = 1.0 + 0.1 * noise
        elif name == "model.embed_tokens.weight":
            value = noise
        elif len(shape) == 2:
            value = noise * 0.1 * min(1.0, (128 / shape[1]) ** 0.5)
        elif len(shape) == 5:  # the patch embedding
            value = noise * 0.05
        else:
            value = noise * 0.1
        state[name] = value.to(dtype)
    return state


def write_processor_files(out: Path, image_pixels: tuple[int, int], video_pixels: tuple[int, int]) -> None:
    """preprocessor_config.json (published keys), video_preprocessor_config.json and the chat template."""
    common = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(CLIP_MEAN),
              "image_std": list(CLIP_STD)}
    image = {"min_pixels": image_pixels[0], "max_pixels": image_pixels[1], **common,
             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    video = {"size": {"shortest_edge": video_pixels[0], "longest_edge": video_pixels[1]}, **common,
             "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2))


def write_checkpoint(out: str | Path, text: dict, vision: dict, mrope_section: list[int], seed: int, dtype: torch.dtype,
                     video_pixels: tuple[int, int]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, QWEN_SPECIAL_TOKENS)
    tokenizer.save_pretrained(str(out))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"))}
    dtype_name = str(dtype).removeprefix("torch.")
    raw = published_config(text, vision, mrope_section, ids, dtype_name)
    state = random_weights(config_from_dict(raw), seed, dtype)
    shards = max(1, -(-sum(t.nbytes for t in state.values()) // MAX_SHARD_BYTES))
    if shards == 1:
        save_file({name: t.contiguous() for name, t in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        write_shards(out, state, shards)
    write_processor_files(out, TINY_IMAGE_PIXELS, video_pixels)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def write_tiny_qwen_checkpoint(out: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (float32) in ``out``; returns the directory."""
    text = dict(TINY_QWEN_TEXT, tie_word_embeddings=tie_word_embeddings)
    return write_checkpoint(out, text, TINY_QWEN_VISION, TINY_QWEN_MROPE_SECTION, seed, torch.float32,
                            TINY_VIDEO_PIXELS)


def write_random_qwen_checkpoint(out: str | Path, config: Qwen2_5_VLConfig, seed: int = 0) -> Path:
    """A full-size Qwen2.5-VL checkpoint with random bfloat16 weights for ``config`` (one of the
    named architectures), with the tiny tokenizer: for measuring speed, never accuracy."""
    text = {key: value for key, value in dataclasses.asdict(config.text).items() if key != "mrope_section"}
    v = config.vision
    vision = {"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
              "num_heads": v.num_heads, "in_chans": v.in_channels, "out_hidden_size": v.out_hidden_size,
              "patch_size": v.patch_size, "spatial_patch_size": v.patch_size,
              "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
              "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
              "tokens_per_second": v.tokens_per_second, "hidden_act": "silu"}
    return write_checkpoint(out, text, vision, list(config.text.mrope_section), seed, torch.bfloat16,
                            (128 * 28 * 28, 768 * 28 * 28))
