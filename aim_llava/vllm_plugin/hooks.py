"""The methods of vLLM's LLaVA-OneVision that the plugin overrides or calls, checked when vLLM
loads the plugin: a vLLM that renamed one of them would otherwise run its own method instead of
the plugin's (no reduction, or videos cut to the declared count) without a word.

The check reads the source of vLLM's module instead of importing it: vLLM loads the plugin in
every process it starts, whatever model it serves, and importing the model module there would
cost seconds."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

TESTED_VLLM = "0.32"
MODULE = "vllm.model_executor.models.llava_onevision"
# class -> method -> the parameters (after self) the plugin passes or receives by name
HOOKS: dict[str, dict[str, tuple[str, ...]]] = {
    "LlavaOnevisionProcessingInfo": {
        "_get_num_frame_tokens": ("image_width", "image_height"),
        "get_num_video_tokens": ("image_width", "image_height", "num_frames"),
        "get_image_size_with_most_features": (),
    },
    "LlavaOnevisionMultiModalProcessor": {
        "_apply_hf_processor_main": ("mm_items", "hf_kwargs"),
        "_get_mm_fields_config": ("hf_inputs", "hf_processor_mm_kwargs"),
        "_get_prompt_updates": ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
    },
    "LlavaOnevisionForConditionalGeneration": {
        "_parse_and_validate_video_input": (),
        "_process_video_pixels": ("inputs",),
        "_video_pixels_to_features": ("vision_tower", "pixel_values"),
    },
}


class UnsupportedVllmError(RuntimeError):
    """A vLLM without the methods the plugin overrides."""


def vllm_source() -> str:
    """The source of vLLM's LLaVA-OneVision module, unimported."""
    return Path(importlib.util.find_spec(MODULE).origin).read_text()


def defined_methods(source: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """Class -> method -> its parameter names after self, for the classes defined in ``source``."""
    return {node.name: {method.name: tuple(arg.arg for arg in method.args.args[1:] + method.args.kwonlyargs)
                        for method in node.body if isinstance(method, ast.FunctionDef)}
            for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def missing_hooks(source: str) -> list[str]:
    """``Class.method(params)`` of :data:`HOOKS` that ``source`` lacks or names differently."""
    defined = defined_methods(source)
    missing = []
    for class_name, methods in HOOKS.items():
        for method, params in methods.items():
            found = defined.get(class_name, {}).get(method)
            if found is None or not set(params) <= set(found):
                missing.append(f"{class_name}.{method}({', '.join(('self',) + params)})")
    return missing


def check_vllm() -> None:
    """Refuse, in one line, a vLLM whose LLaVA-OneVision lacks a method the plugin overrides."""
    missing = missing_hooks(vllm_source())
    if missing:
        from vllm import __version__

        raise UnsupportedVllmError(
            f"aim-llava's vLLM plugin overrides {', '.join(missing)} of {MODULE}, which vLLM {__version__} does "
            f"not have: aim-llava is tested with vLLM {TESTED_VLLM}.x; install that (pip install 'aim-llava[vllm]'), "
            f"or leave the plugin out by naming the plugins to load in VLLM_PLUGINS"
        )
