"""Frame sampling on generated videos whose frames carry their own index."""

import numpy as np
import pytest
import torch
from PIL import Image

from aim_llava.sample_media import index_frame, read_frame_index, write_sample_video
from aim_llava.video import VideoError, load_video

FILE_BACKENDS = ["decord", "pyav"]


@pytest.fixture(scope="module")
def video_90(tmp_path_factory):
    """3 seconds at 30 fps: frames 0..89."""
    return write_sample_video(tmp_path_factory.mktemp("videos") / "v90.mp4", num_frames=90, fps=30)


def decoded_indices(clip) -> list[int]:
    return [read_frame_index(frame) for frame in clip.frames]


@pytest.mark.parametrize("backend", FILE_BACKENDS)
@pytest.mark.parametrize("num_frames", [1, 7, 16, 32, 90])
def test_uniform_indices_follow_published_linspace(video_90, backend, num_frames):
    clip = load_video(video_90, num_frames=num_frames, backend=backend)
    expected = np.linspace(0, 89, num_frames, dtype=int).tolist()
    assert clip.indices == expected
    assert decoded_indices(clip) == expected  # the frames really are those frames
    assert clip.frames.shape == (num_frames, 96, 160, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(30.0) and clip.duration == pytest.approx(3.0)
    assert clip.timestamps == pytest.approx([i / 30 for i in expected])


def test_qwen_backend_keeps_its_documented_rule(video_90):
    clip = load_video(video_90, num_frames=16, backend="qwen")
    expected = torch.linspace(0, 89, 16).round().long().tolist()
    assert clip.indices == expected
    assert decoded_indices(clip) == expected


def test_auto_backend_reads_published_indices(video_90):
    clip = load_video(video_90, num_frames=9)
    assert clip.source in FILE_BACKENDS
    assert decoded_indices(clip) == np.linspace(0, 89, 9, dtype=int).tolist()


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_fps_sampling_and_cap(video_90, backend):
    clip = load_video(video_90, fps=2, backend=backend)
    assert decoded_indices(clip) == [0, 15, 30, 45, 60, 75]
    assert clip.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    capped = load_video(video_90, fps=10, max_frames=4, backend=backend)
    assert decoded_indices(capped) == np.linspace(0, 89, 4, dtype=int).tolist()


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_start_end_window(video_90, backend):
    clip = load_video(video_90, num_frames=5, start=1.0, end=2.0, backend=backend)
    assert decoded_indices(clip) == np.linspace(30, 60, 5, dtype=int).tolist()
    assert clip.timestamps[0] == pytest.approx(1.0) and clip.timestamps[-1] == pytest.approx(2.0)
    tail = load_video(video_90, fps=1, start=1.5, backend=backend)
    assert decoded_indices(tail) == [45, 75]


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_short_video_asked_for_more_frames_repeats_frames(tmp_path, backend):
    path = write_sample_video(tmp_path / "two.mp4", num_frames=2, fps=30)
    clip = load_video(path, num_frames=32, backend=backend)
    assert len(clip.frames) == 32
    assert decoded_indices(clip) == [0] * 31 + [1]


def test_frame_directory_natural_order(tmp_path):
    for i in range(12):
        Image.fromarray(index_frame(i)).save(tmp_path / f"frame_{i + 1}.png")
    clip = load_video(tmp_path, num_frames=4)
    assert clip.source == "frames"
    assert decoded_indices(clip) == np.linspace(0, 11, 4, dtype=int).tolist()


def test_image_file_is_one_frame(tmp_path):
    Image.fromarray(index_frame(5)).save(tmp_path / "one.jpg")
    clip = load_video(tmp_path / "one.jpg", num_frames=8)
    assert clip.is_image and clip.frames.shape[0] == 1


def write_bad_input(directory, kind):
    if kind == "missing":
        return directory / "missing.mp4"
    if kind == "zero-byte":
        (directory / "zero.mp4").write_bytes(b"")
        return directory / "zero.mp4"
    if kind == "text":
        (directory / "text.mp4").write_text("not a video\n" * 50)
        return directory / "text.mp4"
    (directory / "empty_dir").mkdir()
    return directory / "empty_dir"


@pytest.mark.parametrize(
    "kind, message",
    [("missing", "file not found"), ("zero-byte", "empty"), ("text", "cannot decode"), ("empty-dir", "no image files")],
)
def test_bad_inputs_raise_video_error(tmp_path, kind, message):
    with pytest.raises(VideoError, match=message):
        load_video(write_bad_input(tmp_path, kind), num_frames=4)


def test_truncated_video(tmp_path, video_90):
    data = video_90.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError):
        load_video(tmp_path / "cut.mp4", num_frames=4)


def test_bad_sampling_arguments(video_90):
    with pytest.raises(VideoError, match="at least 1"):
        load_video(video_90, num_frames=-3)
    with pytest.raises(VideoError, match="beyond the end"):
        load_video(video_90, start=10.0)
    with pytest.raises(VideoError, match="unknown video backend"):
        load_video(video_90, backend="ffmpeg")
