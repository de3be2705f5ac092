"""Qwen2.5-VL's preprocessing: images at their native resolution, videos by the checkpoint's
settings, cut into the vision tower's patches.

* Size: ``smart_resize`` gives both sides multiples of 28 (patch 14 x merge 2) keeping the aspect
  ratio, with the pixel count inside [min_pixels, max_pixels]. Images use the image processor's
  bounds (preprocessor_config.json). Video frames use the video bounds (video_preprocessor_config.json,
  else qwen-vl-utils' 128 to 768 tokens a frame) and qwen-vl-utils' per-frame cap: a frame may
  also hold at most an even share of 90% of ``max_video_tokens`` (128000) tokens' pixels,
  ``total / frames x 2``, but never less than 1.05 x min_pixels.
* Resampling: bicubic with antialiasing on the 8-bit frames, as torchvision resizes uint8 frames
  in transformers' processors and qwen-vl-utils (on the CPU the same kernel, so the same pixels; on
  a GPU, which has no 8-bit kernel, the same two passes in float32, the horizontal one first, each
  rounded to 8 bits: within 2 levels of it), then rescaled by 1/255 and normalised with CLIP's
  mean and std.
* Patches: a video's frames in groups of ``temporal_patch_size`` (the last frame repeated to fill
  the last group), an image repeated to one group; each group cut into 14-px patches, ordered 2x2
  block by block: rows [groups x rows x columns, 3 x 2 x 14 x 14], as transformers' processors
  lay them out.
* Time: a video's group spans ``temporal_patch_size / sampled fps`` seconds (the model's time
  positions are that times ``tokens_per_second``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aim_llava.errors import CheckpointError, InputError
from aim_llava.model.image_processor import PREPROCESS_CHUNK_BYTES, PinnedStaging, to_pil
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLVisionConfig
from aim_llava.tensors import host_values
from aim_llava.text_files import parse_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
DEFAULT_FPS = 2.0  # qwen-vl-utils' sampling rate, and its rate for a list of frames


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float) -> tuple[int, int]:
    """(height, width): multiples of ``factor`` near the original, scaled into [min_pixels,
    max_pixels] keeping the aspect ratio (transformers' and qwen-vl-utils' rule)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"an image of {width}x{height} pixels is too elongated for Qwen2.5-VL "
                         f"(aspect ratio above {MAX_ASPECT_RATIO})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class VisualInput:
    """A video or image ready for the vision tower: ``pixels`` [groups x rows x columns, patch
    values], ``groups`` temporal groups of ``grid`` (rows, columns) patches each, and for a video
    the seconds one group spans. ``frames``: how many pictures it was cut from (a video's sampled
    frames, before the last group was filled; 1 for an image; None: every frame of every group)."""

    pixels: torch.Tensor
    groups: int
    grid: tuple[int, int]
    modality: str
    seconds_per_group: float = 0.0
    frames: int | None = None

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(groups, rows, columns): transformers' ``image_grid_thw`` / ``video_grid_thw`` row."""
        return (self.groups, *self.grid)


