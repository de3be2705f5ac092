"""FitPrune (Ye et al. 2024): a per-layer pruning recipe fitted to a FLOPs budget on a small
calibration set, then applied to every input (docs/algorithms.md §6).

Attention statistics use the attention probabilities with heads reduced by MAX. For a visual
token j: c_j is the attention it receives from the text queries that come after the first visual
token (earlier text cannot see it), v_j the attention it receives from the visual queries.
Calibration keeps, per sample and layer, only these two vectors (O(layers x visual tokens)), never
an attention map. The recipe walk uses the unpruned model's vectors restricted to the tokens that
remain; its counts are for the calibration's mean visual-token count and scale to other counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aim_llava.cost import prefill_flops
from aim_llava.errors import AimLlavaError
from aim_llava.reduction.importance import (
    DEFAULT_MEMORY_BUDGET,
    attention_logit_chunks,
    row_probabilities,
)
from aim_llava.reduction.plan import PruningPlan, RecordingReducer, ReductionPlan
from aim_llava.reduction.tokens import (
    PRUNE_MODES,
    LayerAttention,
    LayerReducer,
    TokenState,
    keep_top_visual,
)


class RecipeError(AimLlavaError):
    """A FitPrune recipe that cannot be made or used."""


def attention_received(attention: LayerAttention, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, v) [B, N]: attention each token receives from later text queries and from visual
    queries (max over heads of the softmax probabilities), computed in query chunks."""
    q, k, alive = attention.q, attention.k, state.alive
    batch, heads, n, _ = q.shape
    first_visual = torch.where(state.visual.any(dim=1), state.visual.float().argmax(dim=1), torch.full((batch,), n, device=q.device))
    positions = torch.arange(n, device=q.device)[None]
    text_queries = alive & ~state.visual & (positions > first_visual[:, None])
    visual_queries = alive & state.visual
    c = torch.zeros(batch, n, device=q.device)
    v = torch.zeros(batch, n, device=q.device)
    chunk = max(1, DEFAULT_MEMORY_BUDGET // max(1, batch * heads * n * 4))
    for start, end, logits in attention_logit_chunks(q, k, alive, attention.scale, chunk):
        probs = row_probabilities(logits)[0].amax(dim=1)  # [B, c, N]
        c += (probs * text_queries[:, start:end, None]).sum(dim=1)
        v += (probs * visual_queries[:, start:end, None]).sum(dim=1)
    return c, v


@dataclass
class LayerStats:
    """One calibration sample at one layer: c and v over its visual tokens, and query counts."""

    c: list[float]
    v: list[float]
    text_queries: int
    visual_queries: int


class StatsCollector(LayerReducer):
    """Records (c, v) of the visual tokens at every layer of an unpruned prefill (batch size 1)."""

    def __init__(self):
        self.layers: list[LayerStats] = []

    def wants_attention(self, layer: int) -> bool:
        return True

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if state.valid.shape[0] != 1:
            raise RecipeError("calibration runs one sample at a time")
        c, v = attention_received(attention, state)
        visual = state.visual[0]
        n = state.valid.shape[1]
        first = int(visual.float().argmax()) if bool(visual.any()) else n
        text_queries = int((state.valid[0] & ~visual & (torch.arange(n, device=visual.device) > first)).sum())
        self.layers.append(LayerStats(c[0][visual].tolist(), v[0][visual].tolist(), text_queries, int(visual.sum())))
        return state


class CollectingPlan(ReductionPlan):
    """The unpruned model with a statistics collector after every layer."""

    def __init__(self, collector: StatsCollector):
        self.collector = collector

    def layer_reducer(self, num_layers: int) -> StatsCollector:
        return self.collector


def lowest_removable(scores: torch.Tensor, allowed_loss: float) -> torch.Tensor:
    """Mask of the largest set of lowest-scoring tokens whose total is at most ``allowed_loss``."""
    order = scores.argsort()
    removable = scores[order].cumsum(dim=0) <= allowed_loss + 1e-12
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[removable]] = True
    return mask


def recipe_for_alpha(samples: list[list[LayerStats]], alpha: float, cost, budget: float) -> list[float]:
    """Mean tokens removed after each layer for one alpha; stops once the forecast fits the budget.

    ``cost(removed_per_layer)`` gives the prefill FLOPs of a recipe (tokens removed after each
    layer leave all later layers).
    """
    layers = len(samples[0])
    remaining = [torch.ones(len(sample[0].c), dtype=torch.bool) for sample in samples]
    recipe = [0.0] * layers
    for layer in range(layers):
        if cost(recipe) <= budget:
            break
        removed = []
        for index, sample in enumerate(samples):
            stats, alive = sample[layer], remaining[index]
            # Per-query normalised attention received; W = the unpruned layer's total. Tokens may
            # go while what stays keeps at least (1 - alpha) of W.
            c = torch.tensor(stats.c, dtype=torch.float64) / max(1, stats.text_queries)
            v = torch.tensor(stats.v, dtype=torch.float64) / max(1, stats.visual_queries)
            c_alive, v_alive = c[alive], v[alive]
            low_c = lowest_removable(c_alive, float(c_alive.sum()) - (1 - alpha) * float(c.sum()))
            low_v = lowest_removable(v_alive, float(v_alive.sum()) - (1 - alpha) * float(v.sum()))
            drop = low_c & low_v
            alive_index = alive.nonzero().flatten()
            remaining[index] = alive.clone()
            remaining[index][alive_index[drop]] = False
            removed.append(float(drop.sum()))
        recipe[layer] = sum(removed) / len(removed)
    return recipe


