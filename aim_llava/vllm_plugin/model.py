"""vLLM's LLaVA-OneVision with an aim-llava frame reduction (imported by vLLM when a model with
this architecture is built; see :mod:`aim_llava.vllm_plugin`).

The processing info counts the tokens a frame keeps after the reduction, so that vLLM's
placeholders, memory profiling and encoder cache all see the reduced count. The processor reads a
request's own preset (``mm_processor_kwargs={"aim_reduction": NAME}``), counts its tokens, and
hands its index to the model with the video's pixels. The model runs every frame of an encoder
batch through the vision tower at once, then reduces each video on its own with its plan (our
merge function, as aim-llava's engine applies it after the 2x2 pooling), so that what a video
keeps never depends on what vLLM batched with it. Images run as in vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    LlavaOnevisionVideoPixelInputs,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.utils.tensor_schema import TensorShape

from aim_llava.reduction.plan import ReductionPlan
from aim_llava.vllm_plugin import CONFIG_KEY
from aim_llava.vllm_plugin.presets import (
    frame_tokens,
    plan_from_hf_config,
    preset_of_index,
    reduce_frames,
    request_preset_index,
)


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """Counts the tokens a video keeps after the deployment's reduction or a request's."""

    def deployment_plan(self) -> ReductionPlan:
        return plan_from_hf_config(self.get_hf_config(), CONFIG_KEY)

    def request_preset_index(self, mm_kwargs: Mapping[str, object]) -> int:
        """-1 (the deployment's plan) or the index of the preset a request names (presets.py)."""
        size = self.get_image_size_with_most_features()  # LLaVA-OneVision resizes every frame alike
        pooled = self._get_num_frame_tokens(image_width=size.width, image_height=size.height)
        return request_preset_index(mm_kwargs.get(CONFIG_KEY), self.deployment_plan(),
                                    self.get_hf_config().text_config.num_hidden_layers, pooled)

    def request_plan(self, mm_kwargs: Mapping[str, object]) -> ReductionPlan:
        return preset_of_index(self.request_preset_index(mm_kwargs), self.deployment_plan(),
                               self.get_hf_config().text_config.num_hidden_layers)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int,
                             plan: ReductionPlan | None = None) -> int:
        """Frames x the tokens a frame keeps under ``plan`` (default: the deployment's), + the newline."""
        pooled = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return frame_tokens(plan or self.deployment_plan(), pooled) * num_frames + 1


class AimLlavaOnevisionMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    """Passes each video's preset index to the model; makes room for the tokens it keeps."""

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        index = self.info.request_preset_index(hf_kwargs)
        processed = super()._apply_hf_processor_main(
            mm_items, {key: value for key, value in hf_kwargs.items() if key != CONFIG_KEY})
        if "pixel_values_videos" in processed:
            processed[CONFIG_KEY] = torch.full((len(processed["pixel_values_videos"]),), index)
        return processed

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        return {**fields, CONFIG_KEY: MultiModalFieldConfig.batched("video", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        plan = self.info.request_plan(hf_processor_mm_kwargs)
        video_token = self.info.get_hf_config().video_token_index

        def video_tokens(item: int) -> list[int]:
            videos = mm_items.get_items("video", VideoProcessorItems)
            size = videos.get_frame_size(item)
            count = self.info.get_num_video_tokens(image_width=size.width, image_height=size.height,
                                                   num_frames=videos.get_num_frames(item), plan=plan)
            return [video_token] * count

        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [*(update for update in updates if update.modality != "video"),
                PromptReplacement(modality="video", target=[video_token], replacement=video_tokens)]


class AimVideoPixelInputs(LlavaOnevisionVideoPixelInputs):
    """vLLM's video input, with each video's preset index (-1: the deployment's plan)."""

    aim_reduction: Annotated[torch.Tensor, TensorShape("bn")]


@MULTIMODAL_REGISTRY.register_processor(
    AimLlavaOnevisionMultiModalProcessor,
    info=AimLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AimLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """Reduces each video's pooled frame tokens [frames, T, C] -> [frames x K, C] before the LLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        reduction = plan_from_hf_config(vllm_config.model_config.hf_config, CONFIG_KEY)  # refuse before building
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.reduction = reduction

    def _parse_and_validate_video_input(self, **kwargs: object) -> AimVideoPixelInputs | None:
        inputs = super()._parse_and_validate_video_input(**kwargs)
        if inputs is None:
            return None
        size = self.config.vision_config.image_size
        return AimVideoPixelInputs(pixel_values_videos=inputs["pixel_values_videos"], aim_reduction=kwargs[CONFIG_KEY],
                                   resolve_bindings={"h": size, "w": size})

    def _process_video_pixels(self, inputs: AimVideoPixelInputs) -> list[torch.Tensor]:
        """[frames x K + 1, C] per video: the frames of all videos through the vision tower together,
        then each video reduced alone by its plan, then the newline."""
        videos = inputs["pixel_values_videos"]
        frames = videos.flatten(0, 1) if isinstance(videos, torch.Tensor) else torch.cat(videos)
        pooled = self._video_pixels_to_features(self.vision_tower, frames)
        layers = self.config.text_config.num_hidden_layers
        newline = self.image_newline[None]
        return [torch.cat([reduce_frames(preset_of_index(int(index), self.reduction, layers), video), newline])
                for index, video in zip(inputs["aim_reduction"], pooled.split([len(v) for v in videos]))]
