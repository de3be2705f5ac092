"""Loading Qwen2.5-VL checkpoints: both config layouts, both tensor-name sets, shards, tied and
untied heads, and every missing, unexpected or misshapen tensor named."""

import json
import shutil

import pytest
import torch
from conftest import random_frames
from safetensors import safe_open
from safetensors.torch import save_file

from aim_llava import load_pretrained_model
from aim_llava.errors import CheckpointError
from aim_llava.model.families import read_config_file
from aim_llava.tiny_checkpoint import write_shards
from aim_llava.tiny_qwen2_5_vl import write_tiny_qwen_checkpoint


def tensors(directory):
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            state.update({name: handle.get_tensor(name) for name in handle.keys()})
    return state


def copy_without_weights(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return target


def video_logits(directory, frames):
    tokenizer, model, processor, _ = load_pretrained_model(directory, device_map="cpu", torch_dtype="float32")
    ids = torch.tensor([[1, 3, -200, 4, 9, 10, 2]])
    with torch.no_grad():
        return model, model(ids, images=[processor.video(frames, "cpu")]).logits


def load_error(directory) -> str:
    with pytest.raises(CheckpointError) as error:
        load_pretrained_model(directory, device_map="cpu", torch_dtype="float32")
    assert "\n" not in str(error.value)
    return str(error.value)


def test_transformers_5_names_in_shards_load_the_same_model(hf_qwen25_dir, tmp_path):
    """``model.visual.*`` / ``model.language_model.*`` (what transformers 5 holds in memory, and some
    exports save), split over two shards with an index, load into the same model."""
    renamed = {("model.language_model." + name[len("model."):] if name.startswith("model.") else
                "model." + name if name.startswith("visual.") else name): t for name, t in tensors(hf_qwen25_dir).items()}
    assert any(name.startswith("model.visual.") for name in renamed)
    target = copy_without_weights(hf_qwen25_dir, tmp_path / "renamed")
    write_shards(target, renamed, 2)
    frames = random_frames(2, 112, 112, seed=1)
    _, reference = video_logits(hf_qwen25_dir, frames)
    _, logits = video_logits(target, frames)
    assert torch.equal(logits, reference)


def test_tied_head_loads_without_lm_head(tmp_path):
    directory = write_tiny_qwen_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors(directory)
    model, _ = video_logits(directory, random_frames(2, 112, 112))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_head_without_lm_head_is_named(tiny_qwen25_dir, tmp_path):
    state = tensors(tiny_qwen25_dir)
    del state["lm_head.weight"]
    target = copy_without_weights(tiny_qwen25_dir, tmp_path / "missing")
    save_file(state, str(target / "model.safetensors"))
    assert "tensor lm_head.weight is missing from the checkpoint" in load_error(target)


@pytest.mark.parametrize("change, message", [
    ("unexpected", "unexpected tensor visual.blocks.9.norm1.weight in model.safetensors: not part of a Qwen2.5-VL model"),
    ("shape", "tensor visual.merger.mlp.0.weight in model.safetensors has shape [4, 4]"),
    ("missing", "tensor visual.blocks.2.attn.qkv.weight is missing from the checkpoint"),
])
def test_bad_tensors_are_named(tiny_qwen25_dir, tmp_path, change, message):
    state = tensors(tiny_qwen25_dir)
    if change == "unexpected":
        state["visual.blocks.9.norm1.weight"] = torch.ones(32)
    elif change == "shape":
        state["visual.merger.mlp.0.weight"] = torch.ones(4, 4)
    else:
        del state["visual.blocks.2.attn.qkv.weight"]
    target = copy_without_weights(tiny_qwen25_dir, tmp_path / change)
    save_file(state, str(target / "model.safetensors"))
    assert message in load_error(target)


def test_both_config_layouts_read_alike(tiny_qwen25_dir, hf_qwen25_dir):
    published, nested = read_config_file(tiny_qwen25_dir / "config.json"), read_config_file(hf_qwen25_dir / "config.json")
    assert (published.layout, nested.layout) == ("published", "transformers")
    assert published.text == nested.text
    assert published.vision == nested.vision
    assert published.text.mrope_section == (2, 3, 3) and published.vision.fullatt_block_indexes == (1, 3)


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 2]}}, "must add up to half the head size 16"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type 'yarn' is not supported"),
    ({"vision_config": {"hidden_act": "gelu"}}, "vision hidden_act 'gelu' is not supported"),
    ({"hidden_size": 128, "num_attention_heads": 8}, "the vision merger gives 64 features but the LLM's hidden size is 128"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
])
def test_config_errors_are_one_line(tiny_qwen25_dir, tmp_path, edit, message):
    raw = json.loads((tiny_qwen25_dir / "config.json").read_text())
    for key, value in edit.items():
        raw[key] = {**raw[key], **value} if key == "vision_config" else value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as error:
        read_config_file(tmp_path / "config.json")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_processor_settings_come_from_either_file_layout(qwen25, tiny_qwen25_dir):
    """transformers 5's processor_config.json and the published preprocessor files give the same
    settings (both tiny checkpoints: 16 to 64 tokens a video frame)."""
    from aim_llava.model.qwen2_5_vl.processor import ProcessorSettings

    _, model, processor, _ = qwen25
    published = ProcessorSettings.read(tiny_qwen25_dir, model.config.vision)
    assert processor.settings == published
    assert (published.video_min_pixels, published.video_max_pixels) == (16 * 784, 64 * 784)
    assert processor.chat_template is not None
