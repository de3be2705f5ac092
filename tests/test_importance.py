"""PageRank importance (docs/algorithms.md §3) against the dense formula, the log-space kernels
against each other, underflow and ties."""

from functools import partial

import pytest
import torch

from aim_llava.reduction import factored_importance, importance
from aim_llava.reduction.factored_importance import pagerank_log_importance_factored
from aim_llava.reduction.importance import (
    flex_bucket,
    log_importance,
    log_start_weights,
    pagerank_importance,
    pagerank_log_importance,
    pagerank_log_importance_flex,
)
from aim_llava.reduction.tokens import TokenState, keep_top_visual

LOG_SPACE_KERNELS = [pagerank_log_importance, pagerank_log_importance_factored]


def dense_importance(q, k, key_mask, start, scale, temperature=0.1, iterations=5, dtype=torch.float64):
    """The formula as written, with the whole [B, H, N, N] matrix (linear space)."""
    heads, kv_heads, n = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1).to(dtype)
    logits = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & key_mask[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
    p = start.to(dtype)[:, None, :].expand(-1, heads, -1)
    for _ in range(iterations):
        p = (p[:, :, None, :] @ probs).squeeze(2)
    return p.pow(2).mean(dim=1).sqrt()


def dense_log_importance(q, k, key_mask, start, scale, temperature=0.1, iterations=5):
    """The same formula in float64 log space (no underflow), with the whole matrix and no chunks."""
    heads, kv_heads, n = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1).double()
    logits = (q.double() @ k.transpose(-1, -2)) * scale / temperature
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & key_mask[:, None, :]
    log_m = torch.log_softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    log_m = torch.where(allowed[:, None].expand_as(log_m), log_m, torch.full_like(log_m, float("-inf")))
    log_p = torch.log(start.double())[:, None, :].expand(-1, heads, -1)
    for _ in range(iterations):
        log_p = torch.logsumexp(log_p[..., :, None] + log_m, dim=-2)
    return 0.5 * (torch.logsumexp(2 * log_p, dim=1) - torch.log(torch.tensor(float(heads), dtype=torch.float64)))


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, dim = 2, 4, 2, 37, 8
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen)
    key_mask = torch.ones(batch, n, dtype=torch.bool)
    key_mask[0, :5] = False  # left padding of sample 0
    key_mask[1, 10:14] = False  # tokens pruned earlier (mask mode)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[0, :5] = False
    start = valid.float() / valid.sum(dim=1, keepdim=True)
    return q, k, key_mask, start


@pytest.mark.parametrize("cache_budget", [0, 2**30])  # recompute the chunks every step / keep them
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, None])
def test_chunked_equals_dense(inputs, chunk_size, cache_budget):
    q, k, key_mask, start = inputs
    ours = pagerank_log_importance(q, k, key_mask, start.log(), 8**-0.5, chunk_size=chunk_size,
                                   cache_budget=cache_budget).exp()
    reference = dense_importance(q, k, key_mask, start, scale=8**-0.5)
    assert ours.shape == (2, 37) and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("group_bytes", [0, 2**30])  # one head at a time / all heads together
@pytest.mark.parametrize("panel_rows", [1, 32, 64, 512])  # several panels (the last one padded) / one
def test_factored_equals_dense(inputs, panel_rows, group_bytes):
    """Left padding, keys pruned earlier (mask mode), a length that is no multiple of the row block."""
    q, k, key_mask, start = inputs
    ours = pagerank_log_importance_factored(q, k, key_mask, start.log(), 8**-0.5, panel_rows=panel_rows,
                                            group_bytes=group_bytes).exp()
    reference = dense_importance(q, k, key_mask, start, scale=8**-0.5)
    assert ours.shape == (2, 37) and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-12)


