"""LlavaQwenForCausalLM: SigLIP + projector + Qwen2, with LLaVA-NeXT's calling conventions.

Its calls (prefill, forward, generation) are those of every family on our Qwen2 decoder, written
once in :class:`Qwen2MultimodalForCausalLM`; a family adds its visual modules and
``prepare_multimodal_inputs``. ``forward(input_ids, images=..., image_sizes=..., modalities=[...])``
gives logits; ``generate(...)`` returns only the new tokens, as LLaVA-NeXT's generate does. Token reduction is
an argument of each call (``reduction=plan``, a built
:class:`~aim_llava.reduction.plan.ReductionPlan`; ``set_reduction`` only sets the default), and
what it did comes back with the call's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from aim_llava.devices import on_own_device
from aim_llava.errors import AimLlavaError, InputError, NonFiniteOutputError
from aim_llava.model.config import LlavaConfig
from aim_llava.model.language_model.generation import (
    DecodingGraphs,
    GraphedStep,
    SamplingParams,
    nonfinite_message,
    run_decoding,
    step_runner,
)
from aim_llava.model.language_model.kv_cache import KVCache
from aim_llava.model.language_model.modeling_qwen2 import Qwen2Model
from aim_llava.model.llava_arch import LlavaMetaForCausalLM, MultimodalInputs
from aim_llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower
from aim_llava.model.multimodal_projector.builder import build_vision_projector
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord, ReplayReducer
from aim_llava.reduction.tokens import TokenState
from aim_llava.tensors import host_values
from aim_llava.timing import stage


@dataclass
class GenerationDefaults:
    """Filled from the tokenizer by the loader."""

    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0


@dataclass
class LlavaOutput:
    """``logits`` are for the rows left at the end (all rows unless tokens were removed);
    ``state.original_index`` maps them to positions of ``inputs``; ``reduction`` is what token
    reduction did."""

    logits: torch.Tensor
    past_key_values: KVCache | None
    inputs: MultimodalInputs
    state: TokenState
    reduction: ReductionRecord


@dataclass
class GenerationOutput:
    """``generate(..., return_dict_in_generate=True)``: the new tokens [B, T], the record, and the
    bytes the KV cache's buffers took (0 without the cache)."""

    sequences: torch.Tensor
    reduction: ReductionRecord
    kv_cache_bytes: int = 0


class LlavaQwenModel(Qwen2Model):
    """The ``model.*`` namespace of the checkpoint: Qwen2 plus the visual modules."""

    def __init__(self, config: LlavaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config.text, attn_implementation, max_positions=config.max_length)
        self.vision_tower = SigLipVisionTower(config.vision, attn_implementation)
        self.mm_projector = build_vision_projector(
            config.mm_projector_type, config.vision.hidden_size, config.text.hidden_size
        )
        self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))


