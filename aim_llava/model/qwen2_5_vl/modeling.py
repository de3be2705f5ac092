"""Qwen2_5_VLForCausalLM: the windowed vision transformer and patch merger in front of our Qwen2
decoder with multimodal RoPE; checkpoint names ``visual.*``, ``model.*``, ``lm_head``.

Visuals are encoded in temporal groups (:meth:`encode_images`: tower and merger, one [groups,
tokens, H] tensor), reduced by the call's plan group by group (:meth:`video_features`: AIM's
merging, the baselines; each token keeps its grid cell) and placed in the prompt with their
(time, height, width) positions (:meth:`prepare_multimodal_inputs`). Prefill, logits and
generation are the shared :class:`Qwen2MultimodalForCausalLM`'s.

:meth:`Qwen2_5_VLForCausalLM.visual_features_with_origins` also says where each visual token came
from (:mod:`aim_llava.reduction.provenance`). A cell is one square of the merged grid (2 x 2
patches, the finest part of a picture a token can stand for) in one sampled frame; every sampled
frame has its grid (an image, one). Before any reduction a token stands for its cell in each frame
of its temporal group, so both frames of a group show it (a last frame filling its group alone has
its own grid only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from aim_llava.errors import InputError
from aim_llava.model.language_model.llava_qwen import Qwen2MultimodalForCausalLM
from aim_llava.model.language_model.modeling_qwen2 import Qwen2Model
from aim_llava.model.llava_arch import MultimodalInputs, assemble_inputs, prompts_and_visuals
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLConfig
from aim_llava.model.qwen2_5_vl.positions import VisualTokens, rope_positions
from aim_llava.model.qwen2_5_vl.processor import VisualInput
from aim_llava.model.qwen2_5_vl.vision import Qwen2_5_VisionTransformer
from aim_llava.reduction.plan import ReductionPlan
from aim_llava.reduction.provenance import CellGrid, OriginTrace, TokenOrigins
from aim_llava.timing import stage


def check_reduction(plan: ReductionPlan) -> None:
    """Refuse a plan that reduces inside the vision tower (FiCoCo-V), or that merges frames
    without saying which grid cell each token stands for."""
    if type(plan).vision_reducer is not ReductionPlan.vision_reducer:
        raise InputError(f"config {plan.name!r} removes patches inside the vision tower (FiCoCo-V), which Qwen2.5-VL's "
                         "tower cannot take (its attention windows and 2x2 patch merger need every patch of the "
                         "grid): use FiCoCo-L (ficoco_l_25) or AIM's merging after the merger")
    groups_hook = type(plan).reduce_video_groups is ReductionPlan.reduce_video_groups
    if groups_hook and type(plan).reduce_video_frames is not ReductionPlan.reduce_video_frames:
        raise InputError(f"config {plan.name!r} reduces video frames without saying which grid cell each token "
                         "stands for (reduce_video_groups), which Qwen2.5-VL's positions need")


@dataclass
class GroupedFeatures:
    """A visual after the tower and merger: ``features`` [groups, rows x columns, H] in raster
    order of each group's merged grid of (rows, columns)."""

    features: torch.Tensor
    grid: tuple[int, int, int]
    modality: str
    seconds_per_group: float