def test_memory_budget_chooses_small_chunks(inputs, monkeypatch):
    kernel = pagerank_log_importance
    q, k, key_mask, start = inputs
    budget = 2 * 4 * 37 * 4 * 3  # three query rows of float32 logits for 2 samples x 4 heads x 37 keys
    blocks = []

    def recording(*args):
        for block in original(*args):
            blocks.append(block[2].shape)
            yield block

    original = importance.attention_logit_chunks
    monkeypatch.setattr(importance, "attention_logit_chunks", recording)
    tiny_budget = kernel(q, k, key_mask, start.log(), 0.35, memory_budget=budget, cache_budget=0).exp()
    assert blocks and all(shape[:2] == (2, 4) and shape[3] == 37 for shape in blocks)
    assert {shape[2] for shape in blocks} == {3, 1}  # 12 chunks of 3 rows and the last row
    assert max(shape.numel() * 4 for shape in blocks) == budget
    monkeypatch.undo()
    assert torch.allclose(tiny_budget, kernel(q, k, key_mask, start.log(), 0.35).exp(), rtol=1e-5)


def test_settings_change_the_result(inputs):
    q, k, key_mask, start = inputs
    base = pagerank_importance(q, k, key_mask, start, scale=0.35)
    assert not torch.allclose(base, pagerank_importance(q, k, key_mask, start, scale=0.35, temperature=1.0))
    assert not torch.allclose(base, pagerank_importance(q, k, key_mask, start, scale=0.35, iterations=2))


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")  # on CPU it runs its dense reference path
def test_flex_kernel_equals_dense(inputs):
    q, k, key_mask, start = inputs
    ours = pagerank_log_importance_flex(q, k, key_mask, torch.log(start), scale=8**-0.5).exp()
    reference = dense_importance(q, k, key_mask, start, scale=8**-0.5)
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_kernel_padded_to_its_bucket_equals_dense(inputs):
    """The CUDA layout (sequence padded to a bucket, padding masked) gives the same scores."""
    q, k, key_mask, start = inputs
    assert flex_bucket(q.shape[2]) > q.shape[2]
    ours = pagerank_log_importance_flex(q, k, key_mask, torch.log(start), scale=8**-0.5, bucketed=True).exp()
    assert ours.shape == (2, 37)
    assert torch.allclose(ours.double(), dense_importance(q, k, key_mask, start, scale=8**-0.5), rtol=1e-4,
                          atol=1e-12)


