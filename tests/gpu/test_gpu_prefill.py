"""GPU tier: the prefill never synchronises with the host, and the importance of the fused Triton
kernel and of FlexAttention, from bfloat16 q and k, equals the float32 chunked one. Run on a CUDA machine: ``pytest tests/gpu``."""

import pytest
import torch
from conftest import plan, prompt_ids, random_frames

from aim_llava.model.builder import load_pretrained_model
from aim_llava.reduction.importance import (
    log_start_weights,
    pagerank_log_importance,
    pagerank_log_importance_flex,
    pagerank_log_importance_fused,
)
from aim_llava.reduction.logsumexp import logsumexp_with_bias


@pytest.fixture(scope="module")
def cuda_model(tiny_qwen_dir):
    return load_pretrained_model(tiny_qwen_dir, device_map="cuda", torch_dtype="bfloat16")


@pytest.mark.parametrize("spec", ["baseline", "aim_default", "aim_prune_only", "aim_default_mask", "fastv_default",
                                  "ficoco_l_25", "pool_25", "random_25", {"method": "aim", "importance_kernel": "flex"},
                                  {"method": "aim", "importance_kernel": "chunked"},
                                  {"method": "aim", "importance_kernel": "fused"}], ids=str)
def test_prefill_does_not_synchronise(cuda_model, spec):
    tokenizer, model, processor, _ = cuda_model
    reduction = plan(model, spec)
    video = processor.preprocess(random_frames(8, 64, 80))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe the video in detail.")
    with torch.no_grad():
        features = model.visual_features([video], None, ["video"], reduction)
        inputs = model.prepare_multimodal_inputs(ids, visual_features=features, reduction=reduction)
        model.prefill(inputs, None, reduction)  # warm-up: compiles the flex kernels where they are used
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.prefill(inputs, None, reduction)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kernel", [pagerank_log_importance_fused, pagerank_log_importance_flex])
@pytest.mark.parametrize("n", [1769, 6373])
def test_bf16_importance_equals_chunked_float32(n, kernel):
    """A batch of two at 7B's head shapes: sample 1 left-padded by 300 tokens, with keys pruned
    earlier (mask mode) in both."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, n, 28, 128, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)  # as the model's
    k = torch.randn(2, 4, n, 128, device="cuda", generator=gen).to(torch.bfloat16)
    valid = torch.ones(2, n, dtype=torch.bool, device="cuda")
    valid[1, :300] = False
    mask = valid.clone()
    mask[:, 500:520] = False
    log_start = log_start_weights(valid)
    reference = pagerank_log_importance(q.float(), k.float(), mask, log_start, 128**-0.5)
    fused = kernel(q, k, mask, log_start, 128**-0.5)
    assert torch.equal(torch.isinf(fused), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(fused[finite], reference[finite], rtol=1e-4, atol=1e-3)
    for sample, real in enumerate(valid.sum(dim=1).tolist()):
        half = real // 2
        assert torch.equal(fused[sample].topk(half).indices.sort().values,
                           reference[sample].topk(half).indices.sort().values)


@pytest.mark.parametrize("dim", [-1, -2])
def test_one_pass_logsumexp_equals_torch(dim):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 28, 1769, 1769, device="cuda", generator=gen) * 30
    x.masked_fill_(torch.ones(1769, 1769, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    bias = torch.randn(1, 28, 1769, device="cuda", generator=gen)
    ours = logsumexp_with_bias(x, dim, bias)
    reference = torch.logsumexp(x.double() + (bias.double()[..., :, None] if dim == -2 else bias.double()[..., None, :]),
                                dim=dim)
    assert torch.allclose(ours.double(), reference, rtol=1e-5, atol=1e-4)
