"""Non-finite values never leave as an answer: a checkpoint whose float16 activations overflow
(float32 stays finite) stops with one line naming the dtype and what to do, in the Python API and
on the command line (an error record, exit code 2); in a batch only the affected sample fails;
NaN importance scores flag their sample the same way. ``dtype=auto`` keeps float16 on a GPU
without bfloat16, and this check is what makes an overflow there an error instead of garbage."""

import json

import numpy as np
import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames
from PIL import Image
from safetensors.torch import load_file, save_file

from aim_llava.cli import main
from aim_llava.errors import NonFiniteOutputError
from aim_llava.model.builder import checkpoint_config, load_pretrained_model, resolve_dtype
from aim_llava.model.language_model.generation import SamplingParams, run_decoding
from aim_llava.pipeline import Request, VideoLLM
from aim_llava.reduction.methods.aim import AimPruner
from aim_llava.reduction.tokens import TokenState, keep_top_visual
from aim_llava.tiny_checkpoint import write_tiny_checkpoint
from aim_llava.video import VideoClip

OVERFLOWING = "model.layers.0.mlp.down_proj.weight"
SCALE = 1e6  # layer 0's MLP output reaches ~1e6: inf in float16 (max 65504), harmless in float32


@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory):
    """The tiny checkpoint with layer 0's MLP output scaled up a million times, said to be
    bfloat16 as the published Qwen2 checkpoints are (its weights are float32)."""
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("overflowing"))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    scaled = 0
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        if OVERFLOWING in tensors:
            tensors[OVERFLOWING] = tensors[OVERFLOWING] * SCALE
            save_file(tensors, shard, metadata={"format": "pt"})
            scaled += 1
    assert scaled == 1
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def image_prompt(dtype: str, overflowing_dir):
    tokenizer, model, processor, _ = load_pretrained_model(overflowing_dir, device_map="cpu", torch_dtype=dtype)
    pixels = processor.preprocess(random_frames(1, 64, 64))["pixel_values"]
    return model, prompt_ids(tokenizer, "What is it?"), dict(images=[pixels], modalities=["image"])


def test_auto_keeps_float16_below_sm80_where_the_overflow_is_an_error_not_an_answer(monkeypatch, overflowing_dir):
    """On a T4 (sm_75, no bfloat16) ``auto`` loads float16; there this checkpoint's logits are NaN
    (shown here by the forward pass), and generate raises the one line instead of answering token
    0 forever. In float32, the dtype the line advises, the same checkpoint answers: its logits are
    finite and its cached decoding equals the recomputation of the whole sequence."""
    from aim_llava.capabilities import device_capabilities

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    device_capabilities.cache_clear()
    try:
        on_t4 = resolve_dtype("auto", checkpoint_config(overflowing_dir), torch.device("cuda:0"))
    finally:
        device_capabilities.cache_clear()
    assert on_t4 == torch.float16
    model, ids, visual = image_prompt("float16", overflowing_dir)
    assert not torch.isfinite(model(ids, **visual).logits).all()
    with pytest.raises(NonFiniteOutputError) as raised:
        model.generate(ids, max_new_tokens=4, eos_token_id=[], **visual)
    message = str(raised.value)
    assert "\n" not in message and "in float16" in message and "--dtype float32" in message
    assert "bfloat16 on a GPU" in message and raised.value.rows == [0]
    model, ids, visual = image_prompt("float32", overflowing_dir)
    assert torch.isfinite(model(ids, **visual).logits).all()
    cached = model.generate(ids, max_new_tokens=4, eos_token_id=[], **visual)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=4, eos_token_id=[], use_cache=False, **visual))


