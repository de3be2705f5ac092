"""Decoding with the preallocated cache and the fixed-shape step: equal to recomputing the whole
sequence for every preset and in padded batches; sampling on the device, reproducible and with
the right distribution; stopping, padding and streaming."""

import logging

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames
from fake_cuda import EmptyGraph, FakeCuda, RecordingGraph, ToyStep

from aim_llava.capabilities import RUNTIME_FALLBACKS
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.errors import InputError
from aim_llava.model.language_model import llava_qwen
from aim_llava.model.language_model.generation import (
    EAGER_STEPS_BEFORE_CAPTURE,
    GRAPH_FALLBACK,
    MIN_GRAPHED_TOKENS,
    DecodingGraphs,
    GraphCaptureError,
    GraphedStep,
    GraphMemory,
    SamplingParams,
    pick_tokens,
    run_decoding,
)
from aim_llava.reduction.config import available_presets

GEN = dict(max_new_tokens=6, eos_token_id=[])


@pytest.fixture(autouse=True)
def no_failures_yet(monkeypatch):
    """Each test starts in a process where no runtime fallback (CUDA-graph decoding's included) has fired."""
    monkeypatch.setattr(RUNTIME_FALLBACKS, "failed", {})


@pytest.fixture(scope="module")
def batch(loaded):
    tokenizer, _, processor, _ = loaded
    videos = [processor.preprocess(random_frames(n, 48, 64, seed=40 + n))["pixel_values"] for n in (4, 2)]
    prompts = [prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What do the people do next?")]
    return prompts, videos


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_decodes_like_recomputation_in_a_padded_batch(loaded, batch, preset):
    _, model, _, _ = loaded
    reduction = plan(model, preset)
    prompts, videos = batch
    ids, mask = left_padded_batch(prompts)
    kwargs = dict(attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction, **GEN)
    cached = model.generate(ids, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))
    for i in range(2):
        single = model.generate(prompts[i], images=[videos[i]], modalities=["video"], reduction=reduction, **GEN)
        assert torch.equal(cached[i], single[0])


def graphed_runner(monkeypatch, strict: bool = True, device: str = "cuda:1") -> list[GraphedStep]:
    """Make generate decode through :class:`GraphedStep` on the CPU (with tests/fake_cuda.py's
    stand-ins installed); returns the list of the steps made."""
    steps = []

    def runner(function, *_):
        steps.append(GraphedStep(function, torch.device(device), strict=strict))
        return steps[-1]

    monkeypatch.setattr(llava_qwen, "step_runner", runner)
    return steps


@pytest.mark.parametrize("preset", available_presets())
def test_a_step_captured_once_and_replayed_decodes_like_eager(loaded, batch, preset, monkeypatch):
    """GraphedStep's own capture, check and replay, through a CPU graph that records the step's
    operators once, with every host value baked in, refusing what a capture refuses (host reads,
    data-dependent shapes), and replays them (tests/fake_cuda.py): the contract GraphedStep relies
    on, that the step's effect depends only on its tensor inputs and the cache's buffers, holds for
    every preset in a padded batch."""
    _, model, _, _ = loaded
    prompts, videos = batch
    ids, mask = left_padded_batch(prompts)
    kwargs = dict(attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=plan(model, preset),
                  max_new_tokens=12, eos_token_id=[])
    eager = model.generate(ids, **kwargs)
    cuda = FakeCuda(monkeypatch)
    steps = graphed_runner(monkeypatch)
    assert torch.equal(model.generate(ids, **kwargs), eager)
    # 11 steps after the prefill's token: 4 eager, 1 captured, 1 checked by a replay, 5 replayed;
    # the graph is ended with the generation
    (graph,) = cuda.graphs
    assert steps[0].checked and graph.replays == 12 - 1 - EAGER_STEPS_BEFORE_CAPTURE - 1
    assert graph.was_reset and steps[0].graph is None


