"""A Hugging Face model id loads offline from the local Hugging Face cache, in either checkpoint
layout, wherever HF_HUB_CACHE / HF_HOME / the default put the cache; a missing one says where it
looked and how to get it."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from aim_llava import load_pretrained_model
from aim_llava.cli import main
from aim_llava.errors import CheckpointError


def cache_model(hub: Path, repo_id: str, checkpoint: Path, revision: str = "0123abcd") -> Path:
    """``checkpoint`` laid out as huggingface_hub downloads it into the hub cache ``hub``: the files
    as blobs named by their digest, the snapshot a folder of links to them, refs/main its name."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def first_logits(model_path) -> torch.Tensor:
    tokenizer, model, _, _ = load_pretrained_model(model_path, device_map="cpu", torch_dtype="float32")
    ids = torch.tensor([tokenizer("Hello there").input_ids])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout", ["llava_qwen", "hf"])
def test_an_id_in_the_hub_cache_loads_the_same_model(tmp_path, monkeypatch, tiny_qwen_dir, tiny_hf_dir, layout):
    checkpoint = tiny_qwen_dir if layout == "llava_qwen" else tiny_hf_dir
    cache_model(tmp_path / "hub", "lmms-lab/tiny-ov", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert torch.equal(first_logits("lmms-lab/tiny-ov"), first_logits(checkpoint))


@pytest.mark.parametrize("where", ["HF_HOME", "default"])
def test_the_cache_is_found_where_huggingface_hub_puts_it(tmp_path, monkeypatch, tiny_qwen_dir, where):
    """$HF_HOME/hub, else ~/.cache/huggingface/hub (refs/main picks among several snapshots)."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if where == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        hub = tmp_path / "hf" / "hub"
    else:
        monkeypatch.delenv("HF_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    snapshot = cache_model(hub, "org/tiny", tiny_qwen_dir, revision="bbbb")
    (snapshot.parent / "aaaa").mkdir()  # an older revision, left empty
    from aim_llava.model.builder import model_directory

    assert model_directory("org/tiny") == snapshot


def test_the_command_line_takes_an_id_and_records_its_snapshot(capsys, tmp_path, monkeypatch, tiny_qwen_dir):
    from aim_llava.sample_media import write_sample_video

    snapshot = cache_model(tmp_path / "hub", "org/tiny", tiny_qwen_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    clip = write_sample_video(tmp_path / "clip.mp4", num_frames=10)
    common = [str(clip), "--frames", "2", "--max-new-tokens", "3", "--json"]
    assert main(["caption", *common, "--model", "org/tiny"]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main(["caption", *common, "--model", str(tiny_qwen_dir)]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert by_id["text"] == by_dir["text"] and by_id["error"] is None
    assert by_id["settings"]["model"] == os.path.realpath(snapshot)


def test_a_missing_id_says_where_it_looked_and_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError) as caught:
        load_pretrained_model("lmms-lab/llava-onevision-qwen2-0.5b-ov")
    message = str(caught.value)
    assert str(tmp_path / "hub" / "models--lmms-lab--llava-onevision-qwen2-0.5b-ov") in message
    assert "huggingface-cli download lmms-lab/llava-onevision-qwen2-0.5b-ov" in message
    assert "model/README.md" not in message
    assert main(["caption", "clip.mp4", "--model", "lmms-lab/llava-onevision-qwen2-0.5b-ov"]) == 2
    assert "nor in the Hugging Face cache" in capsys.readouterr().err
