"""Image preprocessing and prompt construction against independent references."""

import weakref

import numpy as np
import pytest
import torch
from conftest import random_frames, random_image
from fake_cuda import FakeCuda, aliases
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.siglip.image_processing_pil_siglip import (
    SiglipImageProcessorPil,
)

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.conversation import build_prompt, get_conversation
from aim_llava.errors import InputError
from aim_llava.mm_utils import process_images, tokenizer_image_token
from aim_llava.model import image_processor
from aim_llava.model.image_processor import PinnedStaging, SiglipImageProcessor


def test_siglip_preprocessing_matches_transformers(loaded):
    _, _, processor, _ = loaded
    frames = random_frames(3, 200, 333, seed=4)
    ours = processor.preprocess(frames)["pixel_values"]
    reference = SiglipImageProcessorPil(size={"height": 384, "width": 384})(list(frames), return_tensors="pt")
    assert ours.shape == (3, 3, 384, 384)
    assert (ours - reference["pixel_values"]).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(900, 500), (500, 900), (200, 150), (384, 384), (2000, 1100), (1300, 390)])
def test_anyres_views_match_transformers(loaded, size):
    _, model, processor, _ = loaded
    image = random_image(*size, seed=sum(size))
    ours = process_images([image], processor, model.config)[0]
    reference = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)(image, return_tensors="pt")
    assert reference["image_sizes"].tolist() == [[size[1], size[0]]]
    theirs = reference["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5


def test_pad_mode_gives_one_square_view(loaded):
    _, model, processor, _ = loaded
    image = random_image(300, 100, seed=9)
    (pixels,) = process_images([image], processor, model.config, image_aspect_ratio="pad")
    assert pixels.shape == (1, 3, 384, 384)
    grey = (127 / 255 - 0.5) / 0.5
    # top and bottom bands are the mean-colour padding
    assert torch.allclose(pixels[0, :, :100], torch.full_like(pixels[0, :, :100], grey), atol=1e-6)
    with pytest.raises(InputError):
        process_images([image], processor, model.config, image_aspect_ratio="crop")


def test_qwen_prompt_format():
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is happening?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_prompt("What is happening?") == expected
    conv = get_conversation("qwen_1_5")
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], "Hello")
    assert conv.get_prompt().endswith("<|im_start|>assistant\nHello<|im_end|>\n")
    with pytest.raises(InputError):
        get_conversation("vicuna_v2")


def test_tokenizer_image_token_places_placeholders(loaded):
    tokenizer, _, _, _ = loaded
    prompt = "before <image> middle <image> after"
    ids = tokenizer_image_token(prompt, tokenizer)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    first, second = (i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX)
    assert ids[:first] == tokenizer("before ").input_ids
    assert ids[first + 1 : second] == tokenizer(" middle ").input_ids
    assert ids[second + 1 :] == tokenizer(" after").input_ids
    assert torch.equal(tokenizer_image_token(prompt, tokenizer, return_tensors="pt"), torch.tensor(ids))


def synthetic_scene(height: int, width: int) -> np.ndarray:
    """Smooth gradients, a periodic pattern and a sharp-edged block."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, ((x + y) % 64) * 4], axis=-1)
    image[height // 3 : height // 2, width // 4 : width // 2] = [250, 10, 30]
    return image.astype(np.uint8)


@pytest.mark.parametrize("size", [(360, 640), (96, 160), (1080, 1920), (500, 300), (300, 500), (384, 384)])
@pytest.mark.parametrize("content", ["noise", "scene"])
def test_device_preprocessing_equals_pil_within_two_levels(size, content):
    """The batched on-device resize/normalise against the PIL path (documented tolerance: every
    pixel within 2/255 before normalisation, the mean difference within 0.2/255)."""
    processor = SiglipImageProcessor()
    height, width = size
    if content == "noise":
        frames = np.random.default_rng(height + width).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    else:
        frames = np.stack([synthetic_scene(height, width)] * 2)
    pil = processor.preprocess(list(frames))["pixel_values"]
    device = processor.preprocess_frames(frames, "cpu")
    levels = (pil - device).abs() * 0.5 * 255  # std 0.5: back to 8-bit levels
    assert device.shape == pil.shape and device.dtype == torch.float32
    assert levels.max() <= 2.0 + 1e-3 and levels.mean() <= 0.2


class LiveTensorBytes(TorchDispatchMode):
    """The peak, after any operator in the block, of the bytes held by the tensors operators in the
    block allocated (a storage counts until the last tensor viewing it is gone); and whether each
    input of the resizing kernel was contiguous."""

    def __init__(self):
        super().__init__()
        self.holders: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.peak = 0
        self.resized_contiguous: list[bool] = []

    def release(self, address: int) -> None:
        self.holders[address] -= 1
        if not self.holders[address]:
            del self.holders[address], self.sizes[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_upsample_bicubic2d_aa"):
            self.resized_contiguous.append(args[0].is_contiguous())
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(result):
            if not isinstance(tensor, torch.Tensor):
                continue
            address = tensor.untyped_storage().data_ptr()
            if address not in self.holders and aliases(func):
                continue  # a view of an input from outside the block
            self.holders[address] = self.holders.get(address, 0) + 1
            self.sizes.setdefault(address, tensor.untyped_storage().nbytes())
            weakref.finalize(tensor, self.release, address)
        self.peak = max(self.peak, sum(self.sizes.values()))
        return result


def test_device_preprocessing_holds_one_chunk_beyond_its_result(monkeypatch):
    """Frames are converted to float contiguously (channels first) and resized one chunk at a
    time: the memory held beyond the result stays within two chunks' float pixels, not the whole
    clip's (six 720p frames: 66 MB of float pixels; one frame per chunk here), and the result
    equals the one resized in a single chunk."""
    frames = np.random.default_rng(3).integers(0, 256, (6, 720, 1280, 3), dtype=np.uint8)
    processor = SiglipImageProcessor()
    whole = processor.preprocess_frames(frames, "cpu")
    frame_floats = 720 * 1280 * 3 * 4
    monkeypatch.setattr(image_processor, "PREPROCESS_CHUNK_BYTES", frame_floats)
    with LiveTensorBytes() as memory:
        chunked = processor.preprocess_frames(frames, "cpu")
    assert torch.equal(chunked, whole)
    assert memory.peak <= chunked.nbytes + 2 * frame_floats < frames.size * 4
    assert memory.resized_contiguous == [True] * 2 * 6  # two passes per one-frame chunk


@pytest.mark.parametrize("sizes", [[5000, 37, 2999], [1000, 1001, 999]])
def test_frames_reach_the_gpu_through_one_fixed_pinned_buffer(sizes, monkeypatch):
    """Inputs smaller and larger than the staging buffer arrive byte for byte; the pinned memory
    taken is the buffer's two halves, once, whatever the inputs; each piece's copy is marked by an
    event on the device's stream, and a half is refilled only after waiting for its previous copy.
    (torch.cuda stand-ins from tests/fake_cuda.py, copies into CPU tensors.)"""
    cuda = FakeCuda(monkeypatch)
    staging = PinnedStaging(nbytes=1000)
    gen = torch.Generator().manual_seed(len(sizes))
    pieces = 0
    for size in sizes:
        host = torch.randint(0, 256, (size, 3), dtype=torch.uint8, generator=gen)
        assert torch.equal(staging.to_device(host, torch.device("cpu")), host)
        pieces += -(-host.numel() // 1000)
    assert cuda.pinned_bytes == [1000, 1000]
    assert cuda.events == [torch.device("cpu")] * pieces and len(cuda.waits) == pieces - 2
