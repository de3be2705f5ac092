"""Named LLaVA-OneVision architectures (shapes only), for random-weight benchmarks and FLOPs."""

from __future__ import annotations

import dataclasses

from aim_llava.errors import AimLlavaError
from aim_llava.model.config import LlavaConfig, TextConfig, VisionConfig

QWEN2_7B = TextConfig(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
ARCHITECTURES: dict[str, LlavaConfig] = {
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
}


def architecture(name: str) -> LlavaConfig:
    if name not in ARCHITECTURES:
        raise AimLlavaError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return dataclasses.replace(ARCHITECTURES[name])