def search_recipe(samples: list[list[LayerStats]], cost, budget: float, tolerance: float = 0.01) -> tuple[list[float], float]:
    """Binary search for the least alpha whose recipe meets the budget; returns (recipe, alpha)."""
    best = recipe_for_alpha(samples, 1.0, cost, budget)
    if cost(best) > budget:
        raise RecipeError("even removing every visual token allowed by alpha = 1 does not meet the budget")
    low, high, alpha = 0.0, 1.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        recipe = recipe_for_alpha(samples, middle, cost, budget)
        if cost(recipe) <= budget:
            high, best, alpha = middle, recipe, middle
        else:
            low = middle
    return best, alpha


@dataclass
class Recipe:
    """Visual tokens to drop after each layer, for ``visual_tokens`` visual tokens (the
    calibration's mean, with ``text_tokens`` text tokens)."""

    drop: list[float]
    visual_tokens: float
    text_tokens: float = 0.0
    budget: float = 0.0
    alpha: float = 0.0
    samples: int = 0

    def scaled(self, visual_tokens: int) -> list[int]:
        """Per-layer drop counts for an input with another number of visual tokens."""
        factor = visual_tokens / self.visual_tokens if self.visual_tokens else 0.0
        return [int(round(d * factor)) for d in self.drop]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        try:
            recipe = cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RecipeError(f"FitPrune recipe not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise RecipeError(f"{path} is not a FitPrune recipe ({err})") from None
        numbers = (int, float)
        if (not isinstance(recipe.drop, list) or not all(isinstance(d, numbers) and d >= 0 for d in recipe.drop)
                or not isinstance(recipe.visual_tokens, numbers) or recipe.visual_tokens < 0):
            raise RecipeError(f"{path} is not a FitPrune recipe (drop must be a list of counts, visual_tokens a count)")
        return recipe


@dataclass(frozen=True)
class FitPruneOptions:
    """recipe: path of a recipe JSON (from ``aim-llava fitprune-calibrate``); prune_mode."""

    recipe: str | None = None
    prune_mode: str = "remove"

    def __post_init__(self) -> None:
        if self.recipe is None:
            raise RecipeError("fitprune needs a recipe: use --config fitprune:RECIPE.json")
        if not os.path.isfile(self.recipe):
            raise RecipeError(f"FitPrune recipe not found: {self.recipe} (make one with aim-llava fitprune-calibrate)")
        if self.prune_mode not in PRUNE_MODES:
            raise RecipeError(f"prune_mode={self.prune_mode!r} is not one of {', '.join(PRUNE_MODES)}")

    def content_files(self) -> tuple[str, ...]:
        """The files whose content is part of the config (its digest changes with them)."""
        return (self.recipe,)


class FitPrunePruner(RecordingReducer):
    """After each recipe layer, drops the live visual tokens with the lowest c_j * v_j."""

    def __init__(self, recipe: Recipe, mode: str):
        super().__init__(mode)
        self.recipe = recipe
        self.counts: list[list[int]] | None = None

    def wants_attention(self, layer: int) -> bool:
        return self.recipe.drop[layer] > 0

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if self.recipe.drop[layer] <= 0:
            return state
        if self.counts is None:
            self.counts = [self.recipe.scaled(n) for n in state.num_visual]
        c, v = attention_received(attention, state)
        wanted = [max(0, n - counts[layer]) for n, counts in zip(state.live_visual, self.counts)]
        keep, kept = keep_top_visual(state, c * v, wanted)
        return self.apply(layer, state, keep, kept)


class FitPrunePlan(PruningPlan):
    def __init__(self, options: FitPruneOptions, num_layers: int, name: str = "fitprune"):
        self.name, self.options = name, options
        self.recipe = Recipe.load(options.recipe)
        if len(self.recipe.drop) != num_layers:
            raise RecipeError(f"the recipe has {len(self.recipe.drop)} layers but the model has {num_layers}")

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        dropped = sum(self.recipe.scaled(num_visual)[: layer + 1])
        return max(0, num_visual - dropped)

    def layer_reducer(self, num_layers: int) -> FitPrunePruner:
        return FitPrunePruner(self.recipe, self.options.prune_mode)

    def text_free_layers(self, num_layers: int) -> int:
        """The layers before the recipe's first drop (its scores read the text's attention)."""
        return next((layer for layer, drop in enumerate(self.recipe.drop) if drop > 0), num_layers)


@dataclass
class Calibration:
    """Statistics of the calibration samples, with their token counts."""

    samples: list[list[LayerStats]] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)


def fit_recipe(calibration: Calibration, text_config, budget_fraction: float, tolerance: float = 0.01) -> Recipe:
    """The FitPrune recipe meeting ``budget_fraction`` of the unpruned prefill FLOPs."""
    if not 0.0 < budget_fraction <= 1.0:
        raise RecipeError(f"budget {budget_fraction} must lie in (0, 1]")
    layers = text_config.num_hidden_layers
    visual = sum(calibration.visual_tokens) / len(calibration.visual_tokens)
    text = sum(calibration.text_tokens) / len(calibration.text_tokens)

    def cost(recipe: list[float]) -> float:
        tokens, remaining = [], visual
        for layer in range(layers):
            tokens.append(int(round(text + remaining)))
            remaining -= recipe[layer]
        return prefill_flops(text_config, tokens)

    budget = budget_fraction * cost([0.0] * layers)
    drop, alpha = search_recipe(calibration.samples, cost, budget, tolerance)
    return Recipe(drop, visual, text, budget_fraction, alpha, len(calibration.samples))


def collect_statistics(model, inputs) -> list[LayerStats]:
    """Run one unpruned prefill of a single-sample batch and return its per-layer statistics."""
    collector = StatsCollector()
    with torch.no_grad():
        model.prefill(inputs, None, CollectingPlan(collector))
    return collector.layers
