"""Frame sampling on generated videos whose frames carry their own index."""

import numpy as np
import pytest
import torch
from PIL import Image

from aim_llava.sample_media import index_frame, read_frame_index, write_sample_video, write_vfr_sample_video
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


def sequential_frames(path, indices):
    """Today's reader, written out: decode from the start, frame i = the i-th decoded frame."""
    import av

    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
    return np.stack([frames[i] for i in indices])


@pytest.fixture(scope="module")
def hard_clips(tmp_path_factory):
    """Long GOPs with B-frames, and a variable frame rate."""
    root = tmp_path_factory.mktemp("hard")
    return {
        "bframes": write_sample_video(root / "bframes.mp4", num_frames=300, fps=30, gop=60, bframes=3),
        "vfr": write_vfr_sample_video(root / "vfr.mp4", [3, 1, 2, 5, 1, 1, 4] * 30, gop=25),
    }


@pytest.mark.parametrize("clip", ["bframes", "vfr"])
@pytest.mark.parametrize("sampling", [dict(num_frames=1), dict(num_frames=7), dict(num_frames=32),
                                      dict(num_frames=5, start=2.0, end=6.0), dict(fps=3.0), dict(num_frames=400)])
def test_seeking_reader_returns_todays_pixels(hard_clips, clip, sampling):
    ours = load_video(hard_clips[clip], backend="pyav", **sampling)
    assert np.array_equal(ours.frames, sequential_frames(hard_clips[clip], ours.indices))
    assert decoded_indices(ours) == ours.indices


@pytest.mark.parametrize("clip", ["bframes", "vfr"])
def test_threaded_decord_returns_todays_pixels(hard_clips, clip):
    import decord

    ours = load_video(hard_clips[clip], num_frames=16, backend="decord")
    single_thread = decord.VideoReader(str(hard_clips[clip]), ctx=decord.cpu(0), num_threads=1)
    assert np.array_equal(ours.frames, single_thread.get_batch(ours.indices).asnumpy())


def test_seeking_decodes_only_what_it_needs(hard_clips):
    """Three frames from a 300-frame clip with a keyframe every 60: far fewer frames are decoded
    than by reading from the start."""
    import av

    from aim_llava.video import PacketIndex, _decode_seeking

    class Counting:
        def __init__(self, container):
            self.container, self.decoded = container, 0

        def seek(self, *args, **kwargs):
            self.container.seek(*args, **kwargs)

        def decode(self, stream):
            for frame in self.container.decode(stream):
                self.decoded += 1
                yield frame

    with av.open(str(hard_clips["bframes"])) as container:
        stream = container.streams.video[0]
        index = PacketIndex.read(container, stream)
        counting = Counting(container)
        frames = _decode_seeking(counting, stream, index, [70, 130, 250])
    assert sorted(frames) == [70, 130, 250]
    assert [read_frame_index(frames[i]) for i in (70, 130, 250)] == [70, 130, 250]
    assert counting.decoded < 100  # from the start: 251 frames


@pytest.mark.parametrize("clip", ["bframes", "vfr"])
def test_torchcodec_backend_reads_the_same_frames(hard_clips, clip):
    try:  # an optional backend: scripts/install.sh installs it with FFmpeg's shared libraries
        import torchcodec.decoders  # noqa: F401
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"torchcodec is not usable here: {str(err).splitlines()[0]}")
    ours = load_video(hard_clips[clip], num_frames=12, backend="torchcodec")
    reference = load_video(hard_clips[clip], num_frames=12, backend="pyav")
    assert ours.indices == reference.indices and decoded_indices(ours) == ours.indices
    assert np.array_equal(ours.frames, reference.frames)
