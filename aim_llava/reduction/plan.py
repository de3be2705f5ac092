"""The points where a reduction method acts, and what it leaves on record.

A :class:`ReductionPlan` is an argument of a model call (``model.generate(..., reduction=plan)``):
the model calls it after the projector (video frames, image tokens) and, through a fresh
:class:`LayerReducer` per prefill, after each decoder layer; what it did comes back with the
call's output as a :class:`ReductionRecord`. The model does not know which method is behind the
plan, and a plan holds no per-call state, so one model can serve calls with different plans at
the same time. A call that asks where its visual tokens came from passes an
:class:`~aim_llava.reduction.provenance.OriginTrace` to the hooks before the LLM, and each hook
that changes the tokens reports there which output token each input token went to.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from aim_llava.model.config import VisionConfig
from aim_llava.reduction.provenance import OriginTrace
from aim_llava.reduction.tokens import (
    LayerAttention,
    LayerReducer,
    TokenState,
    VisionReducer,
    keep_tokens,
)


@dataclass
class ReductionRecord:
    """What token reduction did in one prefill.

    visual_tokens_per_layer[l][b]: visual tokens of sample b entering layer l (after any merging
    before the LLM). kept[l]: [B, prefill length] mask of the rows kept after layer l (every row
    kept so far: masks of later layers hold those of earlier ones). merges[(l, b)]: rows folded
    into others after layer l (methods that compress). visual: [B, prefill length] mask of the
    visual-token rows (the i-th True row of a sample is its i-th visual token).
    """

    plan: str
    visual_tokens_per_layer: list[list[int]]
    kept: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    merges: dict = field(default_factory=dict, repr=False)
    visual: torch.Tensor | None = field(default=None, repr=False)

    def sample(self, row: int) -> ReductionRecord:
        """The record of one sample of the batch."""
        return ReductionRecord(
            self.plan,
            [[layer[row]] for layer in self.visual_tokens_per_layer],
            {layer: mask[row : row + 1] for layer, mask in self.kept.items()},
            {(layer, 0): merge for (layer, sample), merge in self.merges.items() if sample == row},
            self.visual[row : row + 1] if self.visual is not None else None,
        )

    def visual_alive(self, layer: int, row: int = 0) -> torch.Tensor:
        """[visual tokens of sample ``row``] (on the CPU): which of its visual tokens, in order,
        enter decoder layer ``layer`` (the number of layers: which leave the last one)."""
        if self.visual is None:
            raise ValueError("this record does not say which rows were visual tokens")
        visual = self.visual[row].cpu()
        decided = [earlier for earlier in self.kept if earlier < layer]
        if not decided:
            return torch.ones(int(visual.sum()), dtype=torch.bool)
        return self.kept[max(decided)][row].cpu()[visual]


class ReductionPlan:
    """No reduction. Methods override the hooks they need."""

    name = "baseline"

    def reduce_video_frames(self, frames: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        """Projected, pooled frame tokens [F, T, C] -> [F, T', C]; a method that changes them
        reports to ``trace``, when given, where each token went (``trace.regroup``)."""
        return frames

    def reduce_image_tokens(self, tokens: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        """One image's tokens [T, C] (anyres packed) -> [T', C]; reported to ``trace`` likewise."""
        return tokens

    def reduce_video_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """A video's tokens in temporal groups [G, T, C], each a ``grid`` of (rows, columns) in
        raster order (families whose tokens keep grid positions: Qwen2.5-VL) -> the tokens left
        [G, T', C] and, per token, the grid cell (raster index) whose position it keeps [G, T'].
        A method that changes the tokens reports to ``trace``, when given, where each input token
        went (``trace.regroup``): the cell a token keeps is not all it stands for."""
        return tokens, grid_cells(tokens)

    def reduce_image_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """An image's one group of tokens [1, T, C] on a ``grid``, as :meth:`reduce_video_groups`."""
        return tokens, grid_cells(tokens)

    def layer_reducer(self, num_layers: int) -> LayerReducer | None:
        """A fresh reducer for one prefill, or None."""
        return None

    def vision_reducer(self, vision: VisionConfig) -> VisionReducer | None:
        """A fresh reducer for one pass of the vision tower, or None."""
        return None

    def vision_tokens_per_layer(self, vision: VisionConfig) -> list[int]:
        """Patches entering each tower layer (for accounting)."""
        return [vision.num_patches] * vision.num_hidden_layers

    def vision_tokens_after(self, vision: VisionConfig) -> int:
        """Patches per view leaving the tower (for accounting)."""
        return vision.num_patches

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        """How many tokens a frame of ``tokens_per_frame`` keeps before the LLM (for accounting)."""
        return tokens_per_frame

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        """Visual tokens still attended to after ``layer`` out of ``num_visual`` (for accounting)."""
        return num_visual

    def visual_key(self) -> Hashable:
        """What decides this plan's work before the LLM (the vision-tower reducer, frame and image
        merging): plans with equal keys turn the same frames into the same visual tokens, so an
        encoded video can be reused across them. None: the plan does nothing before the LLM. A
        plan that overrides one of those hooks is keyed by its class and options unless it says
        more precisely what matters."""
        hooks = ("reduce_video_frames", "reduce_image_tokens", "reduce_video_groups", "reduce_image_groups",
                 "vision_reducer")
        if all(getattr(type(self), hook) is getattr(ReductionPlan, hook) for hook in hooks):
            return None
        return type(self).__qualname__, getattr(self, "options", None)

    def text_free_layers(self, num_layers: int) -> int:
        """How many leading decoder layers compute the same keys and values for the prompt's
        prefix (system text and visual tokens) whatever question follows: the layers before the
        first one whose reduction reads the question (every layer when no layer reducer runs; 0
        for a reducer that does not say)."""
        return num_layers if self.layer_reducer(num_layers) is None else 0

    @property
    def attn_implementation(self) -> str | None:
        """An attention backend the method needs in the LLM (None: the model's own)."""
        return None

    @property
    def prune_mode(self) -> str:
        """How its layer reducer drops tokens: "remove" or "mask"."""
        return "remove"