def test_a_capture_that_records_nothing_is_caught_by_its_check(loaded, batch, monkeypatch, caplog):
    """A graph that captured nothing (as on a stream of another GPU: the step ran eagerly during
    the capture and replays do nothing) would give the capture step's logits forever; its checked
    replay fails instead: decoding goes on eagerly, with a warning, and equals eager decoding; in
    strict mode it raises."""
    _, model, _, _ = loaded
    prompts, videos = batch
    kwargs = dict(images=[videos[0]], modalities=["video"], max_new_tokens=10, eos_token_id=[])
    eager = model.generate(prompts[0], **kwargs)
    cuda = FakeCuda(monkeypatch, graph=EmptyGraph)
    steps = graphed_runner(monkeypatch, strict=False)
    with caplog.at_level(logging.WARNING, logger="aim_llava.model.language_model.generation"):
        assert torch.equal(model.generate(prompts[0], **kwargs), eager)
    assert steps[0].eager and steps[0].graph is None and cuda.graphs[0].replays == 1
    assert "eager decoding takes its place" in caplog.text and "away from the eager step" in caplog.text
    assert list(RUNTIME_FALLBACKS.failed) == [GRAPH_FALLBACK]
    graphed_runner(monkeypatch, strict=True)
    with pytest.raises(GraphCaptureError, match="away from the eager step"):
        model.generate(prompts[0], **kwargs)


HOST_READS = {"tolist": lambda b: b.tolist(), "item": lambda b: b.sum().item(), "bool": lambda b: bool(b.any()),
              "nonzero": lambda b: b.nonzero(), "where": lambda b: torch.where(b > 0),
              "mask_index": lambda b: b[b > 0], "mask_assign": lambda b: b.__setitem__(b > 1e9, 0.0),
              "equal": lambda b: torch.equal(b, b), "to_host": lambda b: b.to("cpu")}


@pytest.mark.parametrize("read", HOST_READS, ids=str)
def test_a_step_that_reads_the_host_is_refused_by_the_capture(read, monkeypatch, caplog):
    """What a CUDA-graph capture refuses, the CPU stand-in refuses too; GraphedStep then decodes
    eagerly (the same outputs as eager steps) with a warning, or raises in strict mode."""
    FakeCuda(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, generator=gen) for _ in range(6)]
    step = GraphedStep(ToyStep(HOST_READS[read]), torch.device("cuda:1"), eager_steps=1)
    with caplog.at_level(logging.WARNING, logger="aim_llava.model.language_model.generation"):
        outputs = [step(values, torch.tensor([number])) for number, values in enumerate(inputs)]
    assert step.eager and "synchronises with the host" in caplog.text
    assert all(torch.equal(out, expected) for out, expected in zip(outputs, ToyStep().expected(inputs)))
    strict = GraphedStep(ToyStep(HOST_READS[read]), torch.device("cuda:1"), strict=True, eager_steps=0)
    with pytest.raises(GraphCaptureError, match="synchronises with the host"):
        strict(inputs[0], torch.tensor([0]))


def test_a_toy_step_replays_like_eager_from_static_inputs(monkeypatch):
    """Replays copy each call's inputs into the captured static tensors: the outputs equal eager
    steps at every call, and the capture comes after the eager steps."""
    cuda = FakeCuda(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, generator=gen) for _ in range(6)]
    step = GraphedStep(ToyStep(), torch.device("cuda:1"), strict=True, eager_steps=2)
    outputs = []
    for number, values in enumerate(inputs):
        outputs.append(step(values, torch.tensor([number])).clone())
        assert len(cuda.graphs) == (number >= 2)  # captured at the third call
    assert all(torch.equal(out, expected) for out, expected in zip(outputs, ToyStep().expected(inputs)))
    assert cuda.graphs[0].replays == 1 + 2  # the check at call 4, then calls 5 and 6


