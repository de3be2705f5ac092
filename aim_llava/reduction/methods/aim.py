"""AIM: merge similar tokens within each frame before the LLM, then prune by PageRank importance
inside the LLM on a retention schedule (docs/algorithms.md §2 and §3)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from aim_llava.reduction.importance import (
    IMPORTANCE_KERNELS,
    log_importance,
    log_start_weights,
)
from aim_llava.reduction.merge import (
    ORDERS,
    WEIGHTINGS,
    merge_state,
    merge_steps_for_ratio,
    merge_tokens,
    tokens_after_steps,
)
from aim_llava.reduction.plan import PruningPlan, RecordingReducer
from aim_llava.reduction.provenance import OriginTrace
from aim_llava.reduction.schedule import (
    SCHEDULE_KINDS,
    RetentionSchedule,
    ScheduleError,
)
from aim_llava.reduction.tokens import (
    PRUNE_MODES,
    LayerAttention,
    TokenState,
    keep_top_visual,
)
from aim_llava.timing import stage


@dataclass(frozen=True)
class AimOptions:
    """Settings of AIM; every one can be given in a preset YAML or ``overwrite_config``.

    merge_ratio: share of each frame's tokens kept by merging (None: no merging);
    merge_steps: explicit per-step merge counts instead of a ratio;
    merge_order: "published" (unmerged sources first) or "spatial"; merge_weighting: "mean"
    (published) or "size"; image_merge_ratio: merging of image tokens (None: images untouched);
    prune: "published" | "linear" | "explicit" | None; prune_start (l1; None adapts to the depth:
    14 of 28 layers, 13 of 32, else half), prune_end (l2, linear only), prune_step (published),
    prune_floor (linear), prune_retention (explicit, one value per layer);
    prune_mode: "remove" (tokens really dropped) or "mask" (the published masking, eager attention);
    importance_temperature / importance_iterations / importance_chunk_size: PageRank settings
    (the chunk size, in query rows, is chosen from a memory budget when None);
    importance_kernel: "auto" (on CUDA the fused Triton kernel in bf16/fp16 where it is known to
    compile to tensor-core code, chunked otherwise and in float32; factored on the CPU), "fused",
    "chunked", "factored" or "flex" (see ``aim_llava.reduction.importance``).
    """

    merge_ratio: float | None = 0.25
    merge_steps: tuple[int, ...] | None = None
    merge_order: str = "published"
    merge_weighting: str = "mean"
    image_merge_ratio: float | None = None
    prune: str | None = "published"
    prune_start: int | None = None
    prune_end: int | None = None
    prune_step: float = 0.125
    prune_floor: float = 0.0
    prune_retention: tuple[float, ...] | None = None
    prune_mode: str = "remove"
    importance_temperature: float = 0.1
    importance_iterations: int = 5
    importance_chunk_size: int | None = None
    importance_kernel: str = "auto"

    def __post_init__(self) -> None:
        for name in ("merge_ratio", "image_merge_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ScheduleError(f"{name}={value} must lie in (0, 1]")
        if self.merge_steps is not None and any(r < 0 for r in self.merge_steps):
            raise ScheduleError(f"merge_steps must be non-negative counts, got {list(self.merge_steps)}")
        choices = {"merge_order": ORDERS, "merge_weighting": WEIGHTINGS, "prune_mode": PRUNE_MODES,
                   "prune": SCHEDULE_KINDS + (None,), "importance_kernel": IMPORTANCE_KERNELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ScheduleError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(str, allowed))}")
        if not 0.0 < self.prune_step <= 1.0:
            raise ScheduleError(f"prune_step={self.prune_step} must lie in (0, 1]")
        if not 0.0 <= self.prune_floor <= 1.0:
            raise ScheduleError(f"prune_floor={self.prune_floor} must lie in [0, 1]")
        if self.prune == "explicit" and self.prune_retention is None:
            raise ScheduleError("prune: explicit needs prune_retention (one value per layer)")
        if self.prune == "linear" and self.prune_end is None:
            raise ScheduleError("prune: linear needs prune_end")
        if self.importance_temperature <= 0 or self.importance_iterations < 1:
            raise ScheduleError("importance_temperature must be > 0 and importance_iterations >= 1")
        if self.importance_chunk_size is not None and self.importance_chunk_size < 1:
            raise ScheduleError(f"importance_chunk_size={self.importance_chunk_size} must be at least 1 (or null: "
                                "chosen from a memory budget)")

    def schedule(self, num_layers: int) -> RetentionSchedule:
        if self.prune is None:
            return RetentionSchedule.none(num_layers)
        if self.prune == "published":
            return RetentionSchedule.published(num_layers, self.prune_start, self.prune_step)
        if self.prune == "linear":
            start = num_layers // 2 if self.prune_start is None else self.prune_start
            if self.prune_end >= num_layers:
                raise ScheduleError(f"prune_end={self.prune_end} is beyond the model's {num_layers} layers")
            return RetentionSchedule.linear(num_layers, start, self.prune_end, self.prune_floor)
        return RetentionSchedule.explicit(list(self.prune_retention), num_layers)


class AimPruner(RecordingReducer):
    """Keeps, after each scheduled layer, the text tokens and the most important visual tokens."""

    def __init__(self, schedule: RetentionSchedule, options: AimOptions):
        super().__init__(options.prune_mode)
        self.schedule = schedule
        self.options = options

    def wants_attention(self, layer: int) -> bool:
        return self.schedule.prunes_after(layer)

    def importance(self, state: TokenState, attention: LayerAttention) -> torch.Tensor:
        """Log PageRank importance [B, N] over the tokens still attended to (every real row, pruned
        ones in mask mode included, starts with the same weight, as published)."""
        options = self.options
        with stage("importance", state.hidden.device):
            return log_importance(attention.q, attention.k, state.alive, log_start_weights(state.valid),
                                  attention.scale, options.importance_temperature, options.importance_iterations,
                                  options.importance_kernel, options.importance_chunk_size)

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if not self.schedule.prunes_after(layer):
            return state
        # Text always stays; of the visual tokens, int(original count * retention) with the
        # highest importance (docs/algorithms.md §3).
        wanted = [self.schedule.kept(layer, visual) for visual in state.num_visual]
        keep, kept = keep_top_visual(state, self.importance(state, attention), wanted)
        return self.apply(layer, state, keep, kept)


class AimPlan(PruningPlan):
    def __init__(self, options: AimOptions, num_layers: int, name: str = "aim"):
        self.name = name
        self.options = options
        self.schedule = options.schedule(num_layers)

    def steps(self, num_tokens: int, ratio: float | None) -> list[int]:
        if self.options.merge_steps is not None:
            return list(self.options.merge_steps)
        return [] if ratio is None else merge_steps_for_ratio(num_tokens, ratio)

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        return tokens_after_steps(tokens_per_frame, self.steps(tokens_per_frame, self.options.merge_ratio))

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        return self.schedule.kept(layer, num_visual)

    def reduce_video_frames(self, frames: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        return self.merged(frames, self.steps(frames.shape[1], self.options.merge_ratio), trace)

    def reduce_image_tokens(self, tokens: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        if self.options.image_merge_ratio is None:
            return tokens
        steps = merge_steps_for_ratio(tokens.shape[0], self.options.image_merge_ratio)
        return self.merged(tokens[None], steps, trace)[0]

    def merged(self, groups: torch.Tensor, steps: list[int], trace: OriginTrace | None) -> torch.Tensor:
        """Each group of [G, T, C] merged by ``steps`` (reported to ``trace`` when given)."""
        if not steps:
            return groups
        if trace is None:
            return merge_tokens(groups, steps, self.options.merge_order, self.options.merge_weighting)
        state = merge_state(groups, steps, self.options.merge_order, self.options.merge_weighting, track=True)
        trace.regroup(state.origin, state.tokens.shape[1])
        return state.tokens

    def reduce_video_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each temporal group merged as a frame is; a merged token keeps its destination's cell."""
        return self.merged_groups(tokens, self.steps(tokens.shape[1], self.options.merge_ratio), trace)

    def reduce_image_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = self.options.image_merge_ratio
        return self.merged_groups(tokens, [] if ratio is None else merge_steps_for_ratio(tokens.shape[1], ratio),
                                  trace)

    def merged_groups(self, tokens: torch.Tensor, steps: list[int], trace: OriginTrace | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group of [G, T, C] merged by ``steps``, and the cell each token keeps (where the
        tokens went reported to ``trace`` when given)."""
        state = merge_state(tokens, steps, self.options.merge_order, self.options.merge_weighting,
                            track=trace is not None)
        if trace is not None:
            trace.regroup(state.origin, state.tokens.shape[1])
        return state.tokens, state.positions

    def layer_reducer(self, num_layers: int) -> AimPruner | None:
        return AimPruner(self.schedule, self.options) if self.schedule.prunes else None

    def visual_key(self) -> Hashable:
        """Only the merging settings decide the visual tokens (the pruning acts inside the LLM)."""
        options = self.options
        if options.merge_ratio is None and options.merge_steps is None and options.image_merge_ratio is None:
            return None
        return ("aim_merge", options.merge_ratio, options.merge_steps, options.merge_order, options.merge_weighting,
                options.image_merge_ratio)

    def text_free_layers(self, num_layers: int) -> int:
        """The layers before the first pruning layer, whose PageRank reads the question's tokens."""
        return next((layer for layer in range(num_layers) if self.schedule.prunes_after(layer)), num_layers)

    @property
    def attn_implementation(self) -> str | None:
        """Mask mode needs eager attention only when something is pruned (merging alone does not)."""
        return super().attn_implementation if self.schedule.prunes else None
