"""Turning images and videos into LLM input embeddings, and splicing them into the prompt.

Visual features per modality (docs/algorithms.md §1):

* video [F, 3, S, S]: tower + projector per frame, 2x2 bilinear pooling (729 -> 196 tokens a
  frame for so400m), all frames flattened, then ONE ``image_newline`` token.
* image with crops [1 + crops, 3, S, S] (anyres): base view tokens, then the crop grid unpadded
  to the image's aspect ratio, downscaled when larger than ``anyres_max_N`` allows, with an
  ``image_newline`` ending every row.
* single view [1, 3, S, S] (several images in one prompt, "pad" preprocessing): its tokens and
  one ``image_newline``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.errors import InputError
from aim_llava.mm_utils import get_anyres_image_grid_shape
from aim_llava.model.config import LlavaConfig
from aim_llava.reduction.plan import ReductionPlan

MODALITIES = ("image", "video")


@dataclass
class MultimodalInputs:
    """A left-padded batch ready for the decoder.

    inputs_embeds [B, L, H]; valid [B, L] (False on padding); position_ids [B, L];
    visual [B, L] marks visual tokens (including newline tokens); padded: any padding at all.
    """

    inputs_embeds: torch.Tensor
    valid: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor
    padded: bool


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
        dtype = self.model.embed_tokens.weight.dtype
        reducer = self.plan_for(reduction).vision_reducer(self.config.vision)
        features = self.model.vision_tower(pixel_values.to(self.device, dtype), reducer)
        return self.model.mm_projector(features)

    def video_features(self, frame_features: torch.Tensor, reduction: ReductionPlan | None = None) -> torch.Tensor:
        """[F, patches, H] -> [F * pooled + 1, H]. Frames whose patch grid a vision-tower reducer
        has thinned out are not pooled (there is no grid left to pool)."""
        if frame_features.shape[1] == self.config.vision.num_patches:
            pooled = pool_frames(frame_features, self.config.vision.grid_size, self.config.mm_spatial_pool_stride)
        else:
            pooled = frame_features
        pooled = self.plan_for(reduction).reduce_video_frames(pooled)
        return torch.cat([pooled.flatten(0, 1), self.model.image_newline[None].to(pooled.dtype)], dim=0)

    def anyres_features(self, view_features: torch.Tensor, image_size) -> torch.Tensor:
        """[1 + crops, patches, H] of one image of (width, height) -> its token sequence."""
        grid = self.config.vision.grid_size
        if view_features.shape[1] != grid * grid:
            raise InputError(
                "this reduction removes patches inside the vision tower, which anyres images cannot use: "
                "preprocess images with image_aspect_ratio='pad' (one view each) or pass videos"
            )
        base, crops = view_features[0], view_features[1:]
        if image_size is None:
            raise InputError("an image with crops needs its size: pass image_sizes=[image.size, ...]")
        across, down = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision.image_size
        )
        if across * down != crops.shape[0]:
            raise InputError(
                f"image of size {tuple(image_size)} should have {across * down} crops but has {crops.shape[0]}: "
                "preprocess it with process_images() and pass its size"
            )
        maps = crops.view(down, across, grid, grid, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        maps = unpad_image(maps, image_size)
        max_crops = _max_crops(self.config.image_aspect_ratio)
        channels, height, width = maps.shape
        if max_crops is not None:
            times = math.sqrt(height * width / (max_crops * grid**2))
            if times > 1.1:
                maps = F.interpolate(maps[None], [int(height // times), int(width // times)], mode="bilinear")[0]
        newline = self.model.image_newline[:, None, None].expand(channels, maps.shape[1], 1).to(maps.dtype)
        maps = torch.cat([maps, newline], dim=-1)
        return torch.cat([base, maps.flatten(1, 2).transpose(0, 1)], dim=0)

    def single_view_features(self, view_features: torch.Tensor) -> torch.Tensor:
        return torch.cat([view_features[0], self.model.image_newline[None].to(view_features.dtype)], dim=0)

    def visual_features(self, images, image_sizes=None, modalities=None,
                        reduction: ReductionPlan | None = None) -> list[torch.Tensor]:
        """One [tokens, H] tensor per entry of ``images`` (all views go through the tower at once).

        ``image_sizes[i]`` is the (width, height) of ``images[i]``, as in LLaVA-NeXT.
        """
        plan = self.plan_for(reduction)
        images = normalize_images(images)
        modalities = list(modalities) if modalities is not None else ["image"] * len(images)
        if len(modalities) != len(images):
            raise InputError(f"{len(images)} images/videos but {len(modalities)} modalities")
        for modality in modalities:
            if modality not in MODALITIES:
                raise InputError(f"unknown modality {modality!r}; use 'image' or 'video'")
        counts = [image.shape[0] for image in images]
        encoded = self.encode_images(torch.cat(images, dim=0), plan).split(counts, dim=0)
        sizes = list(image_sizes) if image_sizes is not None else []
        features = []
        for index, (views, modality) in enumerate(zip(encoded, modalities)):
            if modality == "video":
                features.append(self.video_features(views, plan))
            elif views.shape[0] > 1:
                size = sizes[index] if index < len(sizes) else None
                features.append(plan.reduce_image_tokens(self.anyres_features(views, size)))
            else:
                features.append(plan.reduce_image_tokens(self.single_view_features(views)))
        return features

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
        visual-token mask.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.to(self.device, torch.bool)
        n_placeholders = int((input_ids[attention_mask] == IMAGE_TOKEN_INDEX).sum())
        if visual_features is not None:
            features = list(visual_features)
        else:
            features = self.visual_features(images, image_sizes, modalities, reduction) if images is not None else []
        if n_placeholders != len(features):
            raise InputError(
                f"the prompt has {n_placeholders} <image> placeholders but {len(features)} images/videos were given"
            )
        embed = self.model.embed_tokens
        feature_iter = iter(features)
        sequences, visual_flags = [], []
        for ids, keep in zip(input_ids, attention_mask):
            ids = ids[keep]
            positions = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, flags, start = [], [], 0
            for pos in positions + [len(ids)]:
                text = ids[start:pos]
                pieces.append(embed(text))
                flags.append(torch.zeros(len(text), dtype=torch.bool, device=self.device))
                if pos < len(ids):
                    feature = next(feature_iter).to(embed.weight.dtype)
                    pieces.append(feature)
                    flags.append(torch.ones(feature.shape[0], dtype=torch.bool, device=self.device))
                start = pos + 1
            sequences.append(torch.cat(pieces, dim=0))
            visual_flags.append(torch.cat(flags))
        return left_pad(sequences, visual_flags, self.config.max_length)


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


def left_pad(sequences: list[torch.Tensor], visual_flags: list[torch.Tensor], max_length: int) -> MultimodalInputs:
    longest = max(seq.shape[0] for seq in sequences)
    if longest > max_length:
        raise InputError(
            f"the prompt is {longest} tokens long after inserting visual tokens, more than the model's "
            f"{max_length}: use fewer frames or a shorter prompt"
        )
    batch, hidden = len(sequences), sequences[0].shape[1]
    device, dtype = sequences[0].device, sequences[0].dtype
    embeds = torch.zeros(batch, longest, hidden, device=device, dtype=dtype)
    valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    visual = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for i, (seq, flags) in enumerate(zip(sequences, visual_flags)):
        n = seq.shape[0]
        embeds[i, longest - n :] = seq
        valid[i, longest - n :] = True
        visual[i, longest - n :] = flags
    position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    padded = any(seq.shape[0] != longest for seq in sequences)
    return MultimodalInputs(embeds, valid, position_ids, visual, padded)