class HostSlotStep(ToyStep):
    """A step that takes its cache slot from a Python attribute its caller sets before each call,
    not from its tensor input: a capture bakes the captured step's slot in."""

    slot = 0

    def __call__(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return super().__call__(values, torch.tensor([self.slot]))


def test_a_value_baked_in_at_capture_is_caught_by_the_check_with_fresh_inputs(monkeypatch):
    """The check replays with the next step's inputs: a graph that replays the captured step's
    slot (right for the captured inputs only) disagrees with the eager step there."""
    FakeCuda(monkeypatch)
    function = HostSlotStep()
    step = GraphedStep(function, torch.device("cuda:1"), strict=True, eager_steps=2)
    gen = torch.Generator().manual_seed(2)
    for number in range(3):  # two eager steps, then the captured one
        function.slot = number
        step(torch.randn(3, generator=gen), torch.tensor([number]))
    function.slot = 3
    with pytest.raises(GraphCaptureError, match="later step's inputs"):
        step(torch.randn(3, generator=gen), torch.tensor([3]))


class OneUlpOffGraph(RecordingGraph):
    """A replay whose result is one float32 step away from the eager one's."""

    def replay(self) -> None:
        super().replay()
        result = self.operations[-1][3]
        result.copy_(torch.nextafter(result, result + 1))


def test_a_replay_must_equal_the_eager_step_bit_for_bit(monkeypatch):
    """Same kernels, same stream, same inputs: a replay is bit-identical to the eager step, so the
    check tolerates no difference at all."""
    FakeCuda(monkeypatch, graph=OneUlpOffGraph)
    step = GraphedStep(ToyStep(), torch.device("cuda:1"), strict=True, eager_steps=0)
    step(torch.ones(3), torch.tensor([0]))
    with pytest.raises(GraphCaptureError, match="away from the eager step"):
        step(torch.ones(3), torch.tensor([1]))


GPU1 = torch.device("cuda:1")


def generate_on_fake_gpu(model, monkeypatch, calls: int, tokenizer) -> list:
    """``calls`` text-only generate calls whose decoding step goes through the real
    :func:`step_runner` as if the model were on ``cuda:1`` (tests/fake_cuda.py's stand-ins must be
    installed); returns the steps made. One thread: the tiny model's small operators are many
    times faster so on a busy machine."""
    real_runner = llava_qwen.step_runner
    steps = []

    def on_gpu1(function, device, use_graph, max_new_tokens, graphs):
        steps.append(real_runner(function, GPU1, use_graph, max_new_tokens, graphs))
        return steps[-1]

    monkeypatch.setattr(llava_qwen, "step_runner", on_gpu1)
    ids = prompt_ids(tokenizer, "Hi.", num_images=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(calls):
            model.generate(ids, max_new_tokens=MIN_GRAPHED_TOKENS + 1, eos_token_id=[])
    finally:
        torch.set_num_threads(threads)
    return steps


def test_fifty_generations_share_one_graph_pool_and_one_side_stream(loaded, monkeypatch):
    """Each generate call captures its own graph, but every capture records on the model's one
    side stream for the device into its one memory pool (made under that device), and each graph
    is ended with its call, so the pool's blocks are reused instead of piling up."""
    tokenizer, model, _, _ = loaded
    monkeypatch.setattr(model, "decoding_graphs", DecodingGraphs())
    cuda = FakeCuda(monkeypatch)
    steps = generate_on_fake_gpu(model, monkeypatch, 50, tokenizer)
    memory = model.decoding_graphs.on(GPU1)
    (pool,) = cuda.pools
    assert cuda.streams == [GPU1] and memory.stream.device == GPU1 and pool.device == GPU1
    assert len(cuda.graphs) == 50 and all(step.checked for step in steps)
    assert all(graph.pool == pool.id and graph.stream is memory.stream and graph.was_reset for graph in cuda.graphs)
    assert not memory.lock.locked()


def test_a_failed_capture_is_not_tried_again(loaded, monkeypatch, caplog):
    """After a capture whose check fails, CUDA-graph decoding is written off for the process: the
    next calls decode eagerly without capturing again, after one warning."""
    tokenizer, model, _, _ = loaded
    monkeypatch.setattr(model, "decoding_graphs", DecodingGraphs())
    cuda = FakeCuda(monkeypatch, graph=EmptyGraph)
    steps = generate_on_fake_gpu(model, monkeypatch, 4, tokenizer)
    assert len(cuda.graphs) == 1 and isinstance(steps[0], GraphedStep) and steps[0].eager
    assert not any(isinstance(step, GraphedStep) for step in steps[1:])
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_generation_that_finds_the_graph_memory_in_use_decodes_eagerly(monkeypatch):
    """Two generations on one device cannot capture on one stream into one pool at once: the one
    that comes second decodes eagerly (the same outputs), or raises in strict mode."""
    cuda = FakeCuda(monkeypatch)
    memory = GraphMemory(GPU1)
    assert memory.claim()
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(3, generator=gen) for _ in range(4)]
    step = GraphedStep(ToyStep(), GPU1, eager_steps=1, memory=memory)
    outputs = [step(values, torch.tensor([number])).clone() for number, values in enumerate(inputs)]
    assert all(torch.equal(out, expected) for out, expected in zip(outputs, ToyStep().expected(inputs)))
    assert cuda.graphs == [] and step.eager and RUNTIME_FALLBACKS.failed == {}
    strict = GraphedStep(ToyStep(), GPU1, strict=True, eager_steps=0, memory=memory)
    with pytest.raises(GraphCaptureError, match="another generation"):
        strict(inputs[0], torch.tensor([0]))
    memory.release()
    assert memory.claim()


def test_a_torch_that_cannot_make_the_graph_pool_decodes_eagerly(monkeypatch, caplog):
    """Making the pool raising (a torch without MemPool): the same outputs, eagerly, with the one
    fallback warning, and the device's graph memory is not left held."""
    FakeCuda(monkeypatch)

    def no_pool(*args, **kwargs):
        raise RuntimeError("MemPool is not supported by this build")

    monkeypatch.setattr(torch.cuda, "MemPool", no_pool)
    memory = GraphMemory(GPU1)
    inputs = [torch.full((3,), float(number)) for number in range(4)]
    step = GraphedStep(ToyStep(), GPU1, eager_steps=1, memory=memory)
    outputs = [step(values, torch.tensor([number])).clone() for number, values in enumerate(inputs)]
    assert all(torch.equal(out, expected) for out, expected in zip(outputs, ToyStep().expected(inputs)))
    assert list(RUNTIME_FALLBACKS.failed) == [GRAPH_FALLBACK] and "MemPool is not supported" in caplog.text
    assert not memory.lock.locked() and memory.stream is None


def test_a_reply_that_ends_early_is_never_captured(loaded, batch, monkeypatch):
    """Capture waits for a few eager steps: a reply that reaches EOS within them costs no
    capture, and gives the same tokens."""
    _, model, _, _ = loaded
    prompts, videos = batch
    kwargs = dict(images=[videos[0]], modalities=["video"], max_new_tokens=20)
    eager = model.generate(prompts[0], eos_token_id=[], **kwargs)
    eos = int(eager[0, EAGER_STEPS_BEFORE_CAPTURE])  # the token the last eager step gives
    first_eos = eager[0].tolist().index(eos)
    cuda = FakeCuda(monkeypatch)
    graphed_runner(monkeypatch)
    ended = model.generate(prompts[0], eos_token_id=[eos], **kwargs)
    assert ended[0].tolist() == eager[0, : first_eos + 1].tolist()
    assert cuda.graphs == []


def test_bench_decode_rate_leaves_out_the_graph_capture():
    """20 steps of a batch of 4 in 1.5 s, 0.5 s of which captured the graph and checked it while
    running two steps: 18 steps x 4 tokens in the other second. Without a capture every step
    counts."""
    from aim_llava.bench import decode_rate

    assert decode_rate({"decode": 1.5, "graph_capture": 0.5}, 20, 4) == 72.0
    assert decode_rate({"decode": 2.0}, 20, 4) == 40.0
    assert decode_rate({"decode": 1.0, "graph_capture": 0.4}, 2, 1) == decode_rate({"decode": 0.1}, 0, 1) == 0.0


def test_sampling_is_reproducible_with_a_seeded_generator(loaded, batch):
    _, model, _, _ = loaded
    prompts, videos = batch

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompts[0], images=[videos[0]], modalities=["video"], max_new_tokens=12, eos_token_id=[],
                              do_sample=True, temperature=1.5, generator=generator)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("top_p, expected", [(None, [0.1, 0.2, 0.3, 0.4]), (0.5, [0.0, 0.0, 3 / 7, 4 / 7])])
