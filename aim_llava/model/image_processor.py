"""SigLIP preprocessing: resize to a square with bicubic resampling, rescale, normalise (with PIL on
the host, or batched on the model's device for video frames)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from aim_llava.errors import InputError
from aim_llava.model.config import VisionConfig
from aim_llava.tensors import host_values, page_locked

# Pillow 13 resizes first along the axis that shrinks more; earlier releases always resize the width first
PIL_SHRINKS_FIRST = int(PIL.__version__.split(".")[0]) >= 13
PREPROCESS_CHUNK_BYTES = 256 * 2**20  # float32 pixels of the frames resized together on the device
STAGING_BYTES = 32 * 2**20  # each half of the pinned buffer that frames reach the GPU through


def to_pil(image) -> Image.Image:
    """Accept a PIL image, an HxWx3 uint8 array or tensor; return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image.astype(np.uint8), "RGB")
    raise InputError(f"cannot use {type(image).__name__} as an image: pass PIL images or HxWx3 uint8 arrays")


class PinnedStaging:
    """Host -> GPU copies through one fixed pinned buffer (two halves, filled in turn), so that
    frames of any size and number take a constant amount of page-locked memory: pinning each
    input instead would keep a power-of-two-rounded block of its size for the process's life (2 GB
    after one 192-frame 1080p clip). A half is refilled once its previous copy has left (an event
    on the device's stream), while the other half's copy runs."""

    def __init__(self, nbytes: int = STAGING_BYTES):
        self.nbytes = nbytes
        self.halves: list[torch.Tensor] = []
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.lock = threading.Lock()

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A copy of the CPU tensor ``host`` on the GPU ``device``, queued without waiting for the
        device (except for a half's previous copy, on inputs larger than the buffer)."""
        result = torch.empty(host.shape, dtype=host.dtype, device=device)
        source, target = host.contiguous().view(-1).view(torch.uint8), result.view(-1).view(torch.uint8)
        with self.lock:
            if not self.halves:
                self.halves = [page_locked(torch.empty(self.nbytes, dtype=torch.uint8)) for _ in range(2)]
            for start in range(0, source.numel(), self.nbytes):
                piece = source[start : start + self.nbytes]
                half, self.turn = self.turn, 1 - self.turn
                if self.copied[half] is not None:
                    self.copied[half].synchronize()
                staged = self.halves[half][: piece.numel()]
                staged.copy_(piece)
                target[start : start + piece.numel()].copy_(staged, non_blocking=True)
                self.copied[half] = torch.cuda.Event()
                self.copied[half].record(torch.cuda.current_stream(device))
        return result


class SiglipImageProcessor:
    """Callable like the transformers processors the LLaVA-NeXT code uses.

    ``preprocess(images, return_tensors="pt")["pixel_values"]`` gives [N, 3, S, S] float32.
    """

    def __init__(self, image_size: int = 384, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size = {"height": image_size, "width": image_size}
        self.crop_size = {"height": image_size, "width": image_size}
        self.staging = PinnedStaging()

    @classmethod
    def from_vision_config(cls, config: VisionConfig) -> SiglipImageProcessor:
        return cls(config.image_size, config.image_mean, config.image_std)

    def to_pixels(self, image) -> torch.Tensor:
        """One image -> [3, S, S] normalised."""
        resized = to_pil(image).resize((self.image_size, self.image_size), Image.BICUBIC)
        array = np.asarray(resized, dtype=np.float32) * (1.0 / 255.0)
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def preprocess(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise InputError("only return_tensors='pt' is supported")
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, Sequence):
            images = [images]
        if len(images) == 0:
            raise InputError("no images to preprocess")
        return {"pixel_values": torch.stack([self.to_pixels(image) for image in images])}

    __call__ = preprocess

    def preprocess_frames(self, frames, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Video frames [T, H, W, 3] uint8 (array or tensor) -> pixels [T, 3, S, S] on ``device``.

        The frames travel once, as uint8 (from the host through :class:`PinnedStaging`), and are
        resized there in batched calls the way PIL resizes a uint8 image: two separable bicubic
        passes with PIL's kernel (antialiased, a = -0.5), in the installed Pillow's order (the
        one that shrinks more first from Pillow 13 on, the width first before it), each rounded
        to 8 bits. Against :meth:`preprocess` (PIL) every pixel is within 2/255 before
        normalisation (0.016 after it, std 0.5), and on average within 0.2/255
        (tests/test_preprocessing.py). Frames are resized in chunks of at most
        :data:`PREPROCESS_CHUNK_BYTES` of float32 pixels (at least one frame), converted to
        channels-first contiguously: the memory used beyond the result is one chunk's, whatever
        the number of frames (192 frames of 1080p once took 12.7 GB).
        """
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise InputError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
        device = torch.device(device)
        count, height, width, _ = frames.shape
        out = torch.empty(count, 3, self.image_size, self.image_size, dtype=dtype, device=device)
        mean = host_values(self.image_mean, device, torch.float32).view(1, 3, 1, 1)
        std = host_values(self.image_std, device, torch.float32).view(1, 3, 1, 1)
        per_chunk = max(1, PREPROCESS_CHUNK_BYTES // (height * width * 3 * 4))
        for start in range(0, count, per_chunk):
            chunk = frames[start : start + per_chunk]
            if device.type == "cuda" and chunk.device.type == "cpu":
                chunk = self.staging.to_device(chunk, device)
            out[start : start + per_chunk] = self.resize(chunk.to(device)).div_(255.0).sub_(mean).div_(std)
        return out

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [t, H, W, 3] -> float32 [t, 3, S, S] in 8-bit levels (see
        :meth:`preprocess_frames`)."""
        pixels = frames.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        size = self.image_size
        height, width = pixels.shape[-2:]
        width_first = size / height >= size / width or not PIL_SHRINKS_FIRST
        passes = [(height, size), (size, size)] if width_first else [(size, width), (size, size)]
        for target in passes:
            if tuple(pixels.shape[-2:]) != target:
                pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
                pixels = pixels.round_().clamp_(0, 255)
        return pixels
