"""aim-llava: fast video/image LLM inference with training-free visual-token reduction."""

from aim_llava.model.builder import load_pretrained_model

__all__ = ["load_pretrained_model"]
__version__ = "0.1.0"
