"""LlavaQwenForCausalLM: SigLIP + projector + Qwen2, with LLaVA-NeXT's calling conventions.

``forward(input_ids, images=..., image_sizes=..., modalities=[...])`` gives logits;
``generate(...)`` returns only the new tokens, as LLaVA-NeXT's generate does. Token reduction is
an argument of each call (``reduction=plan``, a built
:class:`~aim_llava.reduction.plan.ReductionPlan`; ``set_reduction`` only sets the default), and
what it did comes back with the call's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from aim_llava.errors import AimLlavaError, InputError
from aim_llava.model.config import LlavaConfig
from aim_llava.model.language_model.kv_cache import KVCache
from aim_llava.model.language_model.modeling_qwen2 import Qwen2Model
from aim_llava.model.llava_arch import LlavaMetaForCausalLM, MultimodalInputs
from aim_llava.model.multimodal_encoder.siglip_encoder import SigLipVisionTower
from aim_llava.model.multimodal_projector.builder import build_vision_projector
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord, ReplayReducer
from aim_llava.reduction.tokens import TokenState
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
    """``generate(..., return_dict_in_generate=True)``: the new tokens [B, T] and the record."""

    sequences: torch.Tensor
    reduction: ReductionRecord


class LlavaQwenModel(Qwen2Model):
    """The ``model.*`` namespace of the checkpoint: Qwen2 plus the visual modules."""

    def __init__(self, config: LlavaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config.text, attn_implementation)
        self.vision_tower = SigLipVisionTower(config.vision, attn_implementation)
        self.mm_projector = build_vision_projector(
            config.mm_projector_type, config.vision.hidden_size, config.text.hidden_size
        )
        self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))


class LlavaQwenForCausalLM(nn.Module, LlavaMetaForCausalLM):
    def __init__(self, config: LlavaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = LlavaQwenModel(config, attn_implementation)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.generation_defaults = GenerationDefaults()
        self.default_reduction = ReductionPlan()

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
        record = ReductionRecord(plan.name, entering, getattr(reducer, "kept", {}), getattr(reducer, "merges", {}))
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
    ) -> LlavaOutput:
        """Logits for every position of the (left-padded) multimodal sequence."""
        plan = self.plan_for(reduction)
        inputs = self.prepare_multimodal_inputs(
            input_ids, attention_mask, images, image_sizes, modalities, visual_features, plan
        )
        cache = KVCache(len(self.model.layers)) if use_cache else None
        hidden, state, record = self.prefill(inputs, cache, plan)
        if cache is not None:
            cache.next_position = inputs.position_ids[:, -1] + 1
        return LlavaOutput(self.lm_head(hidden), cache, inputs, state, record)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor,
        images=None,
        image_sizes=None,
        modalities=None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
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
    ) -> torch.Tensor | GenerationOutput:
        """Greedy or sampled decoding; returns the new tokens [B, T] (``pad_token_id`` after EOS),
        or with ``return_dict_in_generate`` a :class:`GenerationOutput` that also holds the
        reduction record.

        ``eos_token_id=[]`` disables stopping. ``streamer`` follows transformers' streamer protocol
        (``put`` with the prompt first, then each new token; ``end`` at the end).
        """
        plan = self.plan_for(reduction)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if eos_token_id is None:
            eos_token_id = self.generation_defaults.eos_token_ids
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=self.device)
        pad = self.generation_defaults.pad_token_id if pad_token_id is None else pad_token_id
        sample = do_sample and temperature > 0
        mm = self.prepare_multimodal_inputs(inputs, attention_mask, images, image_sizes, modalities, visual_features,
                                            plan)
        cache = KVCache(len(self.model.layers), reserve=max_new_tokens) if use_cache else None
        hidden, _, record = self.prefill(mm, cache, plan)
        positions = mm.position_ids
        next_position = positions[:, -1:] + 1
        batch = positions.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        new_tokens = []
        if streamer is not None:
            streamer.put(torch.empty(batch, 0, dtype=torch.long))
        with stage("decode", self.device):
            for _ in range(max_new_tokens):
                logits = self.lm_head(hidden[:, -1]).float()
                token = self.pick_token(logits, sample, temperature, top_p, generator)
                token = torch.where(finished, torch.full_like(token, pad), token)
                new_tokens.append(token)
                if streamer is not None:
                    streamer.put(token.cpu())
                finished |= torch.isin(token, eos)
                if bool(finished.all()) or len(new_tokens) == max_new_tokens:
                    break
                token_embeds = self.model.embed_tokens(token)[:, None]
                step_valid = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
                if cache is not None:
                    hidden, _, _ = self.model.decode(token_embeds, next_position, step_valid, False, cache,
                                                     attn_implementation=plan.attn_implementation)
                else:
                    mm = MultimodalInputs(
                        torch.cat([mm.inputs_embeds, token_embeds], dim=1),
                        torch.cat([mm.valid, step_valid], dim=1),
                        torch.cat([mm.position_ids, next_position], dim=1),
                        torch.cat([mm.visual, torch.zeros_like(step_valid)], dim=1),
                        mm.padded,
                        mm.num_visual,
                        [length + 1 for length in mm.lengths],
                    )
                    hidden, _, _ = self.prefill(mm, None, plan, replay=record)
                next_position = next_position + 1
        if streamer is not None:
            streamer.end()
        sequences = torch.stack(new_tokens, dim=1)
        return GenerationOutput(sequences, record) if return_dict_in_generate else sequences

    @staticmethod
    def pick_token(logits, sample: bool, temperature: float, top_p: float | None, generator) -> torch.Tensor:
        if not sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p is not None and top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
