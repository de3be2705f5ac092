"""The multimodal projector between the vision tower and the LLM."""

from __future__ import annotations

from torch import nn

from aim_llava.errors import CheckpointError


def build_vision_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """``mlp2x_gelu``: Linear -> GELU -> Linear, named ``0`` and ``2`` as in the checkpoints."""
    if projector_type != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {projector_type!r} is not supported (only mlp2x_gelu)")
    return nn.Sequential(nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))