@dataclass
class ProcessorSettings:
    """The checkpoint's preprocessing settings (transformers' defaults and qwen-vl-utils' video
    rules where its files say nothing)."""

    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    max_video_tokens: int = 128000
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    fps: float = DEFAULT_FPS
    max_frames: int = 768

    @classmethod
    def read(cls, model_dir: Path | None, vision: Qwen2_5_VLVisionConfig) -> ProcessorSettings:
        """From ``preprocessor_config.json`` and ``video_preprocessor_config.json`` (the published
        files), or the ``image_processor`` and ``video_processor`` of ``processor_config.json`` (what
        transformers 5 writes); any may be missing. Patch, temporal patch and merge sizes there
        must be the vision tower's."""
        settings = cls()
        sources = (("preprocessor_config.json", None, "image"), ("video_preprocessor_config.json", None, "video"),
                   ("processor_config.json", "image_processor", "image"),
                   ("processor_config.json", "video_processor", "video"))
        for name, part, prefix in sources:
            path = model_dir / name if model_dir is not None else None
            if path is None or not path.is_file():
                continue
            try:
                values = parse_json(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise CheckpointError(f"{path} is not valid JSON ({err})") from None
            if part is not None and isinstance(values, dict):
                values = values.get(part, {})
            if not isinstance(values, dict):
                raise CheckpointError(f"{path} must hold a JSON object" + (f" with an object {part!r}" if part else ""))
            settings.update(values, prefix, vision, str(path))
        return settings

    def update(self, values: dict, prefix: str, vision: Qwen2_5_VLVisionConfig, source: str) -> None:
        size = values.get("size") if isinstance(values.get("size"), dict) else {}
        bounds = {"min_pixels": values.get("min_pixels", size.get("shortest_edge")),
                  "max_pixels": values.get("max_pixels", size.get("longest_edge"))}
        for key, value in bounds.items():
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise CheckpointError(f"{source}: {key} must be a positive number of pixels, got {value!r}")
                setattr(self, f"{prefix}_{key}", int(value))
        for key, expected in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                              ("merge_size", vision.spatial_merge_size)):
            if values.get(key, expected) != expected:
                raise CheckpointError(f"{source}: {key}={values[key]} but the vision tower's is {expected}")
        for key in ("image_mean", "image_std"):
            if key in values:
                numbers = values[key]
                if not isinstance(numbers, list) or len(numbers) != 3:
                    raise CheckpointError(f"{source}: '{key}' must be a list of three numbers")
                setattr(self, key, tuple(float(v) for v in numbers))
        if prefix == "video":
            for key in ("fps", "max_frames", "max_video_tokens"):
                if values.get(key) is not None:
                    setattr(self, key, values[key])

    def frame_max_pixels(self, frames: int, factor: int) -> int:
        """qwen-vl-utils' cap on a video frame's pixels when ``frames`` frames are sampled."""
        total = self.max_video_tokens * factor * factor * 0.9
        return max(min(self.video_max_pixels, total / max(1, frames) * 2), int(self.video_min_pixels * 1.05))


