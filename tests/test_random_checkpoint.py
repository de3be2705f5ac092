"""Random full-size checkpoints (for speed measurements of the server and the evaluation on the
real architectures): written in the published LLaVA-NeXT layout, they load as the architecture
they were made for and run end to end."""

import dataclasses
import shutil

import pytest
import torch
from conftest import prompt_ids, random_frames

from aim_llava import load_pretrained_model, tiny_checkpoint
from aim_llava.architectures import architecture
from aim_llava.tiny_checkpoint import write_random_checkpoint


def test_a_random_checkpoint_loads_as_its_architecture(tmp_path):
    """The 0.5B architecture at full width and vocabulary (tied embeddings, 14 heads of 64, the
    so400m tower's widths), cut to two decoder layers and one vision layer to stay small: the
    loaded config equals the one asked for, and a video question gives finite logits and tokens."""
    full = architecture("llava-onevision-qwen2-0.5b")
    config = dataclasses.replace(full, text=dataclasses.replace(full.text, num_hidden_layers=2),
                                 vision=dataclasses.replace(full.vision, num_hidden_layers=1))
    path = write_random_checkpoint(tmp_path / "random-0.5b", config)
    try:
        tokenizer, model, processor, _ = load_pretrained_model(path, device_map="cpu", torch_dtype="float32")
        assert model.config.text == config.text and model.config.vision == config.vision
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the 0.5B checkpoint
        video = processor.preprocess(random_frames(2, 48, 64), return_tensors="pt")["pixel_values"]
        ids = prompt_ids(tokenizer, "Describe the video.")
        with torch.no_grad():
            logits = model(ids, images=[video], modalities=["video"]).logits
        assert logits.shape[-1] == config.text.vocab_size and torch.isfinite(logits).all()
        tokens = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=3, eos_token_id=[])
        assert tokens.shape == (1, 3) and int(tokens.max()) < config.text.vocab_size
    finally:
        shutil.rmtree(path)  # ~300 MB


@pytest.mark.parametrize("layout, processor", [("llava", False), ("llava_qwen", True)])
def test_bad_layout_options_are_refused_before_any_weight_is_made(tmp_path, monkeypatch, layout, processor):
    """A 7B checkpoint's random weights take ~16 GB and minutes: an unknown layout, or processor
    files asked of the LLaVA-NeXT layout, is refused first, and nothing is written."""
    def no_weights(*args, **kwargs):
        raise AssertionError("random weights were made before the layout options were checked")

    monkeypatch.setattr(tiny_checkpoint, "random_state_dict", no_weights)
    with pytest.raises(ValueError, match="layout"):
        write_random_checkpoint(tmp_path / "refused", architecture("llava-onevision-qwen2-7b"), layout=layout,
                                processor=processor)
    assert not (tmp_path / "refused").exists()