def test_device_sampler_draws_from_the_distribution(top_p, expected):
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(40000, 4)
    generator = torch.Generator().manual_seed(0)
    tokens = pick_tokens(logits, SamplingParams(True, 1.0, top_p, generator))
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(frequencies, torch.tensor(expected), atol=0.01)
    assert torch.equal(pick_tokens(logits[:3], SamplingParams()), torch.tensor([3, 3, 3]))  # greedy


def test_stop_pad_and_stream():
    """Sample 0 emits EOS (id 9) at step 1, sample 1 at step 3: sample 0 is padded afterwards and
    decoding stops after step 3; the streamer sees exactly the returned steps."""
    script = [[1, 2], [9, 4], [5, 6], [7, 9], [8, 8]]

    def logits_for(step):
        rows = torch.full((2, 12), -1.0)
        rows[0, script[step][0]] = rows[1, script[step][1]] = 1.0
        return rows

    seen = []

    class Streamer:
        def put(self, tokens):
            seen.append(tokens.tolist())

    decoded = run_decoding(logits_for(0), lambda tokens, step: logits_for(step + 1), 5, torch.tensor([9]), 0,
                           SamplingParams(), Streamer())
    out, calls = decoded.tokens, decoded.steps
    assert decoded.broken_rows == [] and out.tolist() == [[1, 9, 0, 0], [2, 4, 6, 9]]
    assert seen == [[1, 2], [9, 4], [0, 6], [0, 9]] and calls == 3


