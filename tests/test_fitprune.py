"""FitPrune: statistics and recipe against straightforward implementations of docs/algorithms.md §6,
the budget search, scaling, and the calibrate -> prune round trip on the tiny model."""

import json

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames

from aim_llava.cli import main
from aim_llava.reduction.methods.fitprune import (
    LayerStats,
    Recipe,
    attention_received,
    recipe_for_alpha,
    search_recipe,
)
from aim_llava.reduction.tokens import LayerAttention, TokenState
from aim_llava.sample_media import write_sample_video

GEN = dict(max_new_tokens=6, eos_token_id=[])


def test_attention_received_equals_dense():
    gen = torch.Generator().manual_seed(1)
    batch, heads, n, dim = 2, 4, 20, 8
    q, k = torch.randn(batch, heads, n, dim, generator=gen), torch.randn(batch, 2, n, dim, generator=gen)
    visual = torch.zeros(batch, n, dtype=torch.bool)
    visual[:, 5:14] = True
    valid = torch.ones(batch, n, dtype=torch.bool)
    state = TokenState.start(torch.zeros(batch, n, 1), torch.arange(n).expand(batch, n), valid, visual, False)
    state.alive = valid.clone()
    state.alive[1, 7] = False  # a token masked earlier
    c, v = attention_received(LayerAttention(q, k, 0.3), state)
    for b in range(batch):
        kk = k[b].repeat_interleave(2, dim=0)
        logits = (q[b] @ kk.transpose(-1, -2)) * 0.3
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & state.alive[b][None]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).amax(dim=0)
        text_rows = [i for i in range(14, n)]
        visual_rows = [i for i in range(5, 14) if state.alive[b, i]]
        assert torch.allclose(c[b], probs[text_rows].sum(dim=0), atol=1e-5)
        assert torch.allclose(v[b], probs[visual_rows].sum(dim=0), atol=1e-5)


def reference_recipe(samples, alpha, layers_to_walk):
    """docs/algorithms.md §6 walk with Python lists (no budget stop): mean tokens dropped per layer."""
    remaining = [set(range(len(s[0].c))) for s in samples]
    recipe = []
    for layer in range(layers_to_walk):
        dropped = []
        for index, sample in enumerate(samples):
            stats = sample[layer]

            def low_set(values, queries):
                norm = [x / queries for x in values]
                floor = (1 - alpha) * sum(norm)
                alive = sorted(remaining[index], key=lambda j: norm[j])
                kept_mass, removed = sum(norm[j] for j in alive), set()
                for j in alive:
                    if kept_mass - norm[j] < floor - 1e-12:
                        break
                    kept_mass -= norm[j]
                    removed.add(j)
                return removed

            drop = low_set(stats.c, stats.text_queries) & low_set(stats.v, stats.visual_queries)
            remaining[index] -= drop
            dropped.append(len(drop))
        recipe.append(sum(dropped) / len(dropped))
    return recipe


def synthetic_samples(seed, count=3, layers=4, tokens=30):
    gen = torch.Generator().manual_seed(seed)
    return [[LayerStats(torch.rand(tokens, generator=gen).tolist(), torch.rand(tokens, generator=gen).tolist(), 7, tokens)
             for _ in range(layers)] for _ in range(count)]


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5])
def test_recipe_walk_equals_reference(alpha):
    samples = synthetic_samples(int(alpha * 100))
    never_stop = lambda recipe: 1.0  # noqa: E731  (cost above the budget: walk every layer)
    ours = recipe_for_alpha(samples, alpha, never_stop, budget=0.0)
    assert ours == pytest.approx(reference_recipe(samples, alpha, 4))
    assert sum(ours) > 0


def test_search_returns_least_feasible_alpha():
    samples = synthetic_samples(7, layers=6)

    def cost(recipe):
        tokens, remaining = 0.0, 30.0
        for drop in recipe:
            tokens += remaining
            remaining -= drop
        return tokens

    budget = 0.6 * cost([0.0] * 6)
    recipe, alpha = search_recipe(samples, cost, budget)
    assert cost(recipe) <= budget
    assert cost(recipe_for_alpha(samples, alpha - 0.011, cost, budget)) > budget


def test_recipe_scales_to_other_counts(tmp_path):
    recipe = Recipe([10.0, 0.0, 5.5], visual_tokens=100)
    assert recipe.scaled(200) == [20, 0, 11]
    assert recipe.scaled(50) == [5, 0, 3]
    recipe.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == recipe


@pytest.fixture(scope="module")
def recipe_path(tiny_qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fitprune")
    lines = []
    for i in range(5):
        video = write_sample_video(root / f"v{i}.mp4", num_frames=20 + 10 * i)
        lines.append(json.dumps({"video": str(video), "question": f"What happens in part {i}?"}))
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "recipe.json"
    code = main(["fitprune-calibrate", "--model", str(tiny_qwen_dir), "--data", str(root / "calib.jsonl"),
                 "--budget", "0.5", "--out", str(out), "--frames", "4"])
    assert code == 0
    return out


def test_calibrated_recipe_meets_budget(recipe_path, tiny_qwen_dir):
    from aim_llava.flops import flops_report, resolve_architecture
    from aim_llava.reduction.config import load_reduction_config

    recipe = Recipe.load(recipe_path)
    assert recipe.samples == 5 and len(recipe.drop) == 6 and sum(recipe.drop) > 0
    name, arch = resolve_architecture(str(tiny_qwen_dir / "config.json"))
    text = round(recipe.text_tokens)
    pruned = flops_report(name, arch, load_reduction_config(f"fitprune:{recipe_path}"), 4, text)
    full = flops_report(name, arch, load_reduction_config("baseline"), 4, text)
    assert pruned.prefill_tflops_executed <= 0.5 * full.prefill_tflops_executed * 1.01  # rounding of counts


def test_fitprune_generation_cache_and_batch(loaded, recipe_path):
    tokenizer, model, processor, _ = loaded
    reduction = plan(model, f"fitprune:{recipe_path}")
    videos = [processor.preprocess(random_frames(n, 64, 80, seed=n))["pixel_values"] for n in (3, 4)]
    prompts = [prompt_ids(tokenizer, "What is shown?"), prompt_ids(tokenizer, "Describe every person you see.")]
    for prompt, video in zip(prompts, videos):
        cached = model.generate(prompt, images=[video], modalities=["video"], reduction=reduction,
                                return_dict_in_generate=True, **GEN)
        recomputed = model.generate(prompt, images=[video], modalities=["video"], use_cache=False, reduction=reduction,
                                    **GEN)
        assert torch.equal(cached.sequences, recomputed)
        assert cached.reduction.kept  # tokens were really dropped
    ids, mask = left_padded_batch(prompts)
    batched = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction,
                             **GEN)
    for i in range(2):
        single = model.generate(prompts[i], images=[videos[i]], modalities=["video"], reduction=reduction, **GEN)
        assert torch.equal(batched[i], single[0])


def test_calibrate_bad_data(capsys, tiny_qwen_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "no video"}\n')
    code = main(["fitprune-calibrate", "--model", str(tiny_qwen_dir), "--data", str(tmp_path / "bad.jsonl"),
                 "--budget", "0.5", "--out", str(tmp_path / "r.json")])
    assert code == 2 and 'needs "video"' in capsys.readouterr().err
    assert main(["caption", "x.mp4", "--config", "fitprune:/nope.json", "--model", str(tiny_qwen_dir)]) == 2
    assert "recipe not found" in capsys.readouterr().err
