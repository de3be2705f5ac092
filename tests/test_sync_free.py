"""A prefill never reads a value back from the device (no host-device synchronisation between
layers), for every method; the input assembly reads only the host's own token ids.

On the CPU the calls that would synchronise on a GPU are counted where the package makes them
(tests/sync_points.py); the GPU tier (tests/gpu) runs the same calls under
``torch.cuda.set_sync_debug_mode("error")``, which also sees inside torch.
"""

import inspect

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames
from sync_points import count_sync_points

from aim_llava.model.language_model.generation import HostMirror

# AIM with the importance kernels a GPU uses (the CPU's own, "factored", decides its exact repairs on
# the host: it is the one kernel that reads values back, and it never runs on CUDA)
GPU_KERNELS = [{"importance_kernel": "chunked"}, {"importance_kernel": "flex"}]
AIM = [{"method": "aim", **kernel} for kernel in GPU_KERNELS] + [
    {"method": "aim", "prune_mode": "mask", "importance_kernel": "chunked"},
    {"method": "aim", "merge_ratio": None, "importance_kernel": "chunked"},
    {"method": "aim", "prune_start": 1, "merge_order": "spatial", "importance_kernel": "chunked"}]
PRESETS = AIM + ["baseline", "fastv_default", "pool_25", "random_25", "ficoco_l_25", "ficoco_v_25",
                 {"method": "ficoco_l", "start_layer": 1, "end_layer": 3, "keep_ratio": 0.3, "prune_mode": "mask"}]


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
@pytest.mark.parametrize("spec", PRESETS, ids=str)
def test_prefill_has_no_sync_point(loaded, spec):
    tokenizer, model, processor, _ = loaded
    reduction = plan(model, spec)
    videos = [processor.preprocess(random_frames(n, 64, 80, seed=n))["pixel_values"] for n in (4, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What?")])
    with torch.no_grad():
        with count_sync_points() as in_vision:
            features = model.visual_features(videos, None, ["video", "video"], reduction)
        with count_sync_points() as in_assembly:
            inputs = model.prepare_multimodal_inputs(ids, mask, visual_features=features, reduction=reduction)
        with count_sync_points() as in_prefill:
            _, _, record = model.prefill(inputs, None, reduction)
    ours = [point for point in in_vision + in_prefill if "aim_llava" in point.where]  # torch's CPU-only reference
    assert ours == []                                                                 # paths (eager flex) aside
    assert {point.tensor for point in in_assembly} <= {id(ids), id(mask)}  # the host's own token ids only
    assert len(record.visual_tokens_per_layer) == model.config.text.num_hidden_layers


SYNCING = {  # what would synchronise on a GPU, and calls alike that would not
    "item": (lambda x: x.sum().item(), lambda x: x.sum()),
    "__getitem__": (lambda x: x[x > 1], lambda x: x[1:]),
    "where": (lambda x: torch.where(x > 1), lambda x: torch.where(x > 1, x, 0.0)),
    "copy_": (lambda x: torch.empty(3).copy_(x), lambda x: torch.empty(3).copy_(x, non_blocking=True)),
    "to": (lambda x: x.to("cpu"), lambda x: x.to(torch.float64)),
    "equal": (lambda x: torch.equal(x, x), lambda x: torch.eq(x, x)),
    "allclose": (lambda x: x.allclose(x), lambda x: torch.isclose(x, x)),
    "cpu": (lambda x: x.cpu(), lambda x: x.clone()),
}


@pytest.mark.parametrize("call", SYNCING)
def test_the_counter_sees_a_sync_point(call):
    """Each synchronising call is counted once, under its name; its non-synchronising sibling
    (device-side indexing, three-argument where, a copy into pinned memory, a dtype conversion, an
    elementwise comparison) is not."""
    syncing, not_syncing = SYNCING[call]
    x = torch.arange(3.0)
    with count_sync_points() as found:
        syncing(x)
    with count_sync_points() as alike:
        not_syncing(x)
    assert [point.call for point in found] == [call] and alike == []


@pytest.mark.parametrize("spec", ["baseline", {"method": "aim", "importance_kernel": "chunked"}], ids=str)
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}], ids=["greedy", "top_p"])
def test_decoding_reads_back_only_its_host_copies(loaded, spec, sampling):
    """Sampling, EOS tracking, the non-finite check and the cache writes stay on the device: the
    only values the loop reads are the asynchronous host copies of tokens and flags
    (HostMirror.deliver and, once at the end, HostMirror.broken_rows)."""
    tokenizer, model, processor, _ = loaded
    reduction = plan(model, spec)
    videos = [processor.preprocess(random_frames(n, 64, 80, seed=n))["pixel_values"] for n in (3, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What?")])
    readers = [inspect.getsourcelines(method) for method in (HostMirror.deliver, HostMirror.broken_rows)]
    host_copies = {line for lines, first in readers for line in range(first, first + len(lines))}
    generator = torch.Generator().manual_seed(0)
    with count_sync_points() as found:
        tokens = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction,
                                max_new_tokens=12, eos_token_id=[5, 7], generator=generator, **sampling)
    ours = [point for point in found if "aim_llava" in point.where and point.tensor not in (id(ids), id(mask))]
    assert tokens.shape[0] == 2 and ours
    stray = [p for p in ours if not (p.where.startswith(inspect.getfile(HostMirror)) and
                                     int(p.where.rsplit(":", 1)[1]) in host_copies)]
    assert stray == []


def test_counting_leaves_tensors_as_they_were():
    """Watching ``tensor[index]`` by replacing Tensor.__getitem__ on the class would give every
    tensor a sequence slot for the rest of the process, after which torch.tensor of a list of 0-d
    tensors fails (transformers' Qwen2.5-VL positions build one)."""
    with count_sync_points():
        torch.arange(3.0)[torch.tensor([True, False, True])]
    assert torch.tensor([torch.tensor(1), torch.tensor(2)]).tolist() == [1, 2]
