"""A model in bfloat16 on the CPU (``dtype=auto`` there, where the CPU has bfloat16 instructions):
the PageRank importance, the merging and the sampling stay correct with bfloat16 inputs, and
nothing upcasts the model's work to float32 on the way."""

import pytest
import torch
from conftest import plan, prompt_ids, random_frames
from test_importance import dense_log_importance

from aim_llava import load_pretrained_model
from aim_llava.model.language_model import generation
from aim_llava.reduction.importance import log_importance, log_start_weights
from aim_llava.reduction.merge import merge_steps_for_ratio, merge_tokens


def test_importance_of_bfloat16_q_and_k_equals_the_float64_formula():
    """``auto`` on the CPU (the factored kernel) from bfloat16 q and k: float32 scores equal to
    the dense float64 formula on the same (bfloat16) values."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 50, 16, generator=gen).bfloat16()
    k = torch.randn(2, 2, 50, 16, generator=gen).bfloat16()
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :7] = False
    ours = log_importance(q, k, valid, log_start_weights(valid), 0.25)
    start = valid.double() / valid.sum(dim=1, keepdim=True)
    reference = dense_log_importance(q.double(), k.double(), valid, start, 0.25)
    assert ours.dtype == torch.float32
    seen = torch.isfinite(reference)
    assert torch.equal(seen, torch.isfinite(ours))
    torch.testing.assert_close(ours[seen].double(), reference[seen], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weighting", ["mean", "size"])
def test_merging_bfloat16_tokens_matches_float32_to_bfloat16_precision(weighting):
    """Merging decides by float32 cosine similarities (the same pairs as from float32 tokens) and
    returns bfloat16 tokens within bfloat16 rounding of the float32 merge."""
    tokens = torch.randn(3, 196, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    steps = merge_steps_for_ratio(196, 0.25)
    ours = merge_tokens(tokens, steps, order="spatial", weighting=weighting)
    reference = merge_tokens(tokens.float(), steps, order="spatial", weighting=weighting)
    assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape == (3, 49, 64)
    torch.testing.assert_close(ours.float(), reference, rtol=2**-6, atol=2**-6)


@pytest.fixture(scope="module")
def bfloat16_model(tiny_qwen_dir):
    return load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="bfloat16")


def recording(pick_tokens, logits_seen: list):
    """``pick_tokens`` that also keeps the logits it was given."""
    def pick(logits, params):
        logits_seen.append(logits)
        return pick_tokens(logits, params)

    return pick


def test_generation_in_bfloat16_stays_in_bfloat16_and_samples_from_float32(bfloat16_model, loaded, monkeypatch):
    """aim_default (merging, PageRank pruning) in a bfloat16 model: every linear layer receives
    bfloat16 (no silent upcast), the tokens are picked from float32 logits, greedy and sampled,
    and the first token's logits are those of the float32 model up to bfloat16 precision."""
    tokenizer, model, processor, _ = bfloat16_model
    inputs_to_linears = set()
    hooks = [module.register_forward_pre_hook(lambda module, args: inputs_to_linears.add(args[0].dtype))
             for module in model.modules() if isinstance(module, torch.nn.Linear)]
    pick_tokens, logits_seen = generation.pick_tokens, []
    monkeypatch.setattr(generation, "pick_tokens", recording(pick_tokens, logits_seen))
    video = processor.preprocess(random_frames(4, 64, 80))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe the video.")
    common = dict(images=[video], modalities=["video"], max_new_tokens=3, eos_token_id=[])
    try:
        greedy = model.generate(ids, reduction=plan(model, "aim_default"), return_dict_in_generate=True, **common)
        sampled = model.generate(ids, reduction=plan(model, "aim_default"), do_sample=True, temperature=0.8,
                                 top_p=0.9, generator=torch.Generator().manual_seed(0), **common)
    finally:
        for hook in hooks:
            hook.remove()
    assert inputs_to_linears == {torch.bfloat16}
    assert len(logits_seen) == 6 and {logits.dtype for logits in logits_seen} == {torch.float32}
    tokens = greedy.reduction.visual_tokens_per_layer
    assert tokens[-1][0] < tokens[0][0]  # pruned
    assert sampled.shape == (1, 3) and int(sampled.max()) < model.config.text.vocab_size

    first_logits = {}
    for name, candidate in (("bfloat16", model), ("float32", loaded[1])):
        logits_seen = []
        monkeypatch.setattr(generation, "pick_tokens", recording(pick_tokens, logits_seen))
        candidate.generate(ids, reduction=plan(candidate, "baseline"), **dict(common, max_new_tokens=1))
        first_logits[name] = logits_seen[0]
    cosine = torch.nn.functional.cosine_similarity(first_logits["bfloat16"], first_logits["float32"], dim=-1)
    assert float(cosine) > 0.99, float(cosine)
