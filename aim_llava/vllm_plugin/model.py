"""vLLM's LLaVA-OneVision with an aim-llava frame reduction (imported by vLLM when a model with
this architecture is built; see :mod:`aim_llava.vllm_plugin`).

Two overrides: the model reduces each video's pooled frame tokens with the preset's plan (our
merge function, as aim-llava's engine applies it after the 2x2 pooling), and the processing info
counts that many tokens per frame, so vLLM's placeholder expansion, memory profiling and encoder
cache all see the reduced count.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from aim_llava.vllm_plugin import CONFIG_KEY
from aim_llava.vllm_plugin.presets import plan_from_hf_config


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """Counts the tokens a frame keeps after the reduction."""

    def _get_num_frame_tokens(self, *, image_width: int, image_height: int) -> int:
        pooled = super()._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return plan_from_hf_config(self.get_hf_config(), CONFIG_KEY).frame_tokens_after_merging(pooled)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=AimLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AimLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """Reduces each frame's pooled tokens [frames, T, C] -> [frames, K, C] before the LLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        reduction = plan_from_hf_config(vllm_config.model_config.hf_config, CONFIG_KEY)  # refuse before building
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.reduction = reduction

    def _video_pixels_to_features(self, vision_tower, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.reduction.reduce_video_frames(super()._video_pixels_to_features(vision_tower, pixel_values))
