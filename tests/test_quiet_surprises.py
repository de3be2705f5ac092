"""What a new user met without a word: repeated frames, the fixed frame rate of frame
directories, errors found only after the model loaded, messages in Python's terms, a URL taken for
a missing file, a reduction record that printed kilobytes of tensors."""

import json
from pathlib import Path

import pytest
from PIL import Image

from aim_llava.cli import main
from aim_llava.sample_media import write_sample_video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("surprises")
    write_sample_video(root / "clip.mp4", num_frames=20, fps=10)  # 2 s
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    frames = root / "frames"
    frames.mkdir()
    for i in range(9):
        Image.new("RGB", (32, 24), (20 * i, 0, 0)).save(frames / f"f{i + 1}.png")
    return root


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: what is checked must be checked before."""
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


def test_repeated_frames_are_said(capsys, tiny_qwen_dir, media):
    """9 images asked for 12 frames: the record shows repeated indices, and one note says so and
    what to ask instead (before: 6,273 tokens of a 9-image directory at --frames 32, silently)."""
    code, out, err = run_cli(capsys, "caption", media / "frames", "--model", tiny_qwen_dir, "--frames", 12,
                             "--max-new-tokens", 1, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert len(set(record["frame_indices"])) == 9 and record["frames"] == 12
    notes = [line for line in err.splitlines() if line.startswith("aim-llava: note:")]
    assert len(notes) == 1 and "9 distinct frames for the 12 sampled" in notes[0] and "--frames 9" in notes[0]
    code, _, err = run_cli(capsys, "caption", media / "frames", "--model", tiny_qwen_dir, "--frames", 9,
                           "--max-new-tokens", 1, "--json")
    assert code == 0 and "note:" not in err


def test_frame_rate_of_a_frame_directory(capsys, tiny_qwen_dir, media):
    """--frame-rate sets the directory's frames per second: its timestamps, and --start/--end
    windows, follow it (9 images at 3 frames/s last 3 s)."""
    code, out, err = run_cli(capsys, "caption", media / "frames", "--model", tiny_qwen_dir, "--frames", 3,
                             "--frame-rate", 3, "--start", 1, "--max-new-tokens", 1, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["duration"] == 3.0
    assert record["frame_indices"] == [3, 5, 8] and record["timestamps"] == [1.0, 5 / 3, 8 / 3]
    assert record["settings"]["frame_rate"] == 3.0


@pytest.mark.parametrize("args, message", [
    (["{media}/text.mp4"], "cannot decode"),
    (["{media}/clip.mp4", "--start", "5"], "start=5.0s is beyond the end"),
    (["{media}/clip.mp4", "--template", "vicuna_v7"], "vicuna_v7"),
    (["https://example.com/clip.mp4"], "is a URL: only local files are read"),
])
def test_found_before_the_model_loads(capsys, tiny_qwen_dir, media, no_model, args, message):
    code, _, err = run_cli(capsys, "caption", *[a.format(media=media) for a in args], "--model", tiny_qwen_dir)
    lines = [line for line in err.splitlines() if line.startswith("aim-llava:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_device_cuda_without_cuda_speaks_the_command_line(capsys, tiny_qwen_dir, media, no_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "caption", media / "clip.mp4", "--model", tiny_qwen_dir, "--device", "cuda")
    assert code == 2 and "--device cpu" in err


def test_a_reduction_record_prints_short(loaded):
    """print(response.reduction) showed the kept masks' tensors, ~6.7 KB; now the schedule."""
    import torch

    from aim_llava.reduction.plan import ReductionRecord

    record = ReductionRecord("aim_default", [[1569]] * 14 + [[1372]] * 14,
                             {layer: torch.ones(1, 1700, dtype=torch.bool) for layer in range(14, 28)})
    text = repr(record)
    assert len(text) < 400 and "tensor" not in text and "1372" in text


def test_readme_chat_example_streams_once():
    """The README's streamed chat turn printed the reply twice (streamed, then returned)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert 'print(session.ask("What do they do next?", stream=' not in readme
    assert 'session.ask("What do they do next?", stream=' in readme