def scripted(script, vocab=12):
    """Logits whose argmax at step s is script[s][b] for sample b."""
    def logits_for(step):
        rows = torch.full((len(script[step]), vocab), -1.0)
        for row, token in enumerate(script[step]):
            rows[row, token] = 1.0
        return rows

    return logits_for


def test_samples_end_at_their_own_limit_and_the_batch_stops_when_all_have():
    """Sample 0 may have 2 tokens and never emits EOS; sample 1 (limit 6) emits EOS (9) at step 3.
    Decoding stops after step 3, not at the batch's longest limit, and sample 0 is padded after
    its second token."""
    logits_for = scripted([[1, 2], [3, 4], [5, 6], [7, 9], [8, 8], [8, 8]])
    decoded = run_decoding(logits_for(0), lambda tokens, step: logits_for(step + 1), 6, torch.tensor([9]), 0,
                           SamplingParams(), row_limits=torch.tensor([2, 6]))
    out, calls = decoded.tokens, decoded.steps
    assert out.tolist() == [[1, 3, 0, 0], [2, 4, 6, 9]] and calls == 3


def test_cancelled_samples_end_where_they_are():
    """Sample 1 is cancelled after its second token (the check is asked after each step) and
    sample 0 after its fourth: both are padded from then on and decoding stops there, long
    before EOS or the limit; each sample is named once."""
    logits_for = scripted([[1, 2]] * 10)
    asked, named = [], []

    def cancelled_rows():
        asked.append(len(asked))
        rows = {1: [1], 3: [0]}.get(len(asked) - 1, [])
        named.extend(rows)
        return rows

    decoded = run_decoding(logits_for(0), lambda tokens, step: logits_for(step + 1), 10, torch.tensor([9]), 0,
                           SamplingParams(), cancelled_rows=cancelled_rows)
    out, calls = decoded.tokens, decoded.steps
    assert out.tolist() == [[1, 1, 1, 1], [2, 2, 0, 0]] and calls == 3 and named == [1, 0]


def test_per_sample_limits_give_each_samples_own_tokens(loaded, batch):
    """A batch with limits [3, 9] gives each sample the tokens it gets alone with its limit (the
    oracle: greedy decoding of that sample by itself)."""
    _, model, _, _ = loaded
    prompts, videos = batch
    ids, mask = left_padded_batch(prompts)
    together = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2,
                              max_new_tokens=[3, 9], eos_token_id=[])
    for row, limit in enumerate([3, 9]):
        alone = model.generate(prompts[row], images=[videos[row]], modalities=["video"], max_new_tokens=limit,
                               eos_token_id=[])
        assert together[row, :limit].tolist() == alone[0].tolist()
    assert together[0, 3:].eq(model.generation_defaults.pad_token_id).all() and together.shape[1] == 9
    with pytest.raises(InputError, match="one value, or one per sample"):
        model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2, max_new_tokens=[3])


def test_new_tokens_beyond_the_context_are_refused(loaded):
    tokenizer, model, _, _ = loaded
    ids = prompt_ids(tokenizer, "Hi", num_images=0)
    with pytest.raises(InputError, match="exceeds the model's context"):
        model.generate(ids, max_new_tokens=10**12)


@pytest.mark.parametrize("preset", ["baseline", "aim_default", "aim_prune_only"])
def test_kv_cache_holds_each_layers_own_tokens_plus_the_new_ones(loaded, batch, preset):
    """The bytes reported equal, layer by layer, the tokens that entered the layer (from the
    record) plus max_new_tokens, rounded up to 16 slots, in keys and values of the model's shape."""
    _, model, _, _ = loaded
    prompts, videos = batch
    text = (prompts[0] != IMAGE_TOKEN_INDEX).sum().item()  # the video placeholder is replaced by its tokens
    out = model.generate(prompts[0], images=[videos[0]], modalities=["video"], reduction=plan(model, preset),
                         return_dict_in_generate=True, **GEN)
    config = model.config.text
    head_dim = config.hidden_size // config.num_attention_heads
    slot_bytes = 2 * config.num_key_value_heads * head_dim * 4 + 1  # float32 key and value, one validity flag
    slots = [-(-(visual[0] + text + GEN["max_new_tokens"]) // 16) * 16 for visual in out.reduction.visual_tokens_per_layer]
    assert out.kv_cache_bytes == slot_bytes * sum(slots)
    if preset != "baseline":
        reference = model.generate(prompts[0], images=[videos[0]], modalities=["video"], return_dict_in_generate=True,
                                   **GEN)
        assert out.kv_cache_bytes < reference.kv_cache_bytes
