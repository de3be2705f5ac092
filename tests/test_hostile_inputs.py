"""Hostile but fair input: each case ends with one line naming what was wrong and exit code 2 (or
one clear CheckpointError from the Python API), never a traceback, never a silent wrong answer."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from aim_llava import load_pretrained_model
from aim_llava.cli import main
from aim_llava.errors import CheckpointError
from aim_llava.sample_media import write_sample_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("hostile") / "clip.mp4", num_frames=20, fps=10)


@pytest.fixture
def ckpt(tiny_qwen_dir, tmp_path):
    return shutil.copytree(tiny_qwen_dir, tmp_path / "ckpt")


def one_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aim-llava: error:") and "Traceback" not in err, err
    return lines[0]


def loading_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pretrained_model(path, device_map="cpu")
    assert "\n" not in str(info.value)
    return str(info.value)


def edit_config(ckpt, change) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(change(config)))


@pytest.mark.parametrize("change, words", [
    (lambda config: [config], "must be a JSON object"),
    (lambda config: {**config, "hidden_size": "64"}, "'hidden_size' must be a positive whole number"),
    (lambda config: {**config, "mm_vision_config": "siglip"}, "'mm_vision_config' must be a JSON object"),
    (lambda config: {**config, "num_attention_heads": 0}, "'num_attention_heads' must be a positive"),
    (lambda config: {**config, "image_grid_pinpoints": [[384, "a"]]}, "image_grid_pinpoints"),
    (lambda config: {**config, "rms_norm_eps": -1}, "'rms_norm_eps' must be a positive number"),
    (lambda config: {**config, "image_aspect_ratio": 5}, "image_aspect_ratio=5 is not supported"),
])
def test_ill_typed_config_fields(ckpt, change, words):
    edit_config(ckpt, change)
    assert words in loading_error(ckpt)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_beyond_the_parsers_recursion_limit(ckpt, name):
    (ckpt / name).write_text("[" * 100_000)
    message = loading_error(ckpt)
    assert f"{name} is not" in message and "nested too deeply" in message


def test_corrupt_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    assert "cannot load the tokenizer" in loading_error(ckpt)


def test_tokenizer_larger_than_the_vocabulary(ckpt):
    edit_config(ckpt, lambda config: {**config, "vocab_size": 100})
    assert "produces ids up to 319 but the model's vocabulary has 100 entries" in loading_error(ckpt)


def test_unreadable_shard_is_not_called_missing(ckpt):
    shard = "model-00002-of-00002.safetensors"
    (ckpt / shard).unlink()
    (ckpt / shard).mkdir()
    message = loading_error(ckpt)
    assert shard in message and "cannot be read" in message and "missing" not in message


def test_malicious_pickle_runs_nothing_and_is_one_line(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (ckpt / name).unlink()
    with open(ckpt / "pytorch_model.bin", "wb") as out:
        pickle.dump({"lm_head.weight": Exploit()}, out)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_model(ckpt, device_map="cpu", allow_pickle=True)
    assert "tensor-only checkpoint" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("args, words", [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--max-new-tokens", str(10**12)], "leaves no room for the prompt"),
])
def test_bad_runtime_options(capsys, tiny_qwen_dir, clip, args, words):
    code = main(["caption", str(clip), "--model", str(tiny_qwen_dir), "--frames", "2", *args])
    assert code == 2 and words in one_line(capsys.readouterr().err)


def test_names_with_line_breaks_stay_on_one_line(capsys, tiny_qwen_dir, tmp_path):
    """A name echoed into an error has its control characters escaped: the error is one line, for
    the run's only input and for a failing item of a batch alike."""
    broken = tmp_path / "two\nlines\u2028.mp4"
    broken.write_bytes(b"not a video")
    code = main(["caption", str(tmp_path / "gone\r\nfile.mp4"), "--model", str(tiny_qwen_dir)])
    assert code == 2 and one_line(capsys.readouterr().err).endswith("file not found: " + str(tmp_path) + "/gone\\r\\nfile.mp4")
    good = write_sample_video(tmp_path / "good.mp4", num_frames=10, fps=10)
    code = main(["caption", str(broken), str(good), "--model", str(tiny_qwen_dir), "--frames", "2",
                 "--max-new-tokens", "2", "--output", str(tmp_path / "out.jsonl")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "two\\nlines\\u2028.mp4" in errors[0]


def test_question_with_invalid_utf8_bytes(tiny_qwen_dir, clip):
    result = subprocess.run([sys.executable, "-m", "aim_llava.cli", "ask", str(clip).encode(), b"What \xff is it?",
                             "--model", str(tiny_qwen_dir).encode(), "--frames", b"2"],
                            capture_output=True, timeout=300)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "the question is not valid UTF-8 text" in one_line(err)


def test_ask_resume_keys_records_by_question(capsys, tiny_qwen_dir, clip, tmp_path):
    output = tmp_path / "answers.jsonl"
    common = ["--model", str(tiny_qwen_dir), "--frames", "2", "--max-new-tokens", "3", "--output", str(output),
              "--resume"]
    assert main(["ask", str(clip), "What moves?", *common]) == 0
    assert main(["ask", str(clip), "What colour is it?", *common]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["question"] for r in records] == ["What moves?", "What colour is it?"]
    assert all(r["error"] is None and r["text"] is not None for r in records)
