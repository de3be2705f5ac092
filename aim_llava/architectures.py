"""Named architectures of every family (shapes only), for random-weight benchmarks and FLOPs."""

from __future__ import annotations

import dataclasses

from aim_llava.errors import AimLlavaError
from aim_llava.model.config import LlavaConfig, TextConfig, VisionConfig
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig

QWEN2_7B = TextConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
QWEN2_5_VL_MROPE = (16, 24, 24)


def qwen2_5_vl(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool,
               vision_intermediate: int = 3420) -> Qwen2_5_VLConfig:
    """A published Qwen2.5-VL-*-Instruct shape: its LLM and the 32-block vision tower."""
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                      rope_theta=1_000_000.0, max_position_embeddings=128000, tie_word_embeddings=tied,
                      mrope_section=QWEN2_5_VL_MROPE)
    return Qwen2_5_VLConfig(text=text, vision=Qwen2_5_VLVisionConfig(intermediate_size=vision_intermediate,
                                                                      out_hidden_size=hidden), torch_dtype="bfloat16")


ARCHITECTURES: dict[str, LlavaConfig | Qwen2_5_VLConfig] = {
    "llava-onevision-qwen2-0.5b": LlavaConfig(
        text=TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True),
        vision=VisionConfig(),
    ),
    "llava-onevision-qwen2-7b": LlavaConfig(text=QWEN2_7B, vision=VisionConfig()),
    "llava-video-7b": LlavaConfig(text=QWEN2_7B, vision=VisionConfig()),
    "llava-onevision-qwen2-72b": LlavaConfig(
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, max_position_embeddings=32768),
        vision=VisionConfig(),
    ),
    "qwen2.5-vl-3b": qwen2_5_vl(151936, 2048, 11008, 36, 16, 2, tied=True),
    "qwen2.5-vl-7b": qwen2_5_vl(152064, 3584, 18944, 28, 28, 4, tied=False),
    "qwen2.5-vl-72b": qwen2_5_vl(152064, 8192, 29568, 80, 64, 8, tied=False, vision_intermediate=3456),
}


def architecture(name: str) -> LlavaConfig | Qwen2_5_VLConfig:
    if name not in ARCHITECTURES:
        raise AimLlavaError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return dataclasses.replace(ARCHITECTURES[name])

