"""Inputs the model cannot use are refused with a clear InputError, not a shape error."""

import pytest
from conftest import prompt_ids, random_frames, random_image

from aim_llava.errors import InputError
from aim_llava.mm_utils import process_images


def test_placeholder_count_must_match_images(loaded):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(2))["pixel_values"]
    with pytest.raises(InputError, match="2 <image> placeholders but 1"):
        model(prompt_ids(tokenizer, "Compare.", num_images=2), images=[video], modalities=["video"])
    with pytest.raises(InputError, match="0 <image> placeholders but 1"):
        model(prompt_ids(tokenizer, "Hi", num_images=0), images=[video], modalities=["video"])


def test_unknown_modality(loaded):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(2))["pixel_values"]
    with pytest.raises(InputError, match="unknown modality 'audio'"):
        model(prompt_ids(tokenizer, "Hi"), images=[video], modalities=["audio"])


def test_anyres_image_needs_its_size(loaded):
    tokenizer, model, processor, _ = loaded
    image = random_image(900, 500)
    pixels = process_images([image], processor, model.config)
    with pytest.raises(InputError, match="needs its size"):
        model(prompt_ids(tokenizer, "What?"), images=pixels)
    with pytest.raises(InputError, match="should have"):
        model(prompt_ids(tokenizer, "What?"), images=pixels, image_sizes=[(384, 384)])


def test_prompt_longer_than_model_limit(loaded):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(2))["pixel_values"]
    limit = model.config.tokenizer_model_max_length
    model.config.tokenizer_model_max_length = 100
    try:
        with pytest.raises(InputError, match="more than the model's 100"):
            model(prompt_ids(tokenizer, "Hi"), images=[video], modalities=["video"])
    finally:
        model.config.tokenizer_model_max_length = limit


def test_max_new_tokens_must_be_positive(loaded):
    tokenizer, model, _, _ = loaded
    with pytest.raises(InputError):
        model.generate(prompt_ids(tokenizer, "Hi", num_images=0), max_new_tokens=0)
