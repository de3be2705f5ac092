"""Image preprocessing for the LLaVA-OneVision checkpoints, prompt tokenisation with ``<image>``, and
the other helpers of LLaVA-NeXT's ``llava/mm_utils.py`` that make sense for these checkpoints.

Sizes follow LLaVA-NeXT: an image size is ``(width, height)`` (what ``PIL.Image.size`` gives) and
grid pinpoints are ``[width, height]`` pairs. LLaVA-NeXT's ``highres`` and ``crop_split`` image
modes, which the OneVision/Qwen2 checkpoints do not use, are refused by name (:data:`REFUSED`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from aim_llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from aim_llava.errors import InputError, refuse_names
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


def padded_placement(original_size: tuple[int, int], target_resolution: tuple[int, int]) -> tuple[int, int, int, int]:
    """(width, height, left, top) of an image of ``original_size`` resized keeping its aspect
    ratio and centred on a canvas of ``target_resolution``."""
    original_width, original_height = original_size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    return new_width, new_height, (target_width - new_width) // 2, (target_height - new_height) // 2


def resize_and_pad_image(image: Image.Image, target_resolution: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio, centred on a black canvas of ``target_resolution``."""
    new_width, new_height, left, top = padded_placement(image.size, target_resolution)
    canvas = Image.new("RGB", tuple(target_resolution), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height)), (left, top))
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


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """``image`` centred on a square canvas of ``background`` colour, its longer side long."""
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
    Returns a list of tensors, one per image (LLaVA-NeXT's stacks them when their shapes agree;
    the model takes either).
    """
    aspect = image_aspect_ratio or model_config.image_aspect_ratio
    pil_images = [to_pil(image) for image in images]
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        return [
            image_processor.preprocess([expand2square(image, background)])["pixel_values"] for image in pil_images
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


def get_model_name_from_path(model_path: str | Path) -> str:
    """The checkpoint's folder name (``parent_checkpoint-N`` for a training checkpoint folder), as
    LLaVA-NeXT names models; :func:`~aim_llava.model.builder.load_pretrained_model` takes it."""
    parts = str(model_path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def load_image_from_base64(image: str | bytes) -> Image.Image:
    """The image whose file is ``image``, base64-encoded; InputError when it is not one."""
    try:
        data = base64.b64decode(image)
    except (binascii.Error, ValueError):
        raise InputError("load_image_from_base64: the text is not valid base64") from None
    try:
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"load_image_from_base64: the data is not an image PIL can read ({err})") from None
    return decoded


class KeywordsStoppingCriteria:
    """LLaVA-NeXT's stop-on-keyword criterion.

    ``model.generate(..., stopping_criteria=[criterion])`` stops each sample at the keywords' token
    ids (:attr:`stop_token_ids`; checked on the device, so each keyword must be one token, as the
    ChatML separator ``<|im_end|>`` is). Called like a transformers stopping criterion,
    ``criterion(output_ids, scores)`` says whether one sample's text so far ends with a keyword.
    """

    def __init__(self, keywords: list[str], tokenizer, input_ids: torch.Tensor):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids, dtype=torch.long))
        self.start_len = input_ids.shape[-1]

    @property
    def stop_token_ids(self) -> list[int]:
        """The token id of every keyword; InputError when a keyword is not a single token."""
        for keyword, ids in zip(self.keywords, self.keyword_ids):
            if len(ids) != 1:
                raise InputError(
                    f"stopping keyword {keyword!r} is {len(ids)} tokens: generate stops on single-token keywords "
                    "(such as '<|im_end|>'); cut the decoded text at longer ones"
                )
        return [int(ids[0]) for ids in self.keyword_ids]

    def __call__(self, output_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> bool:
        if output_ids.shape[0] != 1:
            raise InputError(f"KeywordsStoppingCriteria checks one sample, got a batch of {output_ids.shape[0]}")
        generated = output_ids.shape[1] - self.start_len
        if generated <= 0:
            return False
        tail = output_ids[0].cpu()
        if any(len(tail) >= len(ids) and torch.equal(tail[-len(ids):], ids) for ids in self.keyword_ids):
            return True
        text = self.tokenizer.decode(tail[-min(generated, 3):], skip_special_tokens=True)
        return any(keyword in text for keyword in self.keywords)


HIGHRES_MODES = (
    "it serves LLaVA-NeXT's 'highres'/'crop_split' image modes, which the OneVision/Qwen2 checkpoints do not use; "
    "process_images handles theirs ('anyres_max_N' for one image, 'pad' for several)"
)
REFUSED = dict.fromkeys((
    "resize_and_center_crop", "auto_pad_images", "extract_patches", "process_highres_image",
    "process_highres_image_crop_split",
), HIGHRES_MODES)
__getattr__ = refuse_names(__name__, REFUSED)