def grid_cells(tokens: torch.Tensor) -> torch.Tensor:
    """[G, T]: every token of [G, T, C] standing for its own cell."""
    return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)


class PruningPlan(ReductionPlan):
    """A plan whose layer reducer drops tokens as ``self.options.prune_mode`` says; mask mode
    needs eager attention, as the published implementations use."""

    options: object

    @property
    def prune_mode(self) -> str:
        return self.options.prune_mode

    @property
    def attn_implementation(self) -> str | None:
        return "eager" if self.prune_mode == "mask" else None


@dataclass
class Merge:
    """Rows of one sample folded into others: X_t <- (X_t + sum_s w_st X_s) / (1 + sum_s w_st).

    sources / targets are prefill (original) indices; weights is [sources, targets].
    """

    sources: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor


def apply_merge(hidden: torch.Tensor, original_index: torch.Tensor, merge: Merge, length: int) -> None:
    """Apply a merge in place to one sample's hidden rows [N, D]; ``original_index`` [N] maps the
    rows to prefill indices, which are below ``length``."""
    lookup = torch.full((length,), -1, dtype=torch.long, device=hidden.device)
    lookup[original_index] = torch.arange(len(original_index), device=hidden.device)
    sources, targets = lookup[merge.sources], lookup[merge.targets]
    mixed = hidden[targets].float() + merge.weights.T @ hidden[sources].float()
    hidden[targets] = (mixed / (1 + merge.weights.sum(dim=0))[:, None]).to(hidden.dtype)


class RecordingReducer(LayerReducer):
    """Base for reducers that drop tokens: keeps, per pruning layer, which prefill rows were kept
    and which rows were merged into which."""

    def __init__(self, mode: str):
        self.mode = mode
        self.kept: dict[int, torch.Tensor] = {}
        self.merges: dict[tuple[int, int], Merge] = {}

    def merge(self, layer: int, sample: int, state: TokenState, merge: Merge) -> None:
        """Fold rows of ``sample`` (in place in ``state.hidden``) and keep the record."""
        apply_merge(state.hidden[sample], state.original_index[sample], merge, state.prefill_length)
        self.merges[(layer, sample)] = merge

    def apply(self, layer: int, state: TokenState, keep: torch.Tensor, visual_kept: list[int]) -> TokenState:
        """Keep the rows of ``keep`` (with ``visual_kept[b]`` visual rows) and record them."""
        keep = keep & state.alive
        mask = torch.zeros(keep.shape[0], state.prefill_length, dtype=torch.bool, device=keep.device)
        self.kept[layer] = mask.scatter(1, state.original_index, keep)
        return keep_tokens(state, keep, self.mode, visual_kept)


class ReplayReducer(LayerReducer):
    """Repeats the decisions of an earlier prefill of the same prompt.

    Rows beyond that prefill (tokens generated since) are always kept, so a prefill over
    prompt + generated tokens sees the same visual tokens at every layer as cached decoding. This
    is the reference path of uncached generation: it reads the kept counts back from the device.
    """

    def __init__(self, kept: dict[int, torch.Tensor], mode: str, merges: dict[tuple[int, int], Merge] | None = None):
        self.mode = mode
        self.recorded = kept
        self.merges = merges or {}

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if layer not in self.recorded:
            return state
        for sample in range(state.hidden.shape[0]):
            if (layer, sample) in self.merges:
                apply_merge(state.hidden[sample], state.original_index[sample], self.merges[(layer, sample)],
                            state.prefill_length)
        recorded = self.recorded[layer]
        prompt_length = recorded.shape[1]
        inside = state.original_index < prompt_length
        keep = (recorded.gather(1, state.original_index.clamp(max=prompt_length - 1)) | ~inside) & state.alive
        return keep_tokens(state, keep, self.mode, (keep & state.visual).sum(dim=1).tolist())
