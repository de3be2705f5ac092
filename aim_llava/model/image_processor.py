"""SigLIP preprocessing: resize to a square with bicubic resampling, rescale, normalise (with PIL on
the host, or batched on the model's device for video frames)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from aim_llava.errors import InputError
from aim_llava.model.config import VisionConfig
from aim_llava.tensors import host_values, to_device


def to_pil(image) -> Image.Image:
    """Accept a PIL image, an HxWx3 uint8 array or tensor; return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image.astype(np.uint8), "RGB")
    raise InputError(f"cannot use {type(image).__name__} as an image: pass PIL images or HxWx3 uint8 arrays")


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

        The frames travel once, as uint8, and are resized there in batched calls the way PIL resizes
        a uint8 image: two separable bicubic passes with PIL's kernel (antialiased, a = -0.5), the
        one that shrinks more first, each rounded to 8 bits. Against :meth:`preprocess` (PIL) every
        pixel is within 2/255 before normalisation (0.016 after it, std 0.5), and on average within
        0.2/255 (tests/test_preprocessing.py).
        """
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise InputError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
        pixels = to_device(frames, device).permute(0, 3, 1, 2).float()
        size = self.image_size
        height, width = pixels.shape[-2:]
        passes = [(pixels.shape[-2], size), (size, size)] if size / height >= size / width else \
            [(size, pixels.shape[-1]), (size, size)]
        for target in passes:
            if tuple(pixels.shape[-2:]) != target:
                pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True, align_corners=False)
                pixels = pixels.round_().clamp_(0, 255)
        mean = host_values(self.image_mean, pixels.device, torch.float32).view(1, 3, 1, 1)
        std = host_values(self.image_std, pixels.device, torch.float32).view(1, 3, 1, 1)
        return ((pixels / 255.0 - mean) / std).to(dtype)
