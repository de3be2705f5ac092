"""AIM's merging inside vLLM: an out-of-tree LLaVA-OneVision whose video frames are reduced by an
aim-llava preset before the LLM (docs/vllm.md).

vLLM calls :func:`register` in each of its processes (the ``vllm.general_plugins`` entry point of
this package). A model is then selected with
``hf_overrides={"architectures": [ARCHITECTURE], "aim_reduction": "aim_merge_only"}``, on
``vllm.LLM(...)`` as on ``vllm serve --hf-overrides '{...}'``; a request may ask for another
shipped preset with ``mm_processor_kwargs={"aim_reduction": NAME}``. This module imports no vLLM
code until :func:`register` runs, so discovering the plugin stays light.
"""

from __future__ import annotations

ARCHITECTURE = "AimLlavaOnevisionForConditionalGeneration"
CONFIG_KEY = "aim_reduction"


def register() -> None:
    """Register the architecture with vLLM's model registry (lazily, by name: the model module is
    imported when a model is built), once this vLLM is known to have the methods the plugin
    overrides (:mod:`aim_llava.vllm_plugin.hooks`; tested: vLLM 0.32.x); otherwise a one-line
    :class:`~aim_llava.vllm_plugin.hooks.UnsupportedVllmError`. Registering again is harmless."""
    from vllm import ModelRegistry

    from aim_llava.vllm_plugin.hooks import check_vllm

    check_vllm()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}.model:{ARCHITECTURE}")