def sharp_inputs(n=300, heads=4, dim=16, seed=3):
    """Large logits: at T = 0.1 most float32 probabilities of the published formula underflow."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, dim, generator=gen) * 3
    k = torch.randn(1, heads // 2, n, dim, generator=gen) * 3
    mask = torch.ones(1, n, dtype=torch.bool)
    return q, k, mask, mask.float() / n


@pytest.mark.parametrize("kernel", [partial(pagerank_log_importance, chunk_size=128),
                                    partial(pagerank_log_importance_factored, panel_rows=128)], ids=["chunked", "factored"])
def test_log_space_does_not_underflow_and_keeps_the_published_order(kernel):
    q, k, mask, start = sharp_inputs()
    scale = 16**-0.5
    published = dense_importance(q, k, mask, start, scale, dtype=torch.float32)[0]  # float32, as published
    reference = dense_log_importance(q, k, mask, start, scale)[0]
    ours = kernel(q, k, mask, torch.log(start), scale)[0]
    assert (published == 0).sum() > 50  # the premise: many published scores are exactly 0 (tied)
    assert torch.isfinite(ours).all()  # ours are all distinct finite log-scores
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-3)
    assert torch.equal(ours.argsort(descending=True), reference.argsort(descending=True))
    # wherever the published scores are positive and differ, the order is the published one
    distinct = published > 1e-30
    i, j = torch.triu_indices(len(published), len(published), 1)
    pairs = distinct[i] & distinct[j] & ((published[i] - published[j]).abs() > 1e-4 * published[i].max(published[j]))
    assert pairs.sum() > 100
    assert torch.equal((published[i] > published[j])[pairs], (ours[i] > ours[j])[pairs])


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_and_chunked_agree_in_log_space_and_keep_the_same_tokens():
    q, k, mask, start = sharp_inputs(n=200)
    scale = 16**-0.5
    chunked = pagerank_log_importance(q, k, mask, torch.log(start), scale, chunk_size=64)
    flex = pagerank_log_importance_flex(q, k, mask, torch.log(start), scale)
    assert torch.allclose(chunked, flex, rtol=1e-4, atol=1e-3)
    assert torch.equal(chunked.topk(100).indices.sort().values, flex.topk(100).indices.sort().values)


def test_ties_keep_the_earlier_token():
    n = 10
    visual = torch.zeros(1, n, dtype=torch.bool)
    visual[0, 2:8] = True  # visual tokens at 2..7
    state = TokenState.start(torch.zeros(1, n, 1), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), visual,
                             False, num_visual=[6], rows=[n])
    scores = torch.tensor([[9.0, 9.0, 1.0, 5.0, 5.0, 5.0, 2.0, 5.0, 0.0, 0.0]])
    keep, kept = keep_top_visual(state, scores, [2])
    assert kept == [2]
    # of the four visual tokens scoring 5 (positions 3, 4, 5, 7) the two earliest stay; text always stays
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 3, 4, 8, 9]
    scores[0, 3] = float("nan")  # NaN ranks last among candidates, never above a real score
    keep, _ = keep_top_visual(state, scores, [2])
    assert keep[0, 3].item() is False and keep[0, 5].item() is True


def test_log_start_weights_are_uniform_over_real_rows():
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert torch.allclose(log_start_weights(valid).exp(), torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3], [0.25] * 4]))


def test_flex_buckets_are_few_and_cover_the_length():
    lengths = range(1, 32769)
    assert all(n <= flex_bucket(n) <= max(n + 255, 1.25 * n) for n in lengths)  # <= 25% padding above 1024
    assert len({flex_bucket(n) for n in range(1, 12001)}) <= 20
    assert len({flex_bucket(n) for n in lengths}) <= 24


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_passes_are_traced_once_per_bucket(monkeypatch):
    """Compiled with static shapes, the two flex passes are traced once per length bucket, not again
    for every layer (new closures over new tensors) or every length inside the bucket. (The CPU
    cannot compile flex's LSE output, so dynamo traces here without inductor: same guards.)"""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from aim_llava.reduction import importance

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, backend="aot_eager")
    monkeypatch.setattr(importance, "flex_kernel", lambda device_type: compiled)
    gen = torch.Generator().manual_seed(0)
    try:
        counters.clear()
        for n in (300, 290, 300, 260, 700):
            q, k = torch.randn(1, 4, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
            mask = torch.rand(1, n, generator=gen) > 0.1
            log_start = torch.full((1, n), -torch.log(torch.tensor(float(n))).item())
            importance.pagerank_log_importance_flex(q, k, mask, log_start, 0.25, bucketed=True)
        assert counters["stats"]["unique_graphs"] == 2 * len({flex_bucket(n) for n in (300, 290, 260, 700)})
    finally:
        torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_keeps_a_compiled_pair_for_every_length_and_batch_size(monkeypatch):
    """Each (length bucket, batch size) compiles its own pair of flex graphs; dynamo's recompile
    limits grow with the shapes met, so none falls back to the dense implementation (lowered
    limits here stand for the 24 buckets x batch sizes of a server; dynamo fails instead of
    falling back)."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from aim_llava.reduction import importance

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False, backend="eager")
    monkeypatch.setattr(importance, "flex_kernel", lambda device_type: compiled)
    monkeypatch.setattr(importance, "FLEX_SHAPES", set())
    for name, value in (("recompile_limit", 2), ("accumulated_recompile_limit", 2), ("fail_on_recompile_limit_hit", True)):
        monkeypatch.setattr(dynamo_config, name, value)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 100), (2, 100), (1, 300)]
    try:
        counters.clear()
        for batch, n in shapes:
            q, k = torch.randn(batch, 4, n, 16, generator=gen), torch.randn(batch, 2, n, 16, generator=gen)
            valid = torch.ones(batch, n, dtype=torch.bool)
            importance.pagerank_log_importance_flex(q, k, valid, log_start_weights(valid), 0.25, bucketed=True)
        assert counters["stats"]["unique_graphs"] == 2 * len(shapes)
    finally:
        torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_kernel_benchmark_script_compares_every_kernel_with_float32(tmp_path):
    """scripts/bench_importance.py (the GPU plan's 'kernels' phase) on the CPU at small sizes: a
    row per kernel and length, each agreeing with the float32 chunked kernel."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_importance.py"
    report = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, "-W", "ignore", str(script), "--device", "cpu", "--dtype", "float32",
                             "--tokens", "64,100", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                             "--repeats", "1", "--kernels", "factored,chunked,flex", "--json", str(report)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(row["tokens"], row["kernel"]) for row in rows] == [(n, k) for n in (64, 100)
                                                                for k in ("factored", "chunked", "flex")]
    assert all(row["same_top_half"] and row["max_rel_diff"] < 1e-4 and row["warm_ms"] > 0 for row in rows)
    assert all(row["peak_mib"] >= 0 for row in rows)
    assert result.stdout.count("| 64 |") == 3


def scaled_inputs(sharpness, n=300, heads=4, dim=16, seed=3):
    """Logits sharpened by ``sharpness``: PageRank mass concentrates on few rows, so that many
    block sums of the factored kernel would underflow in float32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, dim, generator=gen) * sharpness
    k = torch.randn(1, heads // 2, n, dim, generator=gen) * sharpness
    mask = torch.ones(1, n, dtype=torch.bool)
    return q, k, mask, mask.float() / n


@pytest.mark.parametrize("sharpness, path", [(1.6, "exact_block_sums"), (3.0, "dense_block_sums")])
def test_factored_recomputes_the_block_sums_float32_cannot_trust(sharpness, path, monkeypatch):
    """A few untrusted block sums are recomputed one by one, many (sharp attention) by redoing the
    panel in log space; either way the result is the float64 log-space formula's, and it would not
    be without the repair."""
    q, k, mask, start = scaled_inputs(sharpness)
    reference = dense_log_importance(q, k, mask, start, 0.25)[0]
    calls = []
    original = getattr(factored_importance.PanelMatrix, path)
    monkeypatch.setattr(factored_importance.PanelMatrix, path,
                        lambda self, *args: calls.append(1) or original(self, *args))
    ours = pagerank_log_importance_factored(q, k, mask, start.log(), 0.25, panel_rows=128)[0]
    assert calls  # the premise: this path ran
    assert torch.allclose(ours.double(), reference, rtol=1e-5, atol=1e-3)
    monkeypatch.setattr(factored_importance.HeadGroupPageRank, "repair", lambda self, *args: None)
    unrepaired = pagerank_log_importance_factored(q, k, mask, start.log(), 0.25, panel_rows=128)[0]
    assert not torch.allclose(unrepaired.double(), reference, rtol=1e-5, atol=1e-3)


def test_factored_row_normalisers_of_rows_far_below_their_block(monkeypatch):
    """Rows whose largest logit lies far below their block's (every other query scaled down) get
    their log-normaliser in log space, equal to float64's; the factored sum alone underflows."""
    gen = torch.Generator().manual_seed(4)
    n, dim, scale = 96, 16, 2.5
    q = torch.randn(1, n, dim, generator=gen) * 4
    q[:, 1::2] *= 0.05
    k = torch.randn(n, dim, generator=gen) * 4
    logits = (q[0].double() @ k.double().T * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    reference = torch.logsumexp(logits, dim=-1)

    def normalisers():
        rank = factored_importance.HeadGroupPageRank(q, k[None], torch.ones(n, dtype=torch.bool), scale, panel_rows=64)
        return rank.lse[0, :n]

    assert torch.allclose(normalisers().double(), reference, rtol=1e-6, atol=1e-4)
    monkeypatch.setattr(factored_importance, "TRUSTED_ROW_SUM", 0.0)
    assert not torch.allclose(normalisers().double(), reference, rtol=1e-6, atol=1e-4)


def test_factored_keeps_one_head_group_of_triangle_panels():
    """What one head keeps is the causal triangle in panels (not the square, nor every head): the
    tensors held equal :func:`resident_bytes`, and long inputs go one head at a time."""
    q, k, mask, _ = scaled_inputs(1.0, n=300, heads=2)
    rank = factored_importance.HeadGroupPageRank(q[0], k[0, [0, 0]], mask[0], 0.25, panel_rows=64)
    held = sum(4 * matrix.exps.numel() for matrix in rank.matrices)
    assert held == 2 * factored_importance.resident_bytes(300, 64) < 2 * 4 * 300 * 300 * 0.7
    assert factored_importance.heads_per_group(300, 28) == 28
    assert factored_importance.heads_per_group(9509, 28) == 1  # 192 frames: ~370 MB a head


def test_factored_leaves_heads_beyond_its_memory_budget_to_the_chunked_kernel(inputs, monkeypatch):
    from aim_llava.reduction import importance

    q, k, key_mask, start = inputs
    calls = []
    monkeypatch.setattr(importance, "pagerank_log_importance",
                        lambda *args: calls.append(1) or pagerank_log_importance(*args))
    factored = log_importance(q, k, key_mask, start.log(), 8**-0.5, kernel="factored")
    assert not calls
    monkeypatch.setattr(importance, "FACTORED_HEAD_BUDGET", factored_importance.resident_bytes(37) - 1)
    assert torch.allclose(log_importance(q, k, key_mask, start.log(), 8**-0.5, kernel="factored"), factored,
                          rtol=1e-5)
    assert calls == [1]


def test_overlap_script_compares_every_pruning_layer_with_the_float32_reference(loaded):
    """scripts/importance_overlap.py on the tiny checkpoint: a row per pruning layer; in float32 the
    model's kernel keeps exactly the reference's tokens."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "importance_overlap.py"
    spec = importlib.util.spec_from_file_location("importance_overlap", script)
    overlap = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = overlap  # its dataclasses look their module up
    spec.loader.exec_module(overlap)
    _, model, _, _ = loaded
    rows = overlap.measure(model, {"method": "aim", "prune_start": 1}, frames=2, text_tokens=20)
    assert [row.layer for row in rows] == [1, 2, 3, 4, 5]
    assert all(row.overlap == 1.0 and row.max_abs_diff < 1e-3 for row in rows)
    assert rows[0].visual_kept == int(2 * 49 * 0.875) + 1
    none, some = torch.zeros(6, dtype=torch.bool), torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    assert overlap.kept_overlap(none, none) == 1.0  # a layer that drops every visual token
    assert overlap.kept_overlap(torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool), some) == 2 / 3


def bf16_inputs(n: int = 300, dim: int = 64):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, n, dim, generator=gen).bfloat16()
    k = torch.randn(1, 2, n, dim, generator=gen).bfloat16()
    return q, k, torch.ones(1, n, dtype=torch.bool), torch.full((1, n), 1.0 / n)


def test_factored_in_bfloat16_equals_the_formula_on_the_same_values():
    """bfloat16 q and k (the model's own, on a CPU that runs bfloat16): q k^T goes through oneDNN's
    bfloat16 path, whose products of bfloat16 values are exact in float32; the result equals the
    float64 formula on the same values. Rounding the logits to bfloat16 (a bf16 matmul's output)
    moves the log-scores by ~1e-2."""
    q, k, key_mask, start = bf16_inputs()
    ours = pagerank_log_importance_factored(q, k, key_mask, start.log(), 64**-0.5)
    reference = dense_log_importance(q, k, key_mask, start, scale=64**-0.5)
    assert torch.allclose(ours.double(), reference, rtol=0, atol=2e-4), (ours.double() - reference).abs().max()


def test_only_q_k_products_run_in_the_bfloat16_matmul_mode(monkeypatch):
    """oneDNN's bfloat16 mode rounds every float32 factor to bfloat16: the products of the
    exponentials with the PageRank weights (torch.bmm) must run outside it, q k^T inside it."""
    precision = torch.backends.mkldnn.matmul
    before = precision.fp32_precision
    seen: dict[str, set[str]] = {"bmm": set(), "matmul": set()}
    for name in seen:
        original = getattr(torch, name)

        def recording(*args, name=name, original=original, **kwargs):
            seen[name].add(precision.fp32_precision)
            return original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    q, k, key_mask, start = bf16_inputs(n=100)
    pagerank_log_importance_factored(q, k, key_mask, start.log(), 64**-0.5)
    assert seen["bmm"] == {before} and before != "bf16"
    assert seen["matmul"] == ({"bf16"} if torch.backends.mkldnn.is_available() else {before})
    assert precision.fp32_precision == before
