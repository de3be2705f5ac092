"""Reusing the video's KV prefix across questions about it.

The prompt puts the system text and the visual tokens before the question, and attention is
causal, so in every decoder layer before the first one whose reduction reads the question
(:meth:`~aim_llava.reduction.plan.ReductionPlan.text_free_layers`: all of them without pruning,
AIM's and FastV's first pruning layer otherwise) that prefix has the same keys and values
whatever the question. :class:`PrefixPrefill` keeps them, per clip, in the
:class:`~aim_llava.reuse_cache.ReuseCache` (with, when layers remain, the prefix's hidden states
entering the first of them), and prefills a prompt in three steps:

1. prefixes not in the cache are computed (those of equal length together) and stored;
2. the question's tokens alone run through the reused layers, attending to the prefix's keys and
   values, which are copied into the call's own KV buffers (so the decoding steps, and a CUDA
   graph capturing them, use the call's buffers as usual);
3. from the first layer not reused on, the whole prompt (the prefix's stored hidden states, the
   question's computed ones) continues as an ordinary prefill with the plan's layer reducer, in
   the same layout, so the reduction makes the same decisions.

Each row attends to the same keys as without reuse; only the order of floating-point sums may
differ (greedy tokens are the same, logits agree to about 1e-6 in float32). In the reused layers
a padded batch holds padding between a sample's prefix and its question; the masks cover it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from aim_llava.model.language_model.kv_cache import KVCache, LayerCache
from aim_llava.model.llava_arch import MultimodalInputs
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord
from aim_llava.reduction.tokens import TokenState
from aim_llava.reuse_cache import ReuseCache
from aim_llava.tensors import host_values
from aim_llava.timing import stage


@dataclass
class CachedPrefix:
    """One prompt prefix in the reused layers: keys and values [layers, kv_heads, length, head_dim]
    and, when layers remain after them, the hidden states [length, H] entering the first one."""

    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (self.hidden.nbytes if self.hidden is not None else 0)


def prefix_key(visual_key: Hashable, text_ids: list[int], layers: int, attn_implementation: str) -> tuple:
    """The cache key of a prefix: the visual's key, the token ids before it, how many layers are
    kept and the attention kernel that computed them."""
    return "prefix", visual_key, tuple(text_ids), layers, attn_implementation


def compute_prefixes(decoder, embeds: torch.Tensor, positions: torch.Tensor, layers: int,
                     attn_implementation: str) -> list[CachedPrefix]:
    """The prefixes of ``embeds`` [G, length, H] (equal lengths, no padding) at their positions
    ([G, length], or [G, length, 3] with multimodal RoPE) in the first ``layers`` decoder layers."""
    count, length, _ = embeds.shape
    valid = torch.ones(count, length, dtype=torch.bool, device=embeds.device)
    cache = KVCache(len(decoder.layers))
    state, _ = decoder.run_layers(TokenState.start(embeds, positions, valid, None, False), range(layers), cache,
                                  None, attn_implementation)
    hidden = state.hidden if layers < len(decoder.layers) else None
    return [CachedPrefix(torch.stack([cache.layers[layer].keys[row] for layer in range(layers)]),
                         torch.stack([cache.layers[layer].values[row] for layer in range(layers)]),
                         hidden[row].clone() if hidden is not None else None)
            for row in range(count)]


class PrefixPrefill:
    """The prefill of one ``generate`` call (``generate(..., prefill=PrefixPrefill(...))``) whose
    prompts start with a prefix of ``prefix_lengths[b]`` rows identified by ``prefix_ids[b]`` (the
    visual's cache key and the token ids before it)."""

    def __init__(self, model, cache: ReuseCache, prefix_ids: list[tuple[Hashable, list[int]]],
                 prefix_lengths: list[int]):
        self.model, self.cache = model, cache
        self.prefix_ids, self.prefix_lengths = prefix_ids, prefix_lengths

    def __call__(self, inputs: MultimodalInputs, kv: KVCache | None, plan: ReductionPlan
                 ) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
        decoder = self.model.model
        num_layers = len(decoder.layers)
        reused = plan.text_free_layers(num_layers)
        if kv is None or reused == 0:
            return self.model.prefill(inputs, kv, plan)
        implementation = plan.attn_implementation or decoder.attn_implementation
        with stage("prefill", inputs.inputs_embeds.device):
            prefixes = self.prefixes(inputs, reused, implementation)
            state = self.question_pass(inputs, prefixes, kv, reused, implementation)
            entering = [list(inputs.num_visual) for _ in range(reused)]
            if reused == num_layers:
                return decoder.norm(state.hidden), state, ReductionRecord(plan.name, entering, visual=inputs.visual)
            reducer = plan.layer_reducer(num_layers)
            state, later = decoder.run_layers(self.whole_prompt(inputs, prefixes, state), range(reused, num_layers),
                                              kv, reducer, implementation)
        record = ReductionRecord(plan.name, entering + later, getattr(reducer, "kept", {}),
                                 getattr(reducer, "merges", {}), inputs.visual)
        return decoder.norm(state.hidden), state, record

    def prefixes(self, inputs: MultimodalInputs, layers: int, implementation: str) -> list[CachedPrefix]:
        """Every sample's prefix, from the cache or computed (and stored); a prefix that appears
        twice in the batch is computed once (the second counts as a hit)."""
        keys = [prefix_key(visual, text, layers, implementation) for visual, text in self.prefix_ids]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        for _ in range(len(keys) - len(found)):
            self.cache.count_hit("prefix")
        by_length: dict[int, list[tuple[tuple, int]]] = {}
        for key, prefix in found.items():
            if prefix is None:
                row = keys.index(key)
                by_length.setdefault(self.prefix_lengths[row], []).append((key, row))
        longest = inputs.inputs_embeds.shape[1]
        for length, missing in by_length.items():
            starts = [longest - inputs.lengths[row] for _, row in missing]
            embeds = torch.stack([inputs.inputs_embeds[row, start : start + length]
                                  for (_, row), start in zip(missing, starts)])
            positions = torch.stack([inputs.position_ids[row, start : start + length]
                                     for (_, row), start in zip(missing, starts)])
            computed = compute_prefixes(self.model.model, embeds, positions, layers, implementation)
            for (key, _), prefix in zip(missing, computed):
                self.cache.put(key, prefix, prefix.nbytes)
                found[key] = prefix
        return [found[key] for key in keys]

    def question_pass(self, inputs: MultimodalInputs, prefixes: list[CachedPrefix], kv: KVCache, layers: int,
                      implementation: str) -> TokenState:
        """Seed the call's KV buffers of the reused layers with the prefixes (right-aligned, in
        one block) and run the questions (right-aligned after it) through those layers."""
        batch, longest, _ = inputs.inputs_embeds.shape
        questions = [rows - prefix for rows, prefix in zip(inputs.lengths, self.prefix_lengths)]
        width, prefix_width = max(questions), max(self.prefix_lengths)
        device = inputs.inputs_embeds.device
        first = prefixes[0]
        keys = first.keys.new_zeros(first.keys.shape[0], batch, first.keys.shape[1], prefix_width, first.keys.shape[3])
        values = torch.zeros_like(keys)
        valid = torch.zeros(batch, prefix_width, dtype=torch.bool, device=device)
        for row, prefix in enumerate(prefixes):
            start = prefix_width - prefix.length
            keys[:, row, :, start:], values[:, row, :, start:] = prefix.keys, prefix.values
            valid[row, start:] = True
        prefix_padded = len(set(self.prefix_lengths)) > 1
        for layer in range(layers):
            kv.layers[layer] = LayerCache.allocate(keys[layer], values[layer], valid, prefix_padded,
                                                   prefix_width + width + kv.reserve)
        columns = torch.arange(width, device=device)
        question_valid = columns[None, :] >= host_values([width - q for q in questions], device)[:, None]
        state = TokenState.start(inputs.inputs_embeds[:, longest - width :], inputs.position_ids[:, longest - width :],
                                 question_valid, None, len(set(questions)) > 1, None, questions)
        return self.model.model.run_layers(state, range(layers), kv, None, implementation)[0]

    def whole_prompt(self, inputs: MultimodalInputs, prefixes: list[CachedPrefix], questions: TokenState
                     ) -> TokenState:
        """The state of the whole prompt entering the first layer not reused, laid out as the
        ordinary prefill lays it out: the prefixes' stored hidden states, then the questions'."""
        longest = inputs.inputs_embeds.shape[1]
        width = questions.hidden.shape[1]
        hidden = torch.zeros_like(inputs.inputs_embeds)
        for row, prefix in enumerate(prefixes):
            start = longest - inputs.lengths[row]
            count = inputs.lengths[row] - prefix.length
            hidden[row, start : start + prefix.length] = prefix.hidden
            hidden[row, longest - count :] = questions.hidden[row, width - count :]
        return TokenState.start(hidden, inputs.position_ids, inputs.valid, inputs.visual, inputs.padded,
                                inputs.num_visual, inputs.lengths)