class Qwen2MultimodalForCausalLM(nn.Module):
    """A causal LM on our Qwen2 decoder (``self.model``) whose prompts hold visual tokens: the
    prefill with the call's reduction, logits and generation, shared by every family. A family's
    model adds its visual modules and ``prepare_multimodal_inputs`` (the prompt's embeddings and
    positions, a :class:`MultimodalInputs`); ``config`` has ``text`` and ``max_length``."""

    def __init__(self, config, model: Qwen2Model):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.generation_defaults = GenerationDefaults()
        self.default_reduction = ReductionPlan()
        self.decoding_graphs = DecodingGraphs()  # one side stream and graph memory pool per device, for good

    def set_reduction(self, plan: ReductionPlan | None) -> None:
        """The plan used by calls that pass no ``reduction`` (None: no reduction). Build one with
        ``aim_llava.reduction.config.build_plan(spec, model.config.text.num_hidden_layers)``."""
        self.default_reduction = self.plan_for(plan) if plan is not None else ReductionPlan()

    def plan_for(self, reduction: ReductionPlan | None) -> ReductionPlan:
        """The plan of one call: the one given, or the default."""
        if reduction is None:
            return self.default_reduction
        if not isinstance(reduction, ReductionPlan):
            raise AimLlavaError(
                f"reduction must be a built ReductionPlan, got {type(reduction).__name__}: use "
                "aim_llava.reduction.config.build_plan(spec, model.config.text.num_hidden_layers)"
            )
        return reduction

    @on_own_device
    def prefill(self, inputs: MultimodalInputs, cache: KVCache | None, reduction: ReductionPlan | None = None,
                replay: ReductionRecord | None = None) -> tuple[torch.Tensor, TokenState, ReductionRecord]:
        """Decoder pass over a whole multimodal batch, with the plan's layer reducer (or, with
        ``replay``, the decisions of an earlier prefill); returns the final hidden states of the
        remaining rows, their state and what the reduction did."""
        plan = self.plan_for(reduction)
        if replay is not None:
            reducer = ReplayReducer(replay.kept, plan.prune_mode, replay.merges) if replay.kept else None
        else:
            reducer = plan.layer_reducer(len(self.model.layers))
        with stage("prefill", inputs.inputs_embeds.device):
            hidden, state, entering = self.model.decode(
                inputs.inputs_embeds, inputs.position_ids, inputs.valid, inputs.padded, cache,
                visual=inputs.visual, reducer=reducer, attn_implementation=plan.attn_implementation,
                num_visual=inputs.num_visual, rows=inputs.lengths,
            )
        record = ReductionRecord(plan.name, entering, getattr(reducer, "kept", {}), getattr(reducer, "merges", {}),
                                 inputs.visual)
        return hidden, state, record

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images=None,
        image_sizes=None,
        modalities=None,
        use_cache: bool = False,
        visual_features: list[torch.Tensor] | None = None,
        reduction: ReductionPlan | None = None,
        labels: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """Logits for every position of the (left-padded) multimodal sequence. ``labels`` (LLaVA-NeXT's
        training loss) is refused."""
        if labels is not None:
            raise InputError("labels: aim_llava computes no loss (it is an inference engine), so lmms-eval's "
                             "log-likelihood tasks are not supported; use generate_until tasks")
        plan = self.plan_for(reduction)
        inputs = self.prepare_multimodal_inputs(
            input_ids, attention_mask, images, image_sizes, modalities, visual_features, plan
        )
        cache = KVCache(len(self.model.layers)) if use_cache else None
        hidden, state, record = self.prefill(inputs, cache, plan)
        if cache is not None:
            cache.next_position = inputs.next_positions()
        return LlavaOutput(self.lm_head(hidden), cache, inputs, state, record)

    def step_logits(self, cache: KVCache, attn_implementation: str | None) -> Callable[..., torch.Tensor]:
        """The fixed-shape decoding step over ``cache``: (tokens [B], positions [B], step [1]) ->
        next-token logits [B, V] in float32."""

        def step(tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.model.step(tokens, positions, index, cache, attn_implementation)).float()

        return step

    @torch.no_grad()
    @on_own_device
    def generate(
        self,
        inputs: torch.Tensor,
        images=None,
        image_sizes=None,
        modalities=None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | list[int] = 128,
        do_sample: bool = False,
        temperature: float = 0.0,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        streamer=None,
        generator: torch.Generator | None = None,
        visual_features: list[torch.Tensor] | None = None,
        reduction: ReductionPlan | None = None,
        return_dict_in_generate: bool = False,
        cuda_graph: bool | str = True,
        cancelled_rows: Callable[[], list[int]] | None = None,
        stopping_criteria=None,
        num_beams: int = 1,
        prefill: Callable[..., tuple[torch.Tensor, TokenState, ReductionRecord]] | None = None,
    ) -> torch.Tensor | GenerationOutput:
        """Greedy or sampled decoding; returns the new tokens [B, T] (``pad_token_id`` after EOS),
        or with ``return_dict_in_generate`` a :class:`GenerationOutput` that also holds the
        reduction record. A sample whose logits or token importance become NaN or infinite (the
        model's dtype overflowed) is ended there, and the call raises
        :class:`~aim_llava.errors.NonFiniteOutputError` naming those samples, with the output
        of the others as its ``partial``.

        ``max_new_tokens`` is one limit or one per sample (a sample that reaches its own is padded
        like one that emitted EOS, and the batch stops once all have ended). ``cancelled_rows``,
        asked once a step, names samples to end now (e.g. those whose client went away).
        ``eos_token_id=[]`` disables stopping; ``stopping_criteria`` (LLaVA-NeXT's
        ``KeywordsStoppingCriteria``) add their ``stop_token_ids`` to it. ``num_beams`` must be 1
        (no beam search). ``streamer`` follows transformers' streamer protocol
        (``put`` with the prompt first, then each new token; ``end`` at the end). With the KV cache
        (preallocated per layer for the prefill's length after pruning plus ``max_new_tokens``)
        each step has fixed shapes and, on a GPU, is replayed as a CUDA graph unless
        ``cuda_graph=False`` (``"strict"``: a capture that fails raises instead of decoding
        eagerly). Without the cache every step recomputes the whole sequence, replaying
        the prefill's reduction decisions (a reference path). ``prefill`` stands in for
        :meth:`prefill` (same arguments and results), e.g. one that takes the prompts' video
        prefixes from a cache (:class:`aim_llava.prefix_cache.PrefixPrefill`).
        """
        if num_beams != 1:
            raise InputError(f"num_beams={num_beams}: beam search is not implemented; use num_beams=1")
        plan = self.plan_for(reduction)
        limits = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(inputs) or min(limits) < 1:
            raise InputError(f"max_new_tokens must be at least 1 (one value, or one per sample), got {max_new_tokens}")
        max_new_tokens = max(limits)
        row_limits = host_values(limits, self.device) if len(set(limits)) > 1 else None
        if eos_token_id is None:
            eos_token_id = self.generation_defaults.eos_token_ids
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = host_values(eos_ids + criteria_stop_ids(stopping_criteria or []), self.device)
        pad = self.generation_defaults.pad_token_id if pad_token_id is None else pad_token_id
        params = SamplingParams(do_sample, temperature, top_p, generator)
        mm = self.prepare_multimodal_inputs(inputs, attention_mask, images, image_sizes, modalities, visual_features,
                                            plan)
        longest = max(mm.extents)  # the prompt's length (its last position + 1 with multimodal positions)
        if longest + max_new_tokens > self.config.max_length:
            raise InputError(
                f"max_new_tokens={max_new_tokens} with a prompt of {longest} tokens exceeds the model's context of "
                f"{self.config.max_length} tokens: ask for at most {max(0, self.config.max_length - longest)}"
            )
        if streamer is not None:
            streamer.put(torch.empty(mm.valid.shape[0], 0, dtype=torch.long))
        cache = KVCache(len(self.model.layers), reserve=max_new_tokens) if use_cache else None
        hidden, state, record = (prefill or self.prefill)(mm, cache, plan)
        step = None
        with stage("decode", self.device):
            first = self.lm_head(hidden[:, -1]).float()
            if cache is not None:
                step = step_runner(self.step_logits(cache, plan.attn_implementation), self.device, cuda_graph,
                                   max_new_tokens, self.decoding_graphs)
                positions = mm.next_positions()
                index = torch.zeros(1, dtype=torch.long, device=self.device)

                def next_logits(tokens: torch.Tensor, number: int) -> torch.Tensor:
                    index.fill_(number)
                    logits = step(tokens, positions, index)
                    positions.add_(1)
                    return logits
            else:
                def next_logits(tokens: torch.Tensor, number: int) -> torch.Tensor:
                    nonlocal mm
                    mm = appended(mm, self.model.embed_tokens(tokens)[:, None])
                    return self.lm_head(self.prefill(mm, None, plan, replay=record)[0][:, -1]).float()

            try:
                decoded = run_decoding(first, next_logits, max_new_tokens, eos, pad, params, streamer, row_limits,
                                       cancelled_rows, state.nonfinite_scores)
            finally:
                if isinstance(step, GraphedStep):
                    step.close()
        if cache is not None:
            cache.advance(decoded.steps)
        if streamer is not None:
            streamer.end()
        output = GenerationOutput(decoded.tokens, record, cache.nbytes if cache is not None else 0)
        if decoded.broken_rows:
            raise NonFiniteOutputError(nonfinite_message(self.dtype), decoded.broken_rows, output)
        return output if return_dict_in_generate else decoded.tokens


