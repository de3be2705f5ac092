"""A tiny checkpoint whose replies are known: it answers with the letter its prompt's keyword
stands for, so accuracy tests see right and wrong answers instead of random text.

The tiny random checkpoint is rewired by hand. Text tokens embed to zero except in a few
reserved dimensions: a keyword has a "keyword" flag and a one-hot of which keyword it is, a
letter a "letter" flag; the projector and the newline write nothing there. Only layer 0's
attention contributes to the residual stream: its queries are a constant and its keys the keyword
flag (on the slowest rotary pair, so position barely matters), so every token attends to the
keyword; the values carry its one-hot into the "answer" dimensions. The LM head reads the answer
dimensions into the letters' logits and the letter flag into <|im_end|>'s: after the prompt the
model says the keyword's letter, after that letter it stops. The vision tower and projector run
as usual; they just do not change the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from aim_llava.tiny_checkpoint import TINY_TEXT, build_tokenizer, write_shards, write_tiny_checkpoint

KEYWORD_FLAG, LETTER_FLAG = 0, 1
ONE_HOT = 2  # dims 2.. : which keyword
ANSWER = 32  # dims 32.. : the answer's one-hot after layer 0
SLOW_PAIR = 7  # rotary pair (7, 15) of a 16-dim head turns by 5.6e-6 rad per position
SCRIPT = {"dog": "A", "cat": "B", "car": "C", "ball": "D"}  # keyword -> the letter said


def write_scripted_checkpoint(out: str | Path, script: dict[str, str] = SCRIPT) -> Path:
    """The tiny checkpoint (seed 0) answering ``script[keyword]`` (a letter) to a prompt that holds
    ``keyword`` (one word of the tiny vocabulary, e.g. "dog") once."""
    out = write_tiny_checkpoint(out, "llava_qwen", seed=0)
    tokenizer = build_tokenizer(0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    state = {name: tensor for file in files for name, tensor in load_file(str(out / file)).items()}

    hidden, heads, kv_heads = TINY_TEXT["hidden_size"], TINY_TEXT["num_attention_heads"], TINY_TEXT["num_key_value_heads"]
    head_dim = hidden // heads
    reserved = [KEYWORD_FLAG, LETTER_FLAG, *range(ONE_HOT, ONE_HOT + len(script)),
                *range(ANSWER, ANSWER + len(script))]
    embed = torch.zeros_like(state["model.embed_tokens.weight"])
    lm_head = torch.zeros_like(state["lm_head.weight"])
    for number, (keyword, letter) in enumerate(script.items()):
        keyword_id = single_token(tokenizer, " " + keyword)
        letter_id = single_token(tokenizer, letter)
        embed[keyword_id, KEYWORD_FLAG] = embed[keyword_id, ONE_HOT + number] = 1.0
        embed[letter_id, LETTER_FLAG] = 1.0
        lm_head[letter_id, ANSWER + number] = 1.0
    lm_head[tokenizer.convert_tokens_to_ids("<|im_end|>"), LETTER_FLAG] = 10.0
    state["model.embed_tokens.weight"], state["lm_head.weight"] = embed, lm_head
    state["model.norm.weight"] = torch.ones(hidden)
    for name in ("model.mm_projector.2.weight", "model.mm_projector.2.bias", "model.image_newline"):
        state[name][reserved] = 0.0

    for layer in range(TINY_TEXT["num_hidden_layers"]):
        state[f"model.layers.{layer}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{layer}.mlp.down_proj.weight"].zero_()
    prefix = "model.layers.0."
    state[prefix + "input_layernorm.weight"] = torch.ones(hidden)
    q_bias, k_weight, v_weight = torch.zeros(heads * head_dim), torch.zeros(kv_heads * head_dim, hidden), \
        torch.zeros(kv_heads * head_dim, hidden)
    # A keyword's normalised flag is sqrt(32) = 5.7: logit 5 * 5.7 * 5.7 / sqrt(16) = 40 over 0.
    q_bias[SLOW_PAIR::head_dim] = 5.0
    k_weight[SLOW_PAIR::head_dim, KEYWORD_FLAG] = 1.0
    o_weight = torch.zeros(hidden, heads * head_dim)
    for number in range(len(script)):
        v_weight[number::head_dim, ONE_HOT + number] = 1.0
        o_weight[ANSWER + number, number::head_dim] = 1.0 / heads
    state[prefix + "self_attn.q_proj.weight"] = torch.zeros(heads * head_dim, hidden)
    state[prefix + "self_attn.q_proj.bias"] = q_bias
    state[prefix + "self_attn.k_proj.weight"], state[prefix + "self_attn.k_proj.bias"] = k_weight, torch.zeros(len(k_weight))
    state[prefix + "self_attn.v_proj.weight"], state[prefix + "self_attn.v_proj.bias"] = v_weight, torch.zeros(len(v_weight))
    state[prefix + "self_attn.o_proj.weight"] = o_weight
    for file in files:
        (out / file).unlink()
    write_shards(out, state, len(files))
    return out


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text).input_ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not one token of the tiny vocabulary: choose another keyword")
    return ids[0]