class Qwen2_5_VLProcessor:
    """Frames and images -> :class:`VisualInput` on the model's device. ``chat_template`` is the
    checkpoint's (None: the built-in Qwen2.5-VL template is used)."""

    def __init__(self, vision: Qwen2_5_VLVisionConfig, settings: ProcessorSettings | None = None,
                 chat_template: str | None = None):
        self.vision = vision
        self.settings = settings or ProcessorSettings()
        self.chat_template = chat_template
        self.image_mean, self.image_std = self.settings.image_mean, self.settings.image_std
        self.staging = PinnedStaging()

    @property
    def image_size(self) -> int:
        """The side of a square frame of the most pixels a video frame may keep (what media read
        under limits are shrunk to, keeping their aspect ratio)."""
        return math.isqrt(self.settings.video_max_pixels)

    def resized_video_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The (height, width) ``frames`` sampled frames of ``height`` x ``width`` are resized to."""
        factor = self.vision.merge_factor
        return smart_resize(height, width, factor, self.settings.video_min_pixels,
                            self.settings.frame_max_pixels(frames, factor))

    def resized_image_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.vision.merge_factor, self.settings.image_min_pixels,
                            self.settings.image_max_pixels)

    def video(self, frames, device: torch.device | str, dtype: torch.dtype = torch.float32,
              sampled_fps: float = 0.0) -> VisualInput:
        """Video frames [T, H, W, 3] uint8 sampled at ``sampled_fps`` frames a second (0: unknown,
        qwen-vl-utils' 2 is assumed) -> their patches."""
        frames = as_frames(frames)
        count, height, width, _ = frames.shape
        size = self.resized_video_size(count, height, width)
        pixels = self.normalised(frames, size, device, dtype)
        seconds = self.vision.temporal_patch_size / (sampled_fps if sampled_fps > 0 else DEFAULT_FPS)
        return self.patches(pixels, "video", seconds)

    def image(self, image, device: torch.device | str, dtype: torch.dtype = torch.float32) -> VisualInput:
        """One image (PIL, or an HxWx3 uint8 array) -> its patches, at its native resolution."""
        frame = as_frames(np.array(to_pil(image))[None])
        size = self.resized_image_size(*frame.shape[1:3])
        return self.patches(self.normalised(frame, size, device, dtype), "image")

    def normalised(self, frames: torch.Tensor, size: tuple[int, int], device, dtype) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> [T, 3, height, width] resized, rescaled and normalised on ``device``,
        a chunk of frames at a time (the float pixels of one chunk at most take
        :data:`PREPROCESS_CHUNK_BYTES`)."""
        device = torch.device(device)
        count, height, width, _ = frames.shape
        out = torch.empty(count, 3, *size, dtype=dtype, device=device)
        mean = host_values(self.image_mean, device, torch.float32).view(1, 3, 1, 1)
        std = host_values(self.image_std, device, torch.float32).view(1, 3, 1, 1)
        per_chunk = max(1, PREPROCESS_CHUNK_BYTES // (max(height * width, size[0] * size[1]) * 3 * 4))
        for start in range(0, count, per_chunk):
            chunk = frames[start : start + per_chunk]
            if device.type == "cuda" and chunk.device.type == "cpu":
                chunk = self.staging.to_device(chunk, device)
            pixels = resize_frames(chunk.to(device).permute(0, 3, 1, 2), size)
            out[start : start + per_chunk] = pixels.div_(255.0).sub_(mean).div_(std)
        return out

    def patches(self, pixels: torch.Tensor, modality: str, seconds: float = 0.0) -> VisualInput:
        """[T, 3, H, W] -> :class:`VisualInput`: groups of ``temporal_patch_size`` frames (an image,
        or a last frame left alone, repeated), each cut into patches 2x2 block by block."""
        v = self.vision
        temporal, patch, merge = v.temporal_patch_size, v.patch_size, v.spatial_merge_size
        frames = pixels.shape[0]
        if pad := -pixels.shape[0] % temporal:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        count, channels, height, width = pixels.shape
        groups, rows, columns = count // temporal, height // patch, width // patch
        blocks = pixels.view(groups, temporal, channels, rows // merge, merge, patch, columns // merge, merge, patch)
        blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = blocks.reshape(groups * rows * columns, channels * temporal * patch * patch)
        return VisualInput(flat, groups, (rows, columns), modality, seconds, frames)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [T, 3, H, W] -> float32 [T, 3, height, width] in 8-bit levels, resized bicubically
    with antialiasing: torch's 8-bit kernel on the CPU (torchvision's), else :func:`two_pass_bicubic`."""
    if tuple(frames.shape[-2:]) == size:
        return frames.to(torch.float32, memory_format=torch.contiguous_format)
    if frames.device.type == "cpu":
        resized = F.interpolate(frames.contiguous(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return resized.to(torch.float32)
    return two_pass_bicubic(frames.to(torch.float32, memory_format=torch.contiguous_format), size)


def two_pass_bicubic(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The 8-bit kernel's two passes in float32 (horizontal, then vertical), each rounded to 8 bits."""
    for target in ((pixels.shape[-2], size[1]), size):
        if tuple(pixels.shape[-2:]) != tuple(target):
            pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.round_().clamp_(0, 255)
    return pixels


def as_frames(frames) -> torch.Tensor:
    """[T, H, W, 3] uint8 frames as a tensor (arrays are wrapped, not copied)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    return frames


def read_chat_template(model_dir: Path | None) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, or the ``chat_template`` of
    ``chat_template.json`` or ``tokenizer_config.json`` (None when it has none)."""
    if model_dir is None:
        return None
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                template = parse_json(path.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError):
                raise CheckpointError(f"{path} is not a JSON object") from None
            if isinstance(template, str):
                return template
    return None
