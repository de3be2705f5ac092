"""GPU tier: the CUDA-graph decoding step gives the same tokens as the eager one, for every preset,
in padded batches, and on the 7B architecture. Run on a CUDA machine: ``pytest tests/gpu``."""

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames

from aim_llava.architectures import architecture
from aim_llava.bench import random_model
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.model.builder import load_pretrained_model
from aim_llava.reduction.config import available_presets


@pytest.fixture(scope="module")
def cuda_model(tiny_qwen_dir):
    return load_pretrained_model(tiny_qwen_dir, device_map="cuda", torch_dtype="float32")


@pytest.mark.parametrize("preset", available_presets())
def test_graph_equals_eager_for_every_preset(cuda_model, preset):
    tokenizer, model, processor, _ = cuda_model
    reduction = plan(model, preset)
    videos = [processor.preprocess(random_frames(n, 48, 64, seed=n))["pixel_values"] for n in (4, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What?")])
    kwargs = dict(attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction,
                  max_new_tokens=24, eos_token_id=[])
    graphed = model.generate(ids, cuda_graph=True, **kwargs)
    assert torch.equal(graphed, model.generate(ids, cuda_graph=False, **kwargs))


def test_graph_equals_eager_on_the_7b_architecture():
    model = random_model(architecture("llava-onevision-qwen2-7b"), torch.device("cuda"), torch.bfloat16)
    with torch.no_grad():
        frames = model.encode_images(torch.randn(32, 3, 384, 384, device="cuda"))
    ids = torch.cat([torch.randint(0, 1000, (14,)), torch.tensor([IMAGE_TOKEN_INDEX]), torch.randint(0, 1000, (86,))])
    for spec in ("baseline", "aim_default"):
        reduction = plan(model, spec)
        with torch.no_grad():
            features = model.video_features(frames, reduction)
        kwargs = dict(visual_features=[features], max_new_tokens=64, eos_token_id=[], reduction=reduction)
        assert torch.equal(model.generate(ids[None], cuda_graph=True, **kwargs),
                           model.generate(ids[None], cuda_graph=False, **kwargs)), spec
