"""Image preprocessing for the LLaVA-OneVision checkpoints and prompt tokenisation with ``<image>``.

Sizes follow LLaVA-NeXT: an image size is ``(width, height)`` (what ``PIL.Image.size`` gives) and
grid pinpoints are ``[width, height]`` pairs.
"""

from __future__ import annotations

import math
import re

import torch
from PIL import Image

from aim_llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from aim_llava.errors import InputError
from aim_llava.model.image_processor import SiglipImageProcessor, to_pil


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """The (width, height) among the pinpoints that keeps most of the image and wastes least."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective_resolution or (
            effective == max_effective_resolution and wasted < min_wasted_resolution
        ):
            max_effective_resolution, min_wasted_resolution = effective, wasted
            best_fit = (width, height)
    return best_fit


def get_anyres_image_grid_shape(image_size: tuple[int, int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """Number of crops (across, down) for an image of ``image_size`` = (width, height)."""
    width, height = select_best_resolution(tuple(image_size), grid_pinpoints)
    return width // patch_size, height // patch_size


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio, centred on a black canvas of ``target_resolution``."""
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Row-major square crops."""
    width, height = image.size
    return [
        image.crop((x, y, x + patch_size, y + patch_size))
        for y in range(0, height, patch_size)
        for x in range(0, width, patch_size)
    ]


def process_anyres_image(image: Image.Image, processor: SiglipImageProcessor, grid_pinpoints) -> torch.Tensor:
    """[1 + crops, 3, S, S]: the whole image squashed to S x S, then the grid crops."""
    best_resolution = select_best_resolution(image.size, grid_pinpoints)
    padded = resize_and_pad_image(image, best_resolution)
    crops = divide_to_patches(padded, processor.image_size)
    base = image.resize((processor.image_size, processor.image_size))
    return processor.preprocess([base] + crops)["pixel_values"]


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_images(images, image_processor: SiglipImageProcessor, model_config, image_aspect_ratio=None):
    """Preprocess images as the checkpoints expect.

    ``anyres*`` (the OneVision default, used for a single image): [1 + crops, 3, S, S] per image.
    ``pad`` (what the published evaluation uses when a prompt holds several images): the image is
    padded to a square with the mean colour, one view [1, 3, S, S] per image.
    Returns a list of tensors, one per image.
    """
    aspect = image_aspect_ratio or model_config.image_aspect_ratio
    pil_images = [to_pil(image) for image in images]
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        return [
            image_processor.preprocess([expand_to_square(image, background)])["pixel_values"] for image in pil_images
        ]
    if aspect == "anyres" or re.fullmatch(r"anyres_max_\d+", aspect):
        return [process_anyres_image(image, image_processor, model_config.image_grid_pinpoints) for image in pil_images]
    raise InputError(f"image_aspect_ratio {aspect!r} is not supported (use 'pad' or 'anyres_max_N')")


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenise ``prompt`` with every ``<image>`` replaced by ``image_token_index``.

    A leading BOS token, if the tokenizer adds one, is kept once at the start.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    input_ids: list[int] = []
    if bos is not None and chunks[0][:1] == [bos]:
        input_ids.append(bos)
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if bos is not None and chunk[:1] == [bos] else chunk)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise InputError(f"unsupported return_tensors {return_tensors!r}")