class LlavaQwenForCausalLM(Qwen2MultimodalForCausalLM, LlavaMetaForCausalLM):
    def __init__(self, config: LlavaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config, LlavaQwenModel(config, attn_implementation))


def criteria_stop_ids(criteria) -> list[int]:
    """The token ids at which ``stopping_criteria`` end a sample: decoding checks ids on the device,
    never text on the host, so each criterion must name them (``stop_token_ids``)."""
    ids = []
    for criterion in criteria:
        if not hasattr(criterion, "stop_token_ids"):
            raise InputError(
                f"stopping criterion {type(criterion).__name__} is not supported: generate stops at token ids; use "
                "aim_llava.mm_utils.KeywordsStoppingCriteria or eos_token_id"
            )
        ids.extend(criterion.stop_token_ids)
    return ids


def appended(inputs: MultimodalInputs, token_embeds: torch.Tensor) -> MultimodalInputs:
    """The batch with one more (text) token per sample, at the next position (on every axis of
    multimodal positions)."""
    batch = token_embeds.shape[0]
    ones = torch.ones(batch, 1, dtype=torch.bool, device=token_embeds.device)
    position = inputs.next_positions()
    axes = inputs.position_ids.shape[2:]  # (3,) for multimodal positions
    new = position.view(batch, 1, *[1] * len(axes)).expand(batch, 1, *axes)
    return MultimodalInputs(
        torch.cat([inputs.inputs_embeds, token_embeds], dim=1),
        torch.cat([inputs.valid, ones], dim=1),
        torch.cat([inputs.position_ids, new], dim=1),
        torch.cat([inputs.visual, torch.zeros_like(ones)], dim=1),
        inputs.padded,
        inputs.num_visual,
        [length + 1 for length in inputs.lengths],
        [extent + 1 for extent in inputs.extents],
    )
