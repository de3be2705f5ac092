"""GPU tier: the CUDA-graph decoding step gives the same tokens as the eager one, for every preset,
in padded batches, and on the 7B architecture, with the graph in strict mode (a failed capture or
replay check raises instead of decoding eagerly, so "graph equals eager" never compares eager with
eager); decoding never synchronises after its capture. Run on a CUDA machine: ``pytest tests/gpu``."""

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames
from torch.nn.attention import SDPBackend, sdpa_kernel

from aim_llava.architectures import architecture
from aim_llava.bench import random_model
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.model.builder import load_pretrained_model
from aim_llava.model.language_model import llava_qwen
from aim_llava.model.language_model.generation import GraphedStep
from aim_llava.reduction.config import available_presets
from aim_llava.timing import StageTimes


@pytest.fixture(scope="module")
def cuda_model(tiny_qwen_dir):
    return load_pretrained_model(tiny_qwen_dir, device_map="cuda", torch_dtype="float32")


def padded_batch(model, tokenizer, processor, reduction):
    """(ids, attention mask, visual features) of two prompts with videos; the features are computed
    once, since merging's scatter on CUDA adds in arbitrary order (atomics) and two runs of it may
    differ in the last bit."""
    videos = [processor.preprocess(random_frames(n, 48, 64, seed=n))["pixel_values"] for n in (4, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What?")])
    with torch.no_grad():
        features = model.visual_features(videos, None, ["video"] * 2, reduction)
    return ids, mask, features


@pytest.mark.parametrize("preset", available_presets())
def test_graph_equals_eager_for_every_preset(cuda_model, preset):
    tokenizer, model, processor, _ = cuda_model
    reduction = plan(model, preset)
    ids, mask, features = padded_batch(model, tokenizer, processor, reduction)
    kwargs = dict(attention_mask=mask, visual_features=features, reduction=reduction, max_new_tokens=24,
                  eos_token_id=[])
    graphed = model.generate(ids, cuda_graph="strict", **kwargs)
    assert torch.equal(graphed, model.generate(ids, cuda_graph=False, **kwargs))


@pytest.mark.parametrize("preset", ["baseline", "aim_default", "aim_default_mask"])
def test_decoding_steps_never_synchronise(cuda_model, preset, monkeypatch):
    """Eagerly from the second step on, and with the graph once it is captured and checked (the
    check reads one flag, once per generation), every step, with the sampling, the non-finite
    check and the host copies around it, runs under ``set_sync_debug_mode("error")`` (until the
    generation ends its graph)."""
    tokenizer, model, processor, _ = cuda_model
    reduction = plan(model, preset)
    ids, mask, features = padded_batch(model, tokenizer, processor, reduction)
    real_runner, real_call, real_close = llava_qwen.step_runner, GraphedStep.__call__, GraphedStep.close

    def strict_after_warm_up(function, device, use_graph, max_new_tokens, graphs):
        step = real_runner(function, device, use_graph, max_new_tokens, graphs)
        if isinstance(step, GraphedStep):
            return step

        def call(*inputs):
            logits = step(*inputs)
            torch.cuda.set_sync_debug_mode("error")
            return logits

        return call

    def strict_once_replaying(self, *inputs):
        logits = real_call(self, *inputs)
        if self.replaying:
            torch.cuda.set_sync_debug_mode("error")
        return logits

    def close(self):
        torch.cuda.set_sync_debug_mode("default")
        real_close(self)

    monkeypatch.setattr(llava_qwen, "step_runner", strict_after_warm_up)
    monkeypatch.setattr(GraphedStep, "__call__", strict_once_replaying)
    monkeypatch.setattr(GraphedStep, "close", close)
    kwargs = dict(attention_mask=mask, visual_features=features, reduction=reduction, max_new_tokens=24,
                  eos_token_id=[])
    try:
        switched_on = []
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode",
                            lambda mode, real=torch.cuda.set_sync_debug_mode: switched_on.append(mode) or real(mode))
        for graph in ("strict", False):
            switched_on.clear()
            tokens = model.generate(ids, cuda_graph=graph, **kwargs)
            assert "error" in switched_on, graph  # it was switched on
            torch.cuda.set_sync_debug_mode("default")
            assert tokens.shape == (2, 24)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_reserved_memory_stays_flat_over_fifty_generations(cuda_model):
    """Every generate call captures a graph, into the model's one pool on its one side stream: once
    warm, the memory the allocator holds does not grow from call to call, and no allocation ever
    had to free cached blocks and retry (a device-wide synchronisation)."""
    tokenizer, model, processor, _ = cuda_model
    video = processor.preprocess(random_frames(4, 48, 64))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe the video.")
    kwargs = dict(images=[video], modalities=["video"], max_new_tokens=24, eos_token_id=[], cuda_graph="strict")
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    reserved = []
    for _ in range(50):
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert max(reserved[4:]) == reserved[4], [value >> 20 for value in reserved]
    assert torch.cuda.memory_stats().get("num_alloc_retries", 0) == retries
    assert list(model.decoding_graphs.memories) == [model.device]


def test_graph_capture_is_timed_apart_and_only_with_graphs(cuda_model):
    tokenizer, model, processor, _ = cuda_model
    video = processor.preprocess(random_frames(4, 48, 64))["pixel_values"]
    kwargs = dict(images=[video], modalities=["video"], max_new_tokens=24, eos_token_id=[])
    seconds = {}
    for graph in ("strict", False):
        with torch.no_grad(), StageTimes() as times:
            model.generate(prompt_ids(tokenizer, "Describe the video."), cuda_graph=graph, **kwargs)
        seconds[graph] = times.seconds()
    assert 0 < seconds["strict"]["graph_capture"] < seconds["strict"]["decode"]
    assert "graph_capture" not in seconds[False]


@pytest.fixture(scope="module")
def model_7b():
    return random_model(architecture("llava-onevision-qwen2-7b"), torch.device("cuda"), torch.bfloat16)


def video_prompt(model, frames: int, text_after: int, seed: int):
    """(ids [1, L], frame features) of a random prompt with a video of ``frames`` frames."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        features = model.encode_images(torch.randn(frames, 3, 384, 384, generator=gen).cuda())
    ids = torch.cat([torch.randint(0, 1000, (14,), generator=gen), torch.tensor([IMAGE_TOKEN_INDEX]),
                     torch.randint(0, 1000, (text_after,), generator=gen)])
    return ids[None], features


def test_graph_equals_eager_on_the_7b_architecture(model_7b):
    ids, frames = video_prompt(model_7b, 32, 86, seed=0)
    for spec in ("baseline", "aim_default"):
        reduction = plan(model_7b, spec)
        with torch.no_grad():
            features = model_7b.video_features(frames, reduction)
        kwargs = dict(visual_features=[features], max_new_tokens=64, eos_token_id=[], reduction=reduction)
        assert torch.equal(model_7b.generate(ids, cuda_graph="strict", **kwargs),
                           model_7b.generate(ids, cuda_graph=False, **kwargs)), spec


def test_masked_attention_never_needs_the_math_kernel(model_7b):
    """A padded batch's prefill and every decoding step (masked, grouped heads) run on the fused
    SDPA kernels: with the math kernel disallowed, SDPA would raise instead of falling back."""
    prompts = [video_prompt(model_7b, frames, after, seed=frames) for frames, after in ((8, 40), (4, 9))]
    ids, mask = left_padded_batch([p[0] for p in prompts])
    for spec in ("baseline", "aim_default"):
        reduction = plan(model_7b, spec)
        with torch.no_grad():
            features = [model_7b.video_features(p[1], reduction) for p in prompts]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            tokens = model_7b.generate(ids, attention_mask=mask, visual_features=features, max_new_tokens=16,
                                       eos_token_id=[], reduction=reduction)
        assert tokens.shape == (2, 16), spec
