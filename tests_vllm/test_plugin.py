"""The plugin's registration and its refusal of reductions that act inside the LLM."""

from importlib.metadata import entry_points

import pytest
from conftest import aim_overrides, one_by_one, run_vllm

from aim_llava.vllm_plugin import ARCHITECTURE, register


def test_vllm_finds_the_plugin_and_registering_twice_is_harmless():
    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "aim_llava"]
    assert entry.value == "aim_llava.vllm_plugin:register"
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    model_class = ModelRegistry._try_load_model_cls(ARCHITECTURE)  # how vLLM loads a lazy registration
    assert (model_class.__module__, model_class.__name__) == ("aim_llava.vllm_plugin.model", ARCHITECTURE)


def test_a_preset_pruning_inside_the_llm_is_refused_by_name(tmp_path, checkpoint, videos):
    done = run_vllm(tmp_path, checkpoint, aim_overrides("aim_default"), one_by_one(videos[:1]))
    assert done.returncode != 0
    assert "reduction 'aim_default' (method 'aim') acts inside the LLM" in done.stderr
    assert not (tmp_path / "out.pt").exists()


def test_registering_with_a_vllm_that_renamed_an_overridden_method_is_refused_in_one_line(monkeypatch):
    """A vLLM whose LLaVA-OneVision renamed a method the plugin overrides would run its own
    method instead (no reduction, or videos cut): register() refuses it at start, naming the
    method and the tested versions."""
    from aim_llava.vllm_plugin import hooks

    source = hooks.vllm_source()
    assert "def _process_video_pixels(" in source
    renamed = source.replace("def _process_video_pixels(", "def _embed_videos(")
    monkeypatch.setattr(hooks, "vllm_source", lambda: renamed)
    with pytest.raises(hooks.UnsupportedVllmError) as refused:
        register()
    message = str(refused.value)
    assert "\n" not in message
    assert "LlavaOnevisionForConditionalGeneration._process_video_pixels(self, inputs)" in message
    assert "tested with vLLM 0.32.x" in message
