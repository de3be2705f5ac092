"""Broken checkpoints give one clear CheckpointError naming the file or tensor at fault."""

import json
import shutil

import pytest
import torch
from conftest import prompt_ids
from safetensors.torch import load_file, save_file

from aim_llava import load_pretrained_model
from aim_llava.errors import CheckpointError

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"


@pytest.fixture
def ckpt(tiny_qwen_dir, tmp_path):
    """A private copy of the tiny LLaVA-NeXT-layout checkpoint that a test may break."""
    return shutil.copytree(tiny_qwen_dir, tmp_path / "ckpt")


def load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pretrained_model(path, device_map="cpu", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_shard(ckpt):
    (ckpt / SHARD_2).unlink()
    message = load_error(ckpt)
    assert SHARD_2 in message and "missing" in message


def test_renamed_tensor(ckpt):
    state = load_file(str(ckpt / SHARD_1))
    old = next(name for name in state if name.startswith("model.layers.1.mlp.up_proj"))
    state[old.replace("up_proj", "upper_proj")] = state.pop(old)
    save_file(state, str(ckpt / SHARD_1))
    message = load_error(ckpt)
    assert "upper_proj" in message and SHARD_1 in message


def test_missing_tensor(ckpt):
    state = load_file(str(ckpt / SHARD_1))
    victim = sorted(state)[3]
    del state[victim]
    save_file(state, str(ckpt / SHARD_1))
    assert victim in load_error(ckpt)


def test_wrong_hidden_size(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    message = load_error(ckpt)
    assert "shape" in message and "config" in message


def test_pickled_checkpoint_refused_unless_allowed(ckpt, loaded):
    state = {**load_file(str(ckpt / SHARD_1)), **load_file(str(ckpt / SHARD_2))}
    for name in (SHARD_1, SHARD_2, "model.safetensors.index.json"):
        (ckpt / name).unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    message = load_error(ckpt)
    assert "pytorch_model.bin" in message and "allow_pickle=True" in message

    tokenizer, reference, _, _ = loaded
    _, model, _, _ = load_pretrained_model(ckpt, device_map="cpu", torch_dtype="float32", allow_pickle=True)
    ids = prompt_ids(tokenizer, "Hello.", num_images=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_unexpected_tensor_rejected(ckpt):
    state = load_file(str(ckpt / SHARD_2))
    state["model.some_adapter.weight"] = torch.zeros(2, 2)
    save_file(state, str(ckpt / SHARD_2))
    assert "model.some_adapter.weight" in load_error(ckpt)


def test_unused_vision_parts_are_tolerated(tiny_qwen_dir):
    names = set()
    for shard in (SHARD_1, SHARD_2):
        names |= set(load_file(str(tiny_qwen_dir / shard)))
    # the fixture checkpoint really holds the parts LLaVA never runs, and still loads
    assert any("vision_model.post_layernorm" in n for n in names)
    assert any("encoder.layers.2." in n for n in names)
    load_pretrained_model(tiny_qwen_dir, device_map="cpu")


def test_not_a_directory(tmp_path):
    assert "not a local directory" in load_error(tmp_path / "nope")
    assert "not a local directory" in load_error("lmms-lab/llava-onevision-qwen2-7b-ov")


def test_missing_config_and_unknown_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "model_type 'llama'" in load_error(ckpt)
    (ckpt / "config.json").unlink()
    assert "no config.json" in load_error(ckpt)


def test_unknown_vision_tower(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    del config["mm_vision_config"]
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "unknown vision tower" in load_error(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    assert "tokenizer" in load_error(ckpt)


def test_overwrite_config(tiny_qwen_dir):
    assert "unknown key 'not_a_field'" in load_error(tiny_qwen_dir, overwrite_config={"not_a_field": 1})
    _, model, _, max_length = load_pretrained_model(
        tiny_qwen_dir, device_map="cpu", overwrite_config={"tokenizer_model_max_length": 4096}
    )
    assert max_length == 4096 and model.config.tokenizer_model_max_length == 4096
