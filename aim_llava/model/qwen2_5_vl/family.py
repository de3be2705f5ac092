"""The Qwen2.5-VL family object (:mod:`aim_llava.model.families`): config, modules, checkpoint
names, processor, frame sampling, prompts and FLOPs shapes."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from aim_llava.errors import InputError
from aim_llava.model.checkpoint import DERIVED_BUFFERS
from aim_llava.model.families import LoadingRules, ModelFamily
from aim_llava.model.qwen2_5_vl.chat import render_prompt
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig, config_from_dict
from aim_llava.model.qwen2_5_vl.processor import ProcessorSettings, Qwen2_5_VLProcessor, read_chat_template

# transformers 5 (and late 4.x) names -> the published ones, which the model's modules have
TRANSFORMERS_NAMES = [(re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model.")]
VISION_BUFFERS = re.compile(r"^visual\.rotary_pos_emb\.inv_freq$")
FLOPS_FRAME_SIZE = 448  # the video frames FLOPs and budgets are counted for (448 x 448, the bench's)
DEFAULT_TEMPLATE = "qwen_1_5"  # the command line's --template default: taken to mean "the model's own"


def rename(name: str) -> str:
    for pattern, replacement in TRANSFORMERS_NAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def window_lengths(rows: int, columns: int, window: int, merge: int) -> list[int]:
    """Patches in each attention window of a group of rows x columns merged tokens."""
    return [min(window, rows - top) * min(window, columns - left) * merge * merge
            for top in range(0, rows, window) for left in range(0, columns, window)]


class Qwen2_5_VLFamily(ModelFamily):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    layouts = ("transformers (`Qwen/Qwen2.5-VL-3B-Instruct`, `-7B-`, `-32B-`, `-72B-Instruct`): model_type "
               "`qwen2_5_vl`, tensors `visual.*`, `model.layers.*`, `lm_head` as published, or "
               "`model.visual.*`, `model.language_model.*` as transformers 5 saves them",)
    bench_frame_size = (FLOPS_FRAME_SIZE, FLOPS_FRAME_SIZE)
    native_resolution = True

    def read_config(self, raw: dict, source: str) -> Qwen2_5_VLConfig:
        return config_from_dict(raw, source)

    def build_model(self, config: Qwen2_5_VLConfig, attn_implementation: str):
        from aim_llava.model.qwen2_5_vl.modeling import Qwen2_5_VLForCausalLM

        return Qwen2_5_VLForCausalLM(config, attn_implementation)

    def loading_rules(self, config: Qwen2_5_VLConfig) -> LoadingRules:
        return LoadingRules(rename, lambda name: bool(DERIVED_BUFFERS.search(name) or VISION_BUFFERS.match(name)),
                            frozenset({"lm_head.weight"}) if config.text.tie_word_embeddings else frozenset())

    def image_processor(self, config: Qwen2_5_VLConfig, model_dir: Path | None = None) -> Qwen2_5_VLProcessor:
        return Qwen2_5_VLProcessor(config.vision, ProcessorSettings.read(model_dir, config.vision),
                                   read_chat_template(model_dir))

    def default_sampling(self, processor: Qwen2_5_VLProcessor) -> dict:
        """Qwen's rule: ``fps`` frames a second (2), at most ``max_frames`` (768), at least 4."""
        return {"fps": float(processor.settings.fps), "max_frames": int(processor.settings.max_frames),
                "frame_rule": "qwen"}

    def sampling(self, options: dict) -> dict:
        return {**options, "frame_rule": "qwen"}

    def check_template(self, name: str) -> None:
        if name != DEFAULT_TEMPLATE:
            raise InputError(f"conversation template {name!r}: Qwen2.5-VL prompts follow the checkpoint's own chat "
                             "template (templates apply to LLaVA-OneVision)")

    def preprocessing_key(self, processor: Qwen2_5_VLProcessor, config: Qwen2_5_VLConfig) -> tuple:
        return (type(processor).__name__, dataclasses.astuple(processor.settings), processor.image_mean,
                processor.image_std, config.vision.merge_factor, config.vision.temporal_patch_size)

    def preprocess(self, clip, processor: Qwen2_5_VLProcessor, model):
        if clip.is_image:
            return processor.image(clip.frames[0], model.device, model.dtype), None, "image"
        return processor.video(clip.frames, model.device, model.dtype, clip.sampled_fps), None, "video"

    def prompt(self, turns, modality, system, template, tokenizer, processor=None) -> str:
        return render_prompt(turns, modality, system, tokenizer, getattr(processor, "chat_template", None))

    def check_reduction(self, plan) -> None:
        from aim_llava.model.qwen2_5_vl.modeling import check_reduction

        check_reduction(plan)

    def frame_limit(self, config: Qwen2_5_VLConfig, plan) -> int:
        """At the fewest tokens a group can have (qwen-vl-utils' 128 a frame's pixels)."""
        per_group = plan.frame_tokens_after_merging(ProcessorSettings().video_min_pixels // config.vision.merge_factor**2)
        return max(1, (config.max_length - 1) // max(1, per_group)) * config.vision.temporal_patch_size

    def group_grid(self, vision: Qwen2_5_VLVisionConfig, frames: int) -> tuple[int, int]:
        """(groups, merged tokens per side) of ``frames`` frames of FLOPS_FRAME_SIZE pixels."""
        return math.ceil(frames / vision.temporal_patch_size), FLOPS_FRAME_SIZE // vision.merge_factor

    def video_token_counts(self, config: Qwen2_5_VLConfig, plan, frames: int, text_tokens: int):
        """Frames of 448 x 448 (16 x 16 = 256 tokens a group of 2 frames), merged per group."""
        groups, side = self.group_grid(config.vision, frames)
        visual = groups * plan.frame_tokens_after_merging(side * side)
        leaving = [plan.visual_tokens_leaving(layer, visual) + text_tokens
                   for layer in range(config.text.num_hidden_layers)]
        return visual, [visual + text_tokens] + leaving[:-1], leaving

    def vision_flops(self, config: Qwen2_5_VLConfig, plan, frames: int) -> float:
        """Patch embedding and every block (window or full attention) over 448 x 448 frames."""
        v = config.vision
        groups, side = self.group_grid(v, frames)
        patches = side * side * v.spatial_merge_size**2
        c = v.hidden_size
        embed = 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size**2 * c
        linear = 2 * patches * (4 * c * c + 3 * c * v.intermediate_size)
        windows = window_lengths(side, side, v.window_tokens, v.spatial_merge_size)
        attention = {"full": 4 * patches * patches * c, "window": sum(4 * n * n * c for n in windows)}
        blocks = sum(linear + attention["full" if b in v.fullatt_block_indexes else "window"] for b in range(v.depth))
        return float(groups * (embed + blocks))

    def projector_flops(self, config: Qwen2_5_VLConfig, frames: int) -> float:
        """The patch merger (its two linear maps) over 448 x 448 frames."""
        v = config.vision
        groups, side = self.group_grid(v, frames)
        width = v.hidden_size * v.spatial_merge_size**2
        return float(groups * 2 * side * side * (width * width + width * v.out_hidden_size))


FAMILY = Qwen2_5_VLFamily()