def test_the_cli_case_is_an_error_record_and_exit_code_2(capsys, overflowing_dir, image):
    """``aim-llava ask img.png "What is it?" --dtype float16 --json`` exited 0 with empty text."""
    code = main(["ask", str(image), "What is it?", "--model", str(overflowing_dir), "--dtype", "float16", "--json",
                 "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 2
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["text"] is None and "in float16" in record["error"] and "--dtype float32" in record["error"]
    errors = [line for line in err.splitlines() if line.startswith("aim-llava: error:")]
    assert len(errors) == 1 and "--dtype float32" in errors[0] and "Traceback" not in err
    code = main(["ask", str(image), "What is it?", "--model", str(overflowing_dir), "--dtype", "float32", "--json",
                 "--max-new-tokens", "4"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["error"] is None


def scripted_logits(script: list[list[float]], vocab: int = 8):
    """Logits whose argmax at step s is token 3 for every sample, except NaN (or inf) where
    ``script[s][b]`` says so."""
    def logits_for(step: int) -> torch.Tensor:
        rows = torch.full((len(script[step]), vocab), -1.0)
        rows[:, 3] = 1.0
        for row, value in enumerate(script[step]):
            if value != 0:
                rows[row, 5] = value
        return rows

    return logits_for


def test_a_sample_whose_logits_go_non_finite_is_ended_and_named_alone():
    """Sample 1's logits hold a NaN at step 2, sample 2's an inf at step 3 after it emitted EOS
    (its reply had ended: not a failure); sample 0 stays finite and goes on to its limit. Sample 1
    is padded from step 2 (not token argmax-of-NaN), and only it is named."""
    nan, inf = float("nan"), float("inf")
    script = [[0, 0, 0], [0, 0, 0], [0, nan, 0], [0, 0, inf], [0, 0, 0], [0, 0, 0]]
    eos_at_step_1 = scripted_logits(script)

    def next_logits(tokens, step):
        logits = eos_at_step_1(step + 1)
        if step == 0:
            logits[2, 7] = 2.0  # sample 2 emits EOS (7) at step 1
        return logits

    decoded = run_decoding(eos_at_step_1(0), next_logits, 6, torch.tensor([7]), 0, SamplingParams())
    assert decoded.broken_rows == [1]
    assert decoded.tokens.tolist() == [[3, 3, 3, 3, 3, 3], [3, 3, 0, 0, 0, 0], [3, 7, 0, 0, 0, 0]]


def test_a_prefill_flag_ends_its_sample_before_its_first_token():
    """A sample flagged by its prefill (NaN importance) gets no token at all, the others decode."""
    logits_for = scripted_logits([[0, 0]] * 3)
    decoded = run_decoding(logits_for(0), lambda tokens, step: logits_for(step + 1), 3, torch.tensor([7]), 0,
                           SamplingParams(), broken=torch.tensor([False, True]))
    assert decoded.broken_rows == [1] and decoded.tokens.tolist() == [[3, 3, 3], [0, 0, 0]]


def test_nan_importance_of_a_candidate_flags_its_sample_only():
    """keep_top_visual sees sample 1's scores with a NaN on a live visual token: sample 1 is
    flagged; a NaN on sample 0's text token (not a candidate) and -inf scores flag nothing."""
    valid = torch.ones(2, 6, dtype=torch.bool)
    visual = torch.tensor([[False, True, True, True, False, False]] * 2)
    state = TokenState.start(torch.zeros(2, 6, 4), torch.arange(6).expand(2, 6), valid, visual, False, [3, 3])
    scores = torch.tensor([[float("nan"), 1.0, -float("inf"), 0.5, 0.0, 0.0],
                           [0.0, 1.0, float("nan"), 0.5, 0.0, 0.0]])
    keep, kept = keep_top_visual(state, scores, [2, 2])
    assert state.nonfinite_scores.tolist() == [False, True] and kept == [2, 2]
    assert keep[0].tolist() == [True, True, False, True, True, True]  # the finite scores still rank


def test_in_a_batch_only_the_sample_with_nan_importance_fails(loaded, monkeypatch):
    """A batch of two under aim_default whose PageRank importance is NaN for sample 1: the
    pipeline gives sample 0 the answer it gets alone and sample 1 the one line, from one generate
    call (the batch is not answered again one by one)."""
    tokenizer, model, processor, _ = loaded
    llm = VideoLLM(tokenizer, model, processor, "aim_default", cache_mb=0)
    clips = [VideoClip(random_frames(2, 48, 64, seed=seed), [0, 1], [0.0, 1.0], 2.0, 1.0, f"clip{seed}")
             for seed in (1, 2)]
    requests = [Request(clip, [("What happens?", None)], max_new_tokens=4) for clip in clips]
    alone = list(llm.run(requests[:1]))[0].response.text
    importance, calls = AimPruner.importance, []

    def nan_for_sample_1(self, state, attention):
        scores = importance(self, state, attention).clone()
        scores[1] = float("nan")
        return scores

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    generate = model.generate
    monkeypatch.setattr(AimPruner, "importance", nan_for_sample_1)
    monkeypatch.setattr(model, "generate", counted)
    first, second = llm.run(requests, batch_size=2)
    assert first.error is None and first.response.text == alone
    assert isinstance(second.error, NonFiniteOutputError) and "NaN/infinite in float32" in str(second.error)
    assert len(calls) == 1


def test_nan_importance_in_generate_names_the_sample(loaded, monkeypatch):
    """The model's own generate: sample 1's NaN importance ends it, and the error carries
    sample 0's tokens, equal to the batch's without the NaN."""
    tokenizer, model, processor, _ = loaded
    reduction = plan(model, "aim_default")
    videos = [processor.preprocess(random_frames(2, 48, 64, seed=seed))["pixel_values"] for seed in (1, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe."), prompt_ids(tokenizer, "What happens next?")])
    kwargs = dict(attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction, max_new_tokens=4,
                  eos_token_id=[])
    healthy = model.generate(ids, **kwargs)
    importance = AimPruner.importance

    def nan_for_sample_1(self, state, attention):
        scores = importance(self, state, attention).clone()
        scores[1] = float("nan")
        return scores

    monkeypatch.setattr(AimPruner, "importance", nan_for_sample_1)
    with pytest.raises(NonFiniteOutputError) as raised:
        model.generate(ids, **kwargs)
    assert raised.value.rows == [1]
    assert torch.equal(raised.value.partial.sequences[0], healthy[0])
    assert raised.value.partial.sequences[1].tolist() == [0] * raised.value.partial.sequences.shape[1]
