"""FiCoCo-L (Han et al. 2024): filter, correlate, compress visual tokens inside the LLM
(SPEC section 7), following the paper's equations (the published code departs from them: swapped
weights, scatter into permuted indices, no normalisation in FiCoCo-L).

At each reduction layer, with A the layer's attention probabilities averaged over heads:

* filter: redundancy s_i = beta * (mean attention visual queries pay i) - (1 - beta) * (mean
  attention later text queries pay i); the highest-scoring visual tokens form S, the rest T;
* correlate: C_ij = gamma * A_ij + (1 - gamma) * mean over text tokens k of A_ik * A_kj, and the
  targets J_i of i in S are the tokens of T at or above the eps-quantile of C_i;
* compress: a_ij = C_ij / sum_{J_i} C_ij and X_j <- (X_j + sum_i a_ij X_i) / (1 + sum_i a_ij).

The vision-tower variant (FiCoCo-V) is not implemented yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from aim_llava.reduction.importance import DEFAULT_MEMORY_BUDGET, attention_logit_chunks, row_probabilities
from aim_llava.reduction.plan import Merge, RecordingReducer, ReductionPlan
from aim_llava.reduction.schedule import ScheduleError, check_layer
from aim_llava.reduction.tokens import PRUNE_MODES, LayerAttention, TokenState


@dataclass(frozen=True)
class FiCoCoOptions:
    """start_layer / end_layer: the layers after which tokens are compressed (end defaults to
    start: one step); keep_ratio: share of the original visual tokens left after end_layer,
    removed evenly over the steps; beta, gamma, eps: the paper's constants."""

    start_layer: int = 4
    end_layer: int | None = None
    keep_ratio: float = 0.25
    beta: float = 0.6
    gamma: float = 0.6
    eps: float = 0.998
    prune_mode: str = "remove"

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ScheduleError(f"keep_ratio={self.keep_ratio} must lie in [0, 1]")
        for name in ("beta", "gamma", "eps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ScheduleError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.end_layer is not None and self.end_layer < self.start_layer:
            raise ScheduleError("end_layer must not come before start_layer")
        if self.prune_mode not in PRUNE_MODES:
            raise ScheduleError(f"prune_mode={self.prune_mode!r} is not one of {', '.join(PRUNE_MODES)}")

    @property
    def last_layer(self) -> int:
        return self.start_layer if self.end_layer is None else self.end_layer

    def kept_after(self, layer: int, num_visual: int) -> int:
        """Visual tokens left after ``layer``."""
        if layer < self.start_layer:
            return num_visual
        steps = self.last_layer - self.start_layer + 1
        done = min(layer - self.start_layer + 1, steps)
        target = int(num_visual * self.keep_ratio)
        return num_visual - (num_visual - target) * done // steps


def mean_head_attention(attention: LayerAttention, sample: int, alive: torch.Tensor) -> torch.Tensor:
    """[N, N] attention probabilities of one sample, averaged over heads (causal, alive keys)."""
    q, k = attention.q[sample : sample + 1], attention.k[sample : sample + 1]
    heads, n = q.shape[1], q.shape[2]
    chunk = max(1, DEFAULT_MEMORY_BUDGET // max(1, heads * n * 4))
    rows = [row_probabilities(logits)[0].mean(dim=1)[0]
            for _, _, logits in attention_logit_chunks(q, k, alive[None], attention.scale, chunk)]
    return torch.cat(rows, dim=0)


def filter_scores(a: torch.Tensor, visual: torch.Tensor, text_queries: torch.Tensor, beta: float) -> torch.Tensor:
    """Redundancy of every token: beta * mean visual attention received - (1 - beta) * mean text
    attention received (only visual tokens' scores are used)."""
    from_visual = a[visual].mean(dim=0) if bool(visual.any()) else torch.zeros(a.shape[1], device=a.device)
    from_text = a[text_queries].mean(dim=0) if bool(text_queries.any()) else torch.zeros_like(from_visual)
    return beta * from_visual - (1 - beta) * from_text


def correlation(a: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, text: torch.Tensor,
                gamma: float) -> torch.Tensor:
    """C [|S|, |T|] = gamma * A_ST + (1 - gamma) * mean over text k of A_Sk A_kT."""
    direct = a[sources][:, targets]
    if not bool(text.any()):
        return direct
    via_text = a[sources][:, text] @ a[text][:, targets] / int(text.sum())
    return gamma * direct + (1 - gamma) * via_text


def compress_weights(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """a [S, T]: each removed token's correlation over its targets (those at or above the row's
    eps-quantile), normalised to sum to 1."""
    threshold = torch.quantile(corr, eps, dim=1, keepdim=True)
    weights = torch.where(corr >= threshold, corr, torch.zeros_like(corr))
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


class FiCoCoLReducer(RecordingReducer):
    def __init__(self, options: FiCoCoOptions):
        super().__init__(options.prune_mode)
        self.options = options

    def wants_attention(self, layer: int) -> bool:
        return self.options.start_layer <= layer <= self.options.last_layer

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if not self.wants_attention(layer):
            return state
        options = self.options
        keep = state.alive.clone()
        state = dataclasses.replace(state, hidden=state.hidden.clone())
        n = state.valid.shape[1]
        positions = torch.arange(n, device=keep.device)
        for b in range(state.valid.shape[0]):
            live_visual = state.visual[b] & state.alive[b]
            count = int(live_visual.sum()) - options.kept_after(layer, state.num_visual[b])
            if count <= 0:
                continue
            a = mean_head_attention(attention, b, state.alive[b]).float()
            first_visual = int(live_visual.float().argmax())
            text = state.alive[b] & ~state.visual[b]
            scores = filter_scores(a, live_visual, text & (positions > first_visual), options.beta)
            candidates = live_visual.nonzero().flatten()
            removed = candidates[scores[candidates].topk(count).indices]
            targets_mask = live_visual.clone()
            targets_mask[removed] = False
            targets = targets_mask.nonzero().flatten()
            if len(targets):
                removed_mask = torch.zeros_like(live_visual)
                removed_mask[removed] = True
                corr = correlation(a, removed_mask, targets_mask, text, options.gamma)
                order = removed_mask.nonzero().flatten()  # correlation rows follow position order
                weights = compress_weights(corr, options.eps)
                self.merge(layer, b, state, Merge(state.original_index[b, order], state.original_index[b, targets], weights))
            keep[b, removed] = False
        return self.apply(layer, state, keep)


class FiCoCoLPlan(ReductionPlan):
    def __init__(self, options: FiCoCoOptions, num_layers: int, name: str = "ficoco_l"):
        check_layer(options.start_layer, num_layers, "start_layer")
        check_layer(options.last_layer, num_layers, "end_layer")
        self.name, self.options = name, options

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        return self.options.kept_after(layer, num_visual)

    def layer_reducer(self, num_layers: int) -> FiCoCoLReducer:
        return FiCoCoLReducer(self.options)

    @property
    def prune_mode(self) -> str:
        return self.options.prune_mode

    @property
    def attn_implementation(self) -> str | None:
        return "eager" if self.options.prune_mode == "mask" else None