class Qwen2_5_VLForCausalLM(Qwen2MultimodalForCausalLM):
    def __init__(self, config: Qwen2_5_VLConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, Qwen2Model(config.text, attn_implementation, max_positions=config.max_length))
        self.visual = Qwen2_5_VisionTransformer(config.vision, attn_implementation)

    def plan_for(self, reduction: ReductionPlan | None) -> ReductionPlan:
        """The call's plan (or the default), refused in one line if it cannot apply here."""
        plan = super().plan_for(reduction)
        check_reduction(plan)
        return plan

    def encode_images(self, visuals: VisualInput | list[VisualInput], reduction: ReductionPlan | None = None
                      ) -> GroupedFeatures | list[GroupedFeatures]:
        """Tower and merger over visuals; those with the same grid go through in one batch."""
        self.plan_for(reduction)
        single = isinstance(visuals, VisualInput)
        visuals = [visuals] if single else list(visuals)
        merge = self.config.vision.spatial_merge_size
        dtype = self.model.embed_tokens.weight.dtype
        by_grid: dict[tuple[int, int], list[int]] = {}
        for index, visual in enumerate(visuals):
            by_grid.setdefault(visual.grid, []).append(index)
        encoded: list[GroupedFeatures | None] = [None] * len(visuals)
        with stage("vision", self.device):
            for grid, members in by_grid.items():
                pixels = torch.cat([visuals[i].pixels for i in members]).to(self.device, dtype)
                groups = [visuals[i].groups for i in members]
                tokens = self.visual(pixels, sum(groups), grid).split(groups)
                for index, features in zip(members, tokens):
                    visual = visuals[index]
                    encoded[index] = GroupedFeatures(features, (visual.groups, grid[0] // merge, grid[1] // merge),
                                                     visual.modality, visual.seconds_per_group)
        return encoded[0] if single else encoded

    def video_features(self, grouped: GroupedFeatures, reduction: ReductionPlan | None = None,
                       trace: OriginTrace | None = None) -> VisualTokens:
        """The plan's reduction of each group (a video's ``reduce_video_groups``, an image's
        ``reduce_image_groups``), each token with its grid cell. ``trace``: where the tokens go is
        reported there."""
        plan = self.plan_for(reduction)
        groups, rows, columns = grouped.grid
        with stage("pre_llm", grouped.features.device):
            reduce = plan.reduce_video_groups if grouped.modality == "video" else plan.reduce_image_groups
            if trace is None:
                tokens, cells = reduce(grouped.features, (rows, columns))
            else:
                tokens, cells = reduce(grouped.features, (rows, columns), trace)
                trace.settle(tokens.shape[0] * tokens.shape[1])
            group = torch.arange(groups, device=cells.device)[:, None].expand_as(cells)
            cells = torch.stack([group, cells // columns, cells % columns], dim=-1).flatten(0, 1)
        return VisualTokens(tokens.flatten(0, 1), cells, grouped.grid, grouped.modality, grouped.seconds_per_group)

    def visual_features(self, images, image_sizes=None, modalities=None, reduction: ReductionPlan | None = None
                        ) -> list[VisualTokens]:
        """One :class:`VisualTokens` per :class:`VisualInput` of ``images`` (from the processor)."""
        return self.encode_visuals(images, modalities, reduction, trace=False)[0]

    def visual_features_with_origins(self, images, image_sizes=None, modalities=None,
                                     reduction: ReductionPlan | None = None
                                     ) -> tuple[list[VisualTokens], list[TokenOrigins | None]]:
        """:meth:`visual_features`, and for each entry where its tokens came from (None where the
        reduction does not say): the cells of each sampled frame (see the module's docstring)."""
        return self.encode_visuals(images, modalities, reduction, trace=True)

    def encode_visuals(self, images, modalities, reduction: ReductionPlan | None, trace: bool
                       ) -> tuple[list[VisualTokens], list[TokenOrigins | None]]:
        """The visual features of :meth:`visual_features`, and their origins when ``trace``."""
        images = [images] if isinstance(images, VisualInput) else list(images)
        if not all(isinstance(image, VisualInput) for image in images):
            raise InputError("Qwen2.5-VL takes images and videos preprocessed by its processor (a VisualInput each: "
                             "processor.image(...) or processor.video(...))")
        if modalities is not None and list(modalities) != [image.modality for image in images]:
            raise InputError(f"modalities {list(modalities)} do not match the visuals' "
                             f"{[image.modality for image in images]}")
        plan = self.plan_for(reduction)
        features, origins = [], []
        for visual, grouped in zip(images, self.encode_images(images, plan)):
            tracer = self.origin_trace(visual) if trace else None
            features.append(self.video_features(grouped, plan, tracer))
            origins.append(tracer.origins() if tracer is not None else None)
        return features, origins

    def origin_trace(self, visual: VisualInput) -> OriginTrace:
        """A trace over the merged grid of each sampled frame of ``visual``, its cells already
        handed to the tokens of their temporal group (frame f's cell c: token c of group f // 2)."""
        merge, temporal = self.config.vision.spatial_merge_size, self.config.vision.temporal_patch_size
        rows, columns = visual.grid[0] // merge, visual.grid[1] // merge
        frames = visual.frames if visual.frames is not None else visual.groups * temporal
        kind = "frame" if visual.modality == "video" else "view"
        trace = OriginTrace([CellGrid(frame, rows, columns, kind=kind) for frame in range(frames)])
        per_group = rows * columns
        tokens = torch.arange(frames)[:, None] // temporal * per_group + torch.arange(per_group)
        trace.reassign(tokens, visual.groups * per_group)
        return trace

    def prepare_multimodal_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                  images=None, image_sizes=None, modalities=None,
                                  visual_features: list[VisualTokens] | None = None,
                                  reduction: ReductionPlan | None = None) -> MultimodalInputs:
        """The left-padded batch with every ``IMAGE_TOKEN_INDEX`` replaced, in order, by the next
        visual's tokens, and multimodal positions (see :mod:`aim_llava.model.qwen2_5_vl.positions`).
        ``images``: :class:`VisualInput` s from the processor, or ``visual_features`` already
        encoded. Token ids are read on the host."""
        sequences, features = prompts_and_visuals(self, input_ids, attention_mask, images, image_sizes, modalities,
                                                  visual_features, reduction)
        if not all(isinstance(feature, VisualTokens) for feature in features):
            raise InputError("Qwen2.5-VL's visual features carry their grid cells: pass what visual_features() gives")
        inputs = assemble_inputs(sequences, [feature.embeds for feature in features], self.model.embed_tokens,
                                 self.config.max_length, self.device)
        positions, next_positions = rope_positions(sequences, features, inputs.inputs_embeds.shape[1],
                                                   self.config.vision.tokens_per_second, self.device)
        if max(next_positions) > self.config.max_length:
            raise InputError(f"the prompt's positions reach {max(next_positions)} (a video's time positions grow with "
                             f"its duration), beyond the model's {self.config.max_length}: sample a shorter window")
        return dataclasses.replace(inputs, position_ids=positions, next_position=next_positions)
