"""Turning images and videos into LLM input embeddings, and splicing them into the prompt.

Visual features per modality (docs/algorithms.md §1):

* video [F, 3, S, S]: tower + projector per frame, 2x2 bilinear pooling (729 -> 196 tokens a
  frame for so400m), all frames flattened, then ONE ``image_newline`` token.
* image with crops [1 + crops, 3, S, S] (anyres): base view tokens, then the crop grid unpadded
  to the image's aspect ratio, downscaled when larger than ``anyres_max_N`` allows, with an
  ``image_newline`` ending every row.
* single view [1, 3, S, S] (several images in one prompt, "pad" preprocessing): its tokens and
  one ``image_newline``.

:meth:`LlavaMetaForCausalLM.visual_features_with_origins` also says where each visual token came
from (:mod:`aim_llava.reduction.provenance`): a video's cells are each frame's grid of patches; an
image's, its whole view's grid and its crop grid over the padded canvas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.errors import InputError
from aim_llava.mm_utils import get_anyres_image_grid_shape, padded_placement, select_best_resolution
from aim_llava.model.config import LlavaConfig
from aim_llava.reduction.plan import ReductionPlan
from aim_llava.reduction.provenance import CellGrid, OriginTrace, TokenOrigins, strongest_reader
from aim_llava.tensors import host_values, to_device
from aim_llava.timing import stage

MODALITIES = ("image", "video")


@dataclass
class MultimodalInputs:
    """A left-padded batch ready for the decoder.

    inputs_embeds [B, L, H]; valid [B, L] (False on padding); position_ids [B, L], or [B, L, 3]
    (time, height, width) for multimodal RoPE; visual [B, L] marks visual tokens (including
    newline tokens); padded: any padding at all. Host counts per sample: ``num_visual`` visual
    tokens, ``lengths`` real tokens, ``next_position`` the position of the first token after the
    prompt (None: one after the last row's, which is the length of 1-D positions).
    """

    inputs_embeds: torch.Tensor
    valid: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor
    padded: bool
    num_visual: list[int]
    lengths: list[int]
    next_position: list[int] | None = None

    @property
    def extents(self) -> list[int]:
        """Per sample, the position the first generated token takes (host values)."""
        return self.next_position if self.next_position is not None else self.lengths

    def next_positions(self) -> torch.Tensor:
        """[B] on the device: the position the first generated token takes (all axes alike)."""
        if self.next_position is not None:
            return host_values(self.next_position, self.position_ids.device)
        return self.position_ids[:, -1] + 1


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Crop a [C, H, W] feature map back to the aspect ratio of an image of (width, height)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def pool_frames(features: torch.Tensor, grid: int, stride: int) -> torch.Tensor:
    """[F, grid*grid, C] -> [F, ceil(grid/stride)^2, C] by bilinear interpolation."""
    frames, _, channels = features.shape
    maps = features.view(frames, grid, grid, channels).permute(0, 3, 1, 2)
    size = [math.ceil(grid / stride)] * 2
    pooled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return pooled.permute(0, 2, 3, 1).reshape(frames, -1, channels)


def _max_crops(image_aspect_ratio: str) -> int | None:
    match = re.fullmatch(r"anyres_max_(\d+)", image_aspect_ratio)
    return int(match.group(1)) if match else None


def placed_box(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[float, float, float, float]:
    """The canvas that an image of ``size`` (width, height) was resized and centred on, as
    fractions of the image: (left, top, right, bottom)."""
    width, height, left, top = padded_placement(size, canvas)
    return -left / width, -top / height, (canvas[0] - left) / width, (canvas[1] - top) / height


def crops_size(image_size):
    """The (width, height) of an image with crops, which its layout needs."""
    if image_size is None:
        raise InputError("an image with crops needs its size: pass image_sizes=[image.size, ...]")
    return image_size


def with_newlines(rows: int, columns: int) -> torch.Tensor:
    """[rows * columns]: the index of each cell of a feature map once every row ends with a
    newline token."""
    return (torch.arange(rows)[:, None] * (columns + 1) + torch.arange(columns)[None]).flatten()


class LlavaMetaForCausalLM:
    """Mixin: the visual side of ``LlavaQwenForCausalLM``.

    Needs ``self.model``, ``self.config`` and ``self.plan_for(reduction)``, which gives the call's
    reduction plan (whose hooks may merge video frame tokens and image tokens) or the default.
    """

    config: LlavaConfig

    def plan_for(self, reduction: ReductionPlan | None) -> ReductionPlan:
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor, reduction: ReductionPlan | None = None) -> torch.Tensor:
        """[N, 3, S, S] -> projected features [N, patches, H]."""
        return self.encode_views(pixel_values, reduction)[0]

    def encode_views(self, pixel_values: torch.Tensor, reduction: ReductionPlan | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode_images`, and where the tower's reducer put each patch of each view
        ([N, patches] output patch or -1; None when the tower kept every patch)."""
        dtype = self.model.embed_tokens.weight.dtype
        reducer = self.plan_for(reduction).vision_reducer(self.config.vision)
        with stage("vision", self.device):
            features = self.model.vision_tower(to_device(pixel_values, self.device).to(dtype), reducer)
            return self.model.mm_projector(features), reducer.patch_assignment() if reducer is not None else None

    def video_features(self, frame_features: torch.Tensor, reduction: ReductionPlan | None = None,
                       trace: OriginTrace | None = None) -> torch.Tensor:
        """[F, patches, H] -> [F * pooled + 1, H]. Frames whose patch grid a vision-tower reducer
        has thinned out are not pooled (there is no grid left to pool). ``trace``: where the
        tokens go is reported there."""
        with stage("pre_llm", frame_features.device):
            if frame_features.shape[1] == self.config.vision.num_patches:
                grid, stride = self.config.vision.grid_size, self.config.mm_spatial_pool_stride
                pooled = pool_frames(frame_features, grid, stride)
                if trace is not None:
                    cells = strongest_reader(lambda x: pool_frames(x, grid, stride), grid * grid)
                    trace.regroup(cells.expand(frame_features.shape[0], -1), pooled.shape[1])
            else:
                pooled = frame_features
            plan = self.plan_for(reduction)
            if trace is None:
                pooled = plan.reduce_video_frames(pooled)
            else:
                pooled = plan.reduce_video_frames(pooled, trace)
                trace.settle(pooled.shape[0] * pooled.shape[1])
                trace.append(1)
            return torch.cat([pooled.flatten(0, 1), self.model.image_newline[None].to(pooled.dtype)], dim=0)

    def anyres_features(self, view_features: torch.Tensor, image_size, trace: OriginTrace | None = None
                        ) -> torch.Tensor:
        """[1 + crops, patches, H] of one image of (width, height) -> its token sequence.
        ``trace`` (cells: the whole view's grid, then the crop grid) gets where the cells went."""
        grid = self.config.vision.grid_size
        if view_features.shape[1] != grid * grid:
            raise InputError(
                "this reduction removes patches inside the vision tower, which anyres images cannot use: "
                "preprocess images with image_aspect_ratio='pad' (one view each) or pass videos"
            )
        base, crops = view_features[0], view_features[1:]
        across, down = get_anyres_image_grid_shape(
            crops_size(image_size), self.config.image_grid_pinpoints, self.config.vision.image_size
        )
        if across * down != crops.shape[0]:
            raise InputError(
                f"image of size {tuple(image_size)} should have {across * down} crops but has {crops.shape[0]}: "
                "preprocess it with process_images() and pass its size"
            )
        maps = crops.view(down, across, grid, grid, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        cells = unpad_image(torch.arange(maps.shape[1] * maps.shape[2]).view(1, *maps.shape[1:]), image_size)[0]
        maps = unpad_image(maps, image_size)
        max_crops = _max_crops(self.config.image_aspect_ratio)
        channels, height, width = maps.shape
        downscale = None
        if max_crops is not None:
            times = math.sqrt(height * width / (max_crops * grid**2))
            if times > 1.1:
                size = [int(height // times), int(width // times)]

                def downscale(features: torch.Tensor) -> torch.Tensor:
                    return F.interpolate(features[None], size, mode="bilinear")[0]

                maps = downscale(maps)
        newline = self.model.image_newline[:, None, None].expand(channels, maps.shape[1], 1).to(maps.dtype)
        if trace is not None:
            self.trace_crop_grid(trace, base.shape[0], (down * grid, across * grid), cells, downscale, maps.shape[1:])
        maps = torch.cat([maps, newline], dim=-1)
        return torch.cat([base, maps.flatten(1, 2).transpose(0, 1)], dim=0)

    @staticmethod
    def trace_crop_grid(trace: OriginTrace, base_tokens: int, canvas: tuple[int, int], cells: torch.Tensor,
                        downscale, size: tuple[int, int]) -> None:
        """Report the anyres layout: the whole view's tokens stay; each cell of the crop grid
        (``canvas`` rows x columns) that the unpadding kept (``cells``: their canvas indices, as
        the feature map) goes, through the ``downscale`` (None: none) to a map of ``size``, to its
        row of that map, which ends with a newline."""
        height, width = cells.shape
        layout = torch.full((canvas[0] * canvas[1],), -1, dtype=torch.long)
        layout[cells.flatten()] = torch.arange(height * width)
        if downscale is not None:
            reader = strongest_reader(lambda x: downscale(x[..., 0].view(-1, height, width)).flatten(1)[..., None],
                                      height * width)
            layout = torch.where(layout >= 0, reader[layout.clamp(min=0)], -1)
        layout = torch.where(layout >= 0, with_newlines(*size)[layout.clamp(min=0)] + base_tokens, -1)
        trace.reassign(torch.cat([torch.arange(base_tokens), layout]), base_tokens + size[0] * (size[1] + 1))

    def single_view_features(self, view_features: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        if trace is not None:
            trace.append(1)
        return torch.cat([view_features[0], self.model.image_newline[None].to(view_features.dtype)], dim=0)

    def visual_features(self, images, image_sizes=None, modalities=None,
                        reduction: ReductionPlan | None = None) -> list[torch.Tensor]:
        """One [tokens, H] tensor per entry of ``images`` (all views go through the tower at once).

        ``image_sizes[i]`` is the (width, height) of ``images[i]``, as in LLaVA-NeXT.
        """
        return self.encode_visuals(images, image_sizes, modalities, reduction, trace=False)[0]

    def visual_features_with_origins(self, images, image_sizes=None, modalities=None,
                                     reduction: ReductionPlan | None = None
                                     ) -> tuple[list[torch.Tensor], list[TokenOrigins | None]]:
        """:meth:`visual_features`, and for each entry where its tokens came from (None where the
        reduction does not say)."""
        return self.encode_visuals(images, image_sizes, modalities, reduction, trace=True)

    def cell_grids(self, views: int, modality: str, size) -> list[CellGrid]:
        """The cells of one entry: a video's frames, or an image's whole view (squashed to the
        tower's input) and its crop grid over the padded canvas, or its one padded view."""
        grid, side = self.config.vision.grid_size, self.config.vision.image_size
        if modality == "video":
            return [CellGrid(frame, grid, grid) for frame in range(views)]
        if views == 1:
            box = placed_box(size, (max(size),) * 2) if size is not None else (0.0, 0.0, 1.0, 1.0)
            return [CellGrid(0, grid, grid, box, "view")]
        canvas = select_best_resolution(tuple(crops_size(size)), self.config.image_grid_pinpoints)
        crops = CellGrid(0, canvas[1] // side * grid, canvas[0] // side * grid, placed_box(size, canvas), "crops")
        return [CellGrid(0, grid, grid, (0.0, 0.0, 1.0, 1.0), "view"), crops]

    def encode_visuals(self, images, image_sizes, modalities, reduction: ReductionPlan | None, trace: bool
                       ) -> tuple[list[torch.Tensor], list[TokenOrigins | None]]:
        """The visual features of :meth:`visual_features`, and their origins when ``trace``."""
        plan = self.plan_for(reduction)
        images = normalize_images(images)
        modalities = list(modalities) if modalities is not None else ["image"] * len(images)
        if len(modalities) != len(images):
            raise InputError(f"{len(images)} images/videos but {len(modalities)} modalities")
        for modality in modalities:
            if modality not in MODALITIES:
                raise InputError(f"unknown modality {modality!r}; use 'image' or 'video'")
        counts = [image.shape[0] for image in images]
        encoded, moved = self.encode_views(torch.cat(images, dim=0), plan)
        encoded = encoded.split(counts, dim=0)
        moved = moved.split(counts, dim=0) if moved is not None and trace else [None] * len(images)
        sizes = list(image_sizes) if image_sizes is not None else []
        features, origins = [], []
        for index, (views, modality, patches) in enumerate(zip(encoded, modalities, moved)):
            size = sizes[index] if index < len(sizes) else None
            tracer = OriginTrace(self.cell_grids(views.shape[0], modality, size)) if trace else None
            if tracer is not None and patches is not None:
                tracer.regroup(patches, views.shape[1])
            if modality == "video":
                features.append(self.video_features(views, plan, tracer))
            else:
                tokens = self.anyres_features(views, size, tracer) if views.shape[0] > 1 else \
                    self.single_view_features(views, tracer)
                if tracer is None:
                    features.append(plan.reduce_image_tokens(tokens))
                else:
                    features.append(plan.reduce_image_tokens(tokens, tracer))
                    tracer.settle(features[-1].shape[0])
            origins.append(tracer.origins() if tracer is not None else None)
        return features, origins

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images=None,
        image_sizes=None,
        modalities=None,
        visual_features: list[torch.Tensor] | None = None,
        reduction: ReductionPlan | None = None,
    ) -> MultimodalInputs:
        """Replace every ``IMAGE_TOKEN_INDEX`` by the next image's or video's features.

        ``images`` are taken in order across the batch, one per placeholder; or pass
        ``visual_features`` already computed by :meth:`visual_features` (to encode a video once
        for several prompts). Returns a left-padded batch with explicit position ids and a
        visual-token mask. The token ids are read on the host (pass them as the tokenizer gives
        them, on the CPU): the layout is planned there and only the embeddings are assembled on the
        device, without reading anything back from it.
        """
        sequences, features = prompts_and_visuals(self, input_ids, attention_mask, images, image_sizes, modalities,
                                                  visual_features, reduction)
        return assemble_inputs(sequences, features, self.model.embed_tokens, self.config.max_length, self.device)


def prompts_and_visuals(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images, image_sizes,
                        modalities, visual_features: list | None, reduction: ReductionPlan | None
                        ) -> tuple[list[list[int]], list]:
    """The prompts' real token ids (host lists, padding left out) and one visual per placeholder:
    ``visual_features`` as given, or ``model.visual_features`` of ``images``; a count that does not
    match the placeholders is an InputError."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    rows = input_ids.tolist()
    keep = attention_mask.tolist() if attention_mask is not None else [[1] * len(row) for row in rows]
    sequences = [[token for token, flag in zip(row, flags) if flag] for row, flags in zip(rows, keep)]
    n_placeholders = sum(sequence.count(IMAGE_TOKEN_INDEX) for sequence in sequences)
    if visual_features is not None:
        features = list(visual_features)
    else:
        features = model.visual_features(images, image_sizes, modalities, reduction) if images is not None else []
    if n_placeholders != len(features):
        raise InputError(
            f"the prompt has {n_placeholders} <image> placeholders but {len(features)} images/videos were given"
        )
    return sequences, features


def assemble_inputs(sequences: list[list[int]], features: list[torch.Tensor], embed: nn.Embedding,
                    max_length: int, device: torch.device) -> MultimodalInputs:
    """The left-padded batch of token sequences with every placeholder replaced, in order, by the
    next visual features. The layout is planned on the host; the device gets one embedding lookup
    of all text tokens, one copy per visual block and the masks."""
    counts = [feature.shape[0] for feature in features]
    lengths, num_visual, cursor = [], [], 0
    for sequence in sequences:
        placeholders = sequence.count(IMAGE_TOKEN_INDEX)
        visual = sum(counts[cursor : cursor + placeholders])
        cursor += placeholders
        lengths.append(len(sequence) - placeholders + visual)
        num_visual.append(visual)
    longest = max(lengths)
    if longest > max_length:
        raise InputError(
            f"the prompt is {longest} tokens long after inserting visual tokens, more than the model's "
            f"{max_length}: use fewer frames or a shorter prompt"
        )
    batch = len(sequences)
    text_ids, text_slots, visual_slots = [], [], []
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    visual = torch.zeros(batch, longest, dtype=torch.bool)
    feature_index = 0
    for b, sequence in enumerate(sequences):
        position = longest - lengths[b]
        valid[b, position:] = True
        for token in sequence:
            if token == IMAGE_TOKEN_INDEX:
                size = counts[feature_index]
                visual_slots.append((feature_index, b * longest + position))
                visual[b, position : position + size] = True
                position += size
                feature_index += 1
            else:
                text_ids.append(token)
                text_slots.append(b * longest + position)
                position += 1
    dtype = embed.weight.dtype
    embeds = torch.zeros(batch * longest, embed.weight.shape[1], device=device, dtype=dtype)
    if text_ids:
        ids = to_device(torch.tensor(text_ids, dtype=torch.long), device)
        embeds.index_copy_(0, to_device(torch.tensor(text_slots, dtype=torch.long), device), embed(ids))
    for index, start in visual_slots:
        embeds[start : start + counts[index]] = features[index].to(dtype)
    position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return MultimodalInputs(
        embeds.view(batch, longest, -1), to_device(valid, device), to_device(position_ids, device),
        to_device(visual, device), any(length != longest for length in lengths), num_visual, lengths,
    )


def normalize_images(images) -> list[torch.Tensor]:
    """Accept LLaVA-NeXT's forms: a list of [views, 3, S, S] / [3, S, S] tensors, or a 4-D/5-D tensor."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 5:
            images = list(images)
        elif images.dim() == 4:
            images = [image[None] for image in images]
        else:
            raise InputError(f"images tensor must be 4-D or 5-D, got shape {tuple(images.shape)}")
    result = []
    for image in images:
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
            raise InputError("each image/video must be a [views, 3, H, W] or [3, H, W] tensor (see process_images)")
        result.append(image[None] if image.dim() == 3 else image)
    return result
