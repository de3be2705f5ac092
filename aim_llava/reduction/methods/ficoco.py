"""FiCoCo-L (Han et al. 2024): filter, correlate, compress visual tokens inside the LLM
(docs/algorithms.md §7), following the paper's equations (the published code departs from them: swapped
weights, scatter into permuted indices, no normalisation in FiCoCo-L).

At each reduction layer, with A the layer's attention probabilities averaged over heads:

* filter: redundancy s_i = beta * (mean attention visual queries pay i) - (1 - beta) * (mean
  attention later text queries pay i); the highest-scoring visual tokens form S, the rest T;
* correlate: C_ij = gamma * A_ij + (1 - gamma) * mean over text tokens k of A_ik * A_kj, and the
  targets J_i of i in S are the tokens of T at or above the eps-quantile of C_i;
* compress: a_ij = C_ij / sum_{J_i} C_ij and X_j <- (X_j + sum_i a_ij X_i) / (1 + sum_i a_ij).

FiCoCo-V does the same inside the vision tower, from its middle layer on, with a fixed count of
patches per layer: redundancy s_i = lam * (mean attention i pays the others) - (1 - lam) *
(semantic importance), where SigLIP, having no CLS token, takes -cos(mean of the keys, key_i) as
the semantic importance; a local penalty doubles the highest score in every 2x2 window of the
patch grid; patches are correlated by the tower's attention A_ij. Video frames reduced this way
skip the 2x2 pooling (no grid is left); anyres images cannot be used (one view per image works).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from aim_llava.reduction.importance import (
    DEFAULT_MEMORY_BUDGET,
    attention_logit_chunks,
    row_probabilities,
)
from aim_llava.reduction.plan import Merge, PruningPlan, RecordingReducer, ReductionPlan
from aim_llava.reduction.provenance import kept_assignment
from aim_llava.reduction.schedule import ScheduleError, check_layer
from aim_llava.reduction.tokens import (
    PRUNE_MODES,
    LayerAttention,
    TokenState,
    VisionReducer,
    mask_positions,
)


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


def masked_row_mean(a: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of ``a`` [N, N] selected by the mask ``rows`` [N] (zeros when none)."""
    weights = rows.to(a.dtype)
    return (weights @ a) / weights.sum().clamp(min=1)


def filter_scores(a: torch.Tensor, visual: torch.Tensor, text_queries: torch.Tensor, beta: float) -> torch.Tensor:
    """Redundancy of every token: beta * mean visual attention received - (1 - beta) * mean text
    attention received (only visual tokens' scores are used)."""
    return beta * masked_row_mean(a, visual) - (1 - beta) * masked_row_mean(a, text_queries)


def correlation(a: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, text: torch.Tensor,
                gamma: float) -> torch.Tensor:
    """C [|S|, |T|] = gamma * A_ST + (1 - gamma) * mean over text k of A_Sk A_kT, for the source and
    target positions ``sources`` and ``targets`` and the text mask ``text`` (no text: C = A_ST)."""
    direct = a[sources][:, targets]
    text_weights = text.to(a.dtype)
    count = text_weights.sum()
    via_text = (a[sources] * text_weights) @ a[:, targets] / count.clamp(min=1)
    return torch.where(count > 0, gamma * direct + (1 - gamma) * via_text, direct)


