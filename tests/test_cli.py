"""The aim-llava command: outputs, bad input (exit 2, one line), batches, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DTYPE_NOTE, without_dtype_note
from PIL import Image

from aim_llava.cli import main
from aim_llava.pipeline import DEFAULT_CAPTION_PROMPT
from aim_llava.sample_media import write_sample_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    good = write_sample_video(root / "good.mp4", num_frames=40, fps=20)
    write_sample_video(root / "other.mp4", num_frames=25, fps=25)
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "no_images").mkdir()
    return root


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr lines that are ours (tqdm draws its bar with carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("aim-llava:")]


def test_caption_json(capsys, media, tiny_qwen_dir):
    code, out, err = run_cli(capsys, "caption", media / "good.mp4", "--model", tiny_qwen_dir,
                             "--frames", 8, "--max-new-tokens", 6, "--json")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert record["video"] == str(media / "good.mp4") and record["error"] is None
    assert isinstance(record["text"], str) and record["new_tokens"] == 6
    assert record["frames"] == 8 and record["visual_tokens"] == 8 * 196 + 1


def test_ask_plain_text(capsys, media, tiny_qwen_dir):
    code, out, _ = run_cli(capsys, "ask", media / "good.mp4", "What moves?", "--model", tiny_qwen_dir,
                           "--frames", 4, "--max-new-tokens", 4)
    assert code == 0 and out.strip() != ""


@pytest.mark.parametrize("amx, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_caption_says_once_which_dtype_auto_chose(capsys, monkeypatch, media, tiny_qwen_dir, amx, dtype):
    """``--dtype auto`` (the default) on the CPU loads bfloat16 where the CPU has bfloat16
    instructions (faked both ways here), float32 otherwise, and says which once on stderr."""
    from aim_llava.capabilities import device_capabilities
    from aim_llava.model import builder

    loaded_as, build_model = [], builder.build_model

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        loaded_as.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(builder, "build_model", recording_build_model)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    device_capabilities.cache_clear()
    try:
        code, out, err = run_cli(capsys, "caption", media / "good.mp4", "--model", tiny_qwen_dir, "--device", "cpu",
                                 "--frames", 2, "--max-new-tokens", 2, "--json")
    finally:
        device_capabilities.cache_clear()
    assert code == 0 and json.loads(out)["error"] is None, err
    assert loaded_as == [dtype]
    name = "AMX" if amx else "no bfloat16 instructions"
    assert [line for line in err.splitlines() if line.startswith(DTYPE_NOTE)] == [
        f"{DTYPE_NOTE}cpu ({name}): {str(dtype).removeprefix('torch.')}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["caption", "{media}/missing.mp4"], "file not found"),
        (["caption", "{media}/text.mp4"], "cannot decode"),
        (["caption", "{media}/truncated.mp4"], "cannot decode"),
        (["caption", "{media}/zero.mp4"], "empty (0 bytes)"),
        (["caption", "{media}/no_images"], "no image files"),
        (["caption", "{media}/good.mp4", "--config", "no_such_preset"], "unknown preset 'no_such_preset'"),
        (["caption", "{media}/good.mp4", "--frames", "-4"], "--frames: must be at least 1"),
        (["caption", "{media}/good.mp4", "--model", "{media}/no_model_here"], "not a local directory"),
        (["ask", "{media}/good.mp4"], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, media, tiny_qwen_dir, args, message):
    args = [a.format(media=media) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_qwen_dir)]
    code, out, err = run_cli(capsys, *args, "--max-new-tokens", 2)
    assert code == 2
    lines = [line for line in without_dtype_note(err).splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("aim-llava: error:") and message in lines[0]
    assert "Traceback" not in err


def test_batch_records_failures_and_keeps_going(capsys, media, tiny_qwen_dir, tmp_path):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{media}/good.mp4\n# a comment\n{media}/zero.mp4\n\n{media}/other.mp4\n")
    output = tmp_path / "captions.jsonl"
    code, out, err = run_cli(capsys, "caption", listing, "--model", tiny_qwen_dir, "--frames", 4,
                             "--max-new-tokens", 3, "--json", "--output", output)
    assert code == 2
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["video"] for r in records] == [f"{media}/good.mp4", f"{media}/zero.mp4", f"{media}/other.mp4"]
    assert records[0]["error"] is None and records[2]["error"] is None
    assert "empty" in records[1]["error"] and records[1]["text"] is None
    assert [json.loads(line) for line in out.splitlines()] == records
    assert len(error_lines(err)) == 1
    assert not list(tmp_path.glob(".captions.jsonl.*"))  # no temporary files left behind


def test_an_unreadable_frame_directory_is_a_failed_item_and_the_batch_goes_on(capsys, media, tiny_qwen_dir, tmp_path,
                                                                              monkeypatch):
    """A frame directory that cannot be listed (PermissionError, as for a directory of mode 000
    read by a user other than root; listing it is made to fail here, so that the test holds for
    root too) is recorded with its reason and the other videos are captioned (before, the
    OSError of checking it ended the whole run with exit 1 before any video)."""
    locked = tmp_path / "locked_frames"
    locked.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(locked / "0001.png")
    scandir = os.scandir

    def refusing(path=".", *args):
        if isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == str(locked.resolve()):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing)
    output = tmp_path / "captions.jsonl"
    code, _, err = run_cli(capsys, "caption", media / "good.mp4", locked, media / "other.mp4", "--model",
                           tiny_qwen_dir, "--frames", 4, "--max-new-tokens", 3, "--output", output)
    assert code == 2, err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["video"] for r in records] == [f"{media}/good.mp4", str(locked), f"{media}/other.mp4"]
    assert records[0]["error"] is None and records[2]["error"] is None and records[0]["text"]
    assert "cannot read" in records[1]["error"] and "Permission denied" in records[1]["error"]
    assert len(error_lines(err)) == 1


def test_resume_skips_done_and_retries_failed(capsys, media, tiny_qwen_dir, tmp_path):
    output = tmp_path / "out.jsonl"
    command = ["caption", media / "good.mp4", media / "other.mp4", "--model", tiny_qwen_dir, "--frames", 4,
               "--max-new-tokens", 3, "--output", output]
    assert run_cli(capsys, *command)[0] == 0
    first, second = [json.loads(line) for line in output.read_text().splitlines()]
    assert first["question"] == DEFAULT_CAPTION_PROMPT and first["config"] == "baseline"
    done = {**first, "text": "kept from the first run"}  # a text no run gives: kept, not done again
    failed = {**second, "text": None, "error": "interrupted"}
    output.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + '{"video": "half a li')
    code, _, err = run_cli(capsys, *command, "--resume")
    assert code == 0, err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[0] == done
    assert records[1]["video"] == f"{media}/other.mp4" and records[1]["error"] is None
    assert len(records) == 2
    assert "resuming: 1 of 2" in err


def test_stream_prints_the_same_text(capsys, media, tiny_qwen_dir):
    common = ["caption", media / "good.mp4", "--model", tiny_qwen_dir, "--frames", 4, "--max-new-tokens", 8]
    _, plain, _ = run_cli(capsys, *common)
    _, streamed, _ = run_cli(capsys, *common, "--stream")
    assert streamed.strip() == plain.strip()


def test_readme_main_job_script_captions_a_generated_video(capsys, tiny_qwen_dir, tmp_path):
    """scripts/caption_video.sh with no model and an empty model/ writes the tiny one, says so, and
    captions with it: the same text as the command on the tiny checkpoint of the tests."""
    video = write_sample_video(tmp_path / "sample.mp4")
    env = dict(os.environ, AIM_LLAVA_MODEL_ROOT=str(tmp_path / "models"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(REPO / "scripts" / "caption_video.sh"), str(video), "--max-new-tokens", "16"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr
    assert (tmp_path / "models" / "tiny-random-llava-qwen" / "config.json").exists()
    code, expected, err = run_cli(capsys, "caption", video, "--model", tiny_qwen_dir, "--max-new-tokens", 16)
    assert code == 0, err
    assert result.stdout.strip() == expected.strip() != ""


def test_caption_with_aim_preset(capsys, media, tiny_qwen_dir):
    code, out, err = run_cli(capsys, "caption", media / "good.mp4", "--model", tiny_qwen_dir, "--frames", 8,
                             "--max-new-tokens", 4, "--json", "--config", "aim_default")
    assert code == 0, err
    record = json.loads(out)
    assert record["config"] == "aim_default"
    assert record["visual_tokens"] == 8 * 49 + 1  # merged to 25% before the LLM


def test_batch_captioning_sharded_over_two_processes(media, tiny_qwen_dir, tmp_path, capsys):
    videos = [str(media / "good.mp4"), str(media / "other.mp4"), str(media / "zero.mp4")]
    common = ["--model", str(tiny_qwen_dir), "--frames", "3", "--max-new-tokens", "4"]
    assert main(["caption", *videos, *common, "--output", str(tmp_path / "one.jsonl")]) == 2  # zero.mp4 fails
    capsys.readouterr()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "aim_llava.cli", "caption", *videos, *common, "--output", str(tmp_path / "two.jsonl")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "empty (0 bytes)" in result.stderr
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    keep = ("video", "text", "error", "frames", "visual_tokens")
    assert [{k: r.get(k) for k in keep} for r in one] == [{k: r.get(k) for k in keep} for r in two]
    assert (tmp_path / "two.jsonl.rank0").exists() and (tmp_path / "two.jsonl.rank1").exists()
