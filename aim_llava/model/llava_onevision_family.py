"""The LLaVA-OneVision / LLaVA-Video family: SigLIP, ``mlp2x_gelu`` projector, our Qwen2 decoder.

Its modules are where they have always been (:mod:`aim_llava.model.config`,
:mod:`~aim_llava.model.checkpoint`, :mod:`~aim_llava.model.language_model.llava_qwen`,
:mod:`~aim_llava.model.llava_arch`, :mod:`~aim_llava.model.image_processor`,
:mod:`aim_llava.conversation`); this object is how the rest of the package reaches them.
A video is one group of pooled tokens per frame followed by one newline token; positions are 1-D.
"""

from __future__ import annotations

import math
from pathlib import Path

from aim_llava.constants import DEFAULT_IMAGE_TOKEN
from aim_llava.conversation import get_conversation
from aim_llava.cost import projector_flops, vision_flops
from aim_llava.model.checkpoint import is_tolerated, map_name
from aim_llava.model.config import LlavaConfig, config_from_dict
from aim_llava.model.families import LoadingRules, ModelFamily
from aim_llava.model.image_processor import SiglipImageProcessor


class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    title = "LLaVA-OneVision / LLaVA-Video"
    model_types = ("llava", "llava_qwen", "llava_onevision")
    layouts = ("LLaVA-NeXT (`lmms-lab/llava-onevision-qwen2-*-ov`, `lmms-lab/LLaVA-Video-7B-Qwen2`): flat "
               "config.json, model_type `llava`/`llava_qwen`",
               "transformers (`llava-hf/llava-onevision-qwen2-*-ov-hf`): model_type `llava_onevision`")

    def read_config(self, raw: dict, source: str) -> LlavaConfig:
        return config_from_dict(raw, source)

    def build_model(self, config: LlavaConfig, attn_implementation: str):
        from aim_llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

        return LlavaQwenForCausalLM(config, attn_implementation)

    def loading_rules(self, config: LlavaConfig) -> LoadingRules:
        layers = config.vision.num_hidden_layers
        return LoadingRules(lambda name: map_name(name, config.layout), lambda name: is_tolerated(name, layers),
                            frozenset({"lm_head.weight"}) if config.text.tie_word_embeddings else frozenset())

    def image_processor(self, config: LlavaConfig, model_dir: Path | None = None) -> SiglipImageProcessor:
        return SiglipImageProcessor.from_vision_config(config.vision)

    def preprocessing_key(self, processor: SiglipImageProcessor, config: LlavaConfig) -> tuple:
        return (type(processor).__name__, getattr(processor, "image_size", None),
                tuple(getattr(processor, "image_mean", ())), tuple(getattr(processor, "image_std", ())),
                config.image_aspect_ratio, str(config.image_grid_pinpoints), config.mm_spatial_pool_stride)

    def preprocess(self, clip, processor: SiglipImageProcessor, model):
        """Images: anyres views on the host (their size goes with them); video frames: resized and
        normalised on the model's device."""
        if clip.is_image:
            from aim_llava.mm_utils import process_images

            pixels = process_images(list(clip.frames), processor, model.config)[0]
            return pixels, (clip.frames.shape[2], clip.frames.shape[1]), "image"
        return processor.preprocess_frames(clip.frames, model.device, model.dtype), None, "video"

    def check_template(self, name: str) -> None:
        get_conversation(name)

    def prompt(self, turns, modality, system, template, tokenizer, processor=None) -> str:
        """The conversation template's prompt (``qwen_1_5`` for these checkpoints)."""
        conv = get_conversation(template)
        if system is not None:
            conv.system = system
        for index, (question, answer) in enumerate(turns):
            visual_first = index == 0 and modality is not None  # no marker in a text-only conversation
            conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}" if visual_first else question)
            conv.append_message(conv.roles[1], answer)
        return conv.get_prompt()

    def frame_limit(self, config: LlavaConfig, plan) -> int:
        per_frame = self.video_token_counts(config, plan, 1, 0)[0] - 1  # less the newline token
        return max(1, (config.max_length - 1) // max(1, per_frame))

    def video_token_counts(self, config: LlavaConfig, plan, frames: int, text_tokens: int):
        """Each frame pooled (unless the tower thinned its patches) and merged, then one newline."""
        patches = plan.vision_tokens_after(config.vision)
        if patches == config.vision.num_patches:  # the grid is intact, so frames are pooled
            patches = math.ceil(config.vision.grid_size / config.mm_spatial_pool_stride) ** 2
        visual = frames * plan.frame_tokens_after_merging(patches) + 1
        leaving = [plan.visual_tokens_leaving(layer, visual) + text_tokens
                   for layer in range(config.text.num_hidden_layers)]
        return visual, [visual + text_tokens] + leaving[:-1], leaving

    def vision_flops(self, config: LlavaConfig, plan, frames: int) -> float:
        return vision_flops(config.vision, frames, plan.vision_tokens_per_layer(config.vision))

    def projector_flops(self, config: LlavaConfig, frames: int) -> float:
        return projector_flops(config, frames)


FAMILY = LlavaOnevisionFamily()