def row_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of every row (last dim), linear interpolation as ``torch.quantile`` does,
    without its input-size limit."""
    ordered = values.sort(dim=-1).values
    position = q * (values.shape[-1] - 1)
    lower = int(position)
    upper = min(lower + 1, values.shape[-1] - 1)
    fraction = position - lower
    return (ordered[..., lower] + (ordered[..., upper] - ordered[..., lower]) * fraction)[..., None]


def compress_weights(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """a [S, T]: each removed token's correlation over its targets (those at or above the row's
    eps-quantile), normalised to sum to 1."""
    threshold = row_quantile(corr, eps)
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
        kept = list(state.live_visual)
        for b in range(state.valid.shape[0]):
            live_visual = state.visual[b] & state.alive[b]
            kept[b] = min(state.live_visual[b], options.kept_after(layer, state.num_visual[b]))
            count = state.live_visual[b] - kept[b]
            if count <= 0:
                continue
            a = mean_head_attention(attention, b, state.alive[b]).float()
            text = state.alive[b] & ~state.visual[b]
            after_first_visual = live_visual.cumsum(dim=0) > 0
            scores = filter_scores(a, live_visual, text & after_first_visual, options.beta)
            removed = torch.where(live_visual, scores, float("-inf")).topk(count).indices.sort().values
            removed_mask = torch.zeros_like(live_visual).scatter(0, removed, True)
            if kept[b] > 0:
                targets = mask_positions(live_visual & ~removed_mask, kept[b])
                weights = compress_weights(correlation(a, removed, targets, text, options.gamma), options.eps)
                self.merge(layer, b, state, Merge(state.original_index[b, removed], state.original_index[b, targets],
                                                  weights))
            keep[b] &= ~removed_mask
        return self.apply(layer, state, keep, kept)


class FiCoCoLPlan(PruningPlan):
    def __init__(self, options: FiCoCoOptions, num_layers: int, name: str = "ficoco_l"):
        check_layer(options.start_layer, num_layers, "start_layer")
        check_layer(options.last_layer, num_layers, "end_layer")
        self.name, self.options = name, options

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        return self.options.kept_after(layer, num_visual)

    def layer_reducer(self, num_layers: int) -> FiCoCoLReducer:
        return FiCoCoLReducer(self.options)

    def text_free_layers(self, num_layers: int) -> int:
        """The layers before start_layer (its scores read the text's attention)."""
        return self.options.start_layer


@dataclass(frozen=True)
class FiCoCoVLOptions:
    """FiCoCo-V inside the vision tower, optionally followed by FiCoCo-L in the LLM.

    vision_start_layer: first tower layer after which patches are removed (None: the middle);
    vision_keep_ratio: share of the patches left after the last tower layer, removed in equal
    counts per layer; lam: weight of the attention a patch pays in its redundancy; local_penalty:
    double the highest score in every 2x2 window of the patch grid; eps: target quantile.
    llm: also run FiCoCo-L (start_layer, end_layer, keep_ratio, beta, gamma as in FiCoCo-L).
    """

    vision_start_layer: int | None = None
    vision_keep_ratio: float = 0.25
    lam: float = 0.35
    local_penalty: bool = True
    eps: float = 0.998
    llm: bool = False
    start_layer: int = 4
    end_layer: int | None = None
    keep_ratio: float = 0.5
    beta: float = 0.6
    gamma: float = 0.6
    prune_mode: str = "remove"

    def __post_init__(self) -> None:
        for name in ("vision_keep_ratio", "lam", "eps"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ScheduleError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        self.llm_options()

    def llm_options(self) -> FiCoCoOptions:
        return FiCoCoOptions(self.start_layer, self.end_layer, self.keep_ratio, self.beta, self.gamma, self.eps,
                             self.prune_mode)

    def vision_kept_after(self, vision) -> list[int]:
        """Patches left after each tower layer: a fixed count goes after every layer from the
        start layer on, so that about ``vision_keep_ratio`` of them remain at the end."""
        layers, n = vision.num_hidden_layers, vision.num_patches
        start = layers // 2 if self.vision_start_layer is None else self.vision_start_layer
        check_layer(start, layers, "vision_start_layer")
        per_layer = (n - int(n * self.vision_keep_ratio)) // (layers - start)
        return [n - per_layer * max(0, layer - start + 1) for layer in range(layers)]


def window_maxima(scores: torch.Tensor, positions: torch.Tensor, grid: int) -> torch.Tensor:
    """[V, N] mask of the highest score in each 2x2 window of the original patch grid."""
    windows_per_row = (grid + 1) // 2
    window = (positions // grid // 2) * windows_per_row + (positions % grid) // 2
    best = torch.full((scores.shape[0], windows_per_row**2), float("-inf"), device=scores.device)
    best = best.scatter_reduce(1, window, scores, reduce="amax")
    return scores == best.gather(1, window)


def vision_redundancy(attention: LayerAttention, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [V, N], attention [V, N, N] averaged over heads): lam * mean attention a patch pays
    the others + (1 - lam) * cos(mean key, its key), i.e. minus the semantic importance."""
    probs = torch.softmax((attention.q.float() @ attention.k.float().transpose(-1, -2)) * attention.scale, dim=-1)
    a = probs.mean(dim=1)
    n = a.shape[-1]
    pays = (1 - a.diagonal(dim1=-2, dim2=-1)) / max(1, n - 1)
    keys = attention.k.float().transpose(1, 2).flatten(2)
    similarity = torch.nn.functional.cosine_similarity(keys, keys.mean(dim=1, keepdim=True), dim=-1)
    return lam * pays + (1 - lam) * similarity, a


class FiCoCoVReducer(VisionReducer):
    """Filter, correlate and compress patches after tower layers (all views alike)."""

    def __init__(self, options: FiCoCoVLOptions, vision):
        self.options = options
        self.kept_after = options.vision_kept_after(vision)
        self.patches = vision.num_patches
        self.grid = vision.grid_size
        self.positions: torch.Tensor | None = None
        self.origin: torch.Tensor | None = None  # [views, patches]: the patch each input patch went into

    def removes_after(self, layer: int) -> int:
        before = self.patches if layer == 0 else self.kept_after[layer - 1]
        return before - self.kept_after[layer]

    def wants_attention(self, layer: int) -> bool:
        return self.removes_after(layer) > 0

    def after_layer(self, layer: int, hidden: torch.Tensor, attention: LayerAttention | None) -> torch.Tensor:
        count = self.removes_after(layer)
        views, n, _ = hidden.shape
        if self.positions is None:
            self.positions = torch.arange(n, device=hidden.device).expand(views, n)
            self.origin = self.positions
        if count <= 0:
            return hidden
        scores, a = vision_redundancy(attention, self.options.lam)
        if self.options.local_penalty:
            scores = torch.where(window_maxima(scores, self.positions, self.grid), 2 * scores, scores)
        removed = scores.topk(count, dim=1).indices.sort(dim=1).values
        keep_mask = torch.ones(views, n, dtype=torch.bool, device=hidden.device).scatter(1, removed, False)
        kept = mask_positions(keep_mask, n - count)
        corr = a.gather(1, removed[..., None].expand(-1, -1, n)).gather(2, kept[:, None, :].expand(-1, count, -1))
        weights = compress_weights(corr, self.options.eps)
        gather = lambda index: hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])).float()  # noqa: E731
        mixed = gather(kept) + weights.transpose(1, 2) @ gather(removed)
        self.positions = self.positions.gather(1, kept)
        # a removed patch goes into the kept patch that takes most of it
        step = kept_assignment(kept, n).scatter(1, removed, weights.argmax(dim=2))
        self.origin = step.gather(1, self.origin)
        return (mixed / (1 + weights.sum(dim=1))[..., None]).to(hidden.dtype)

    def patch_assignment(self) -> torch.Tensor | None:
        return self.origin


class FiCoCoVLPlan(ReductionPlan):
    """FiCoCo-V (and, with ``llm: true``, FiCoCo-L after it)."""

    def __init__(self, options: FiCoCoVLOptions, num_layers: int, name: str = "ficoco_v"):
        self.name, self.options = name, options
        self.llm = FiCoCoLPlan(options.llm_options(), num_layers) if options.llm else None

    def vision_reducer(self, vision) -> FiCoCoVReducer:
        return FiCoCoVReducer(self.options, vision)

    def vision_tokens_per_layer(self, vision) -> list[int]:
        return [vision.num_patches] + self.options.vision_kept_after(vision)[:-1]

    def vision_tokens_after(self, vision) -> int:
        return self.options.vision_kept_after(vision)[-1]

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        return self.llm.visual_tokens_leaving(layer, num_visual) if self.llm else num_visual

    def layer_reducer(self, num_layers: int):
        return self.llm.layer_reducer(num_layers) if self.llm else None

    def text_free_layers(self, num_layers: int) -> int:
        return self.llm.text_free_layers(num_layers) if self.llm else num_layers

    @property
    def prune_mode(self) -> str:
        return self.options.prune_mode

    @property
    def attn_implementation(self) -> str | None:
        return self.llm.attn_implementation if self.llm else None
