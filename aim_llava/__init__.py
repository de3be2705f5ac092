"""aim-llava: fast video/image LLM inference with training-free visual-token reduction.

The package face is lazy: ``from aim_llava import load_pretrained_model`` (or ``VideoLLM``)
imports torch and the model only when asked for, so ``aim-llava --help`` and plugin discovery
stay light.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "load_pretrained_model": "aim_llava.model.builder",
    "VideoLLM": "aim_llava.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'aim_llava' has no attribute {name!r}")
