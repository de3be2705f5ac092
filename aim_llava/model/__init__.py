"""The vendored LLaVA-OneVision model (SigLIP + MLP projector + Qwen2)."""

from aim_llava.model.builder import load_pretrained_model
from aim_llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

__all__ = ["LlavaQwenForCausalLM", "load_pretrained_model"]
