"""Frame sampling on generated videos whose frames carry their own index."""

import numpy as np
import pytest
import torch
from PIL import Image

from aim_llava.sample_media import (
    index_frame,
    read_frame_index,
    write_hls_playlist,
    write_sample_video,
    write_vfr_sample_video,
)
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


@pytest.mark.parametrize("fps, max_frames", [(1000.0, None), (7.3, None), (0.4, None), (1000.0, 5), (30.0, 64)])
@pytest.mark.parametrize("first, last", [(0, 0), (0, 89), (13, 4000)])
def test_the_fps_frame_count_is_the_number_of_indices(fps, max_frames, first, last):
    from aim_llava.video import fps_frame_count, fps_indices

    assert fps_frame_count(first, last, 30.0, fps, max_frames) == len(fps_indices(first, last, 30.0, fps, max_frames))


def test_an_fps_sampling_over_the_limits_is_refused_before_its_indices_are_listed():
    """fps 1000 over 100,000 frames at 30 fps asks for 3.3 million frames: refused with a frame
    limit, and no list of them built first (before, ~130 MB of ints, more for longer sources)."""
    import tracemalloc

    from aim_llava.video import MediaLimits, choose_indices

    opts = dict(num_frames=32, fps=1000.0, max_frames=None, start=None, end=None, frame_limit=None, limits=None)
    for limit in (dict(frame_limit=64), dict(limits=MediaLimits(384, 64 * 384**2, 2**26))):
        tracemalloc.start()
        try:
            with pytest.raises(VideoError, match="3,333,301 frames|3333301 frames"):
                choose_indices(100_000, 30.0, {**opts, **limit}, "long.mp4")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak


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


# ---------------------------------------------------------------------------- untrusted media (the server)

SERVER_LIMITS = dict(frame_size=384, max_pixels=2**27, max_source_pixels=2**26)


def model_view(frames: np.ndarray) -> torch.Tensor:
    """What the model's preprocessing makes of frames, in 0..255 units (before normalisation)."""
    from aim_llava.model.image_processor import SiglipImageProcessor

    return (SiglipImageProcessor(384).preprocess_frames(frames, "cpu") * 0.5 + 0.5) * 255


@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory):
    """1280x720: waves, a gradient and sharp edges, where resampling filters differ."""
    from aim_llava.sample_media import textured_frame

    return write_sample_video(tmp_path_factory.mktemp("hd") / "hd.mp4", num_frames=8, fps=8, height=720, width=1280,
                              draw=textured_frame)


def test_frames_at_the_models_input_size_are_what_the_model_sees_from_full_frames(hd_clip):
    """Under limits each frame is resized to 384x384 as it is decoded (PIL's bicubic, the filter
    the model's device preprocessing reproduces) instead of being kept at 1280x720 until the
    model resizes it. What the model sees differs from today's full-size path by at most 2/255
    per pixel value and 0.05/255 on average (measured on the CPU: 1/255 at most, 0.0006/255 on
    average; the device path is itself within 2/255 of PIL, tests/test_preprocessing.py)."""
    from aim_llava.video import MediaLimits

    full = load_video(hd_clip, num_frames=8, backend="pyav")
    small = load_video(hd_clip, num_frames=8, backend="pyav", limits=MediaLimits(**SERVER_LIMITS))
    assert full.frames.shape == (8, 720, 1280, 3) and small.frames.shape == (8, 384, 384, 3)
    assert small.indices == full.indices and small.timestamps == full.timestamps
    difference = (model_view(small.frames) - model_view(full.frames)).abs()
    assert difference.max() <= 2.0 + 1e-3 and difference.mean() <= 0.05, (difference.max(), difference.mean())


def test_a_sampling_beyond_the_pixel_budget_is_refused_before_decoding(hd_clip, monkeypatch):
    import av

    from aim_llava.video import MediaLimits

    limits = MediaLimits(384, max_pixels=10 * 384 * 384, max_source_pixels=2**26)
    monkeypatch.setattr(av, "open", lambda *a, **k: pytest.fail("the video was opened"))
    with pytest.raises(VideoError, match="11 frames, 1,622,016 pixels at the model's input size"):
        load_video(hd_clip, num_frames=11, limits=limits)
    monkeypatch.undo()
    with pytest.raises(VideoError, match="gives 27 frames"):  # by fps the count is known once the file is indexed
        load_video(hd_clip, fps=30, limits=limits)
    assert len(load_video(hd_clip, num_frames=10, limits=limits).frames) == 10


def test_limits_on_source_size_and_time(hd_clip):
    import time

    from aim_llava.video import MediaLimits

    with pytest.raises(VideoError, match="is 1280x720 pixels, more than the 921,599 allowed"):
        load_video(hd_clip, num_frames=2, limits=MediaLimits(384, 2**27, 1280 * 720 - 1))
    with pytest.raises(VideoError, match="took longer than the request's time limit"):
        load_video(hd_clip, num_frames=2, limits=MediaLimits(384, 2**27, 2**26, deadline=time.monotonic() - 1))


def test_ffmpeg_itself_refuses_frames_beyond_the_source_limit_and_uses_few_threads(hd_clip, monkeypatch):
    """The header check aside (a stream may change size after its header), FFmpeg's decoder is
    opened with max_pixels from the limits, and with a few threads, not one frame in flight per
    core (before: no max_pixels, thread_count 0 = all cores + 1 frames held)."""
    from aim_llava.video import UNTRUSTED_DECODER_THREADS, MediaLimits, PacketIndex

    seen, index = [], PacketIndex.read

    def indexing(container, stream, *args):  # the stream as decoding starts
        seen.append((stream.codec_context.thread_count, dict(stream.codec_context.options)))
        return index(container, stream, *args)

    monkeypatch.setattr(PacketIndex, "read", indexing)
    assert len(load_video(hd_clip, num_frames=2, limits=MediaLimits(**SERVER_LIMITS)).frames) == 2
    assert seen == [(UNTRUSTED_DECODER_THREADS, {"max_pixels": str(SERVER_LIMITS["max_source_pixels"])})]
    monkeypatch.setattr(MediaLimits, "check_source", lambda *args: None)  # a header that understates the size
    with pytest.raises(VideoError, match="cannot decode"):
        load_video(hd_clip, num_frames=2, limits=MediaLimits(384, 2**27, 1280 * 720 - 1))


def test_untrusted_videos_open_no_other_file(tmp_path):
    """An HLS playlist or an FFmpeg concat list named like a video opens other files (anywhere:
    decord reads a playlist's absolute segment paths). Under limits only container demuxers and
    plain files are allowed."""
    from aim_llava.video import MediaLimits

    segment = write_sample_video(tmp_path / "elsewhere" / "secret.ts", num_frames=30, fps=10)
    write_hls_playlist(tmp_path / "playlist.mp4", segment, 3.0)
    write_hls_playlist(tmp_path / "playlist.m3u8", segment, 3.0)
    (tmp_path / "list.mp4").write_text(f"ffconcat version 1.0\nfile {segment}\n")
    assert len(load_video(tmp_path / "playlist.m3u8", num_frames=2, backend="pyav").frames) == 2  # what it would read
    for name in ("playlist.mp4", "playlist.m3u8", "list.mp4"):
        with pytest.raises(VideoError, match="cannot decode"):
            load_video(tmp_path / name, num_frames=2, limits=MediaLimits(**SERVER_LIMITS))


def test_untrusted_frame_directories_follow_no_link(tmp_path):
    from aim_llava.video import MediaLimits

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(index_frame(i, 96, 160)).save(frames / f"{i}.png")
    clip = load_video(frames, num_frames=3, limits=MediaLimits(**SERVER_LIMITS))
    assert clip.frames.shape == (3, 384, 384, 3)
    assert decoded_indices(clip) == [0, 1, 2]
    Image.fromarray(index_frame(7, 96, 160)).save(tmp_path / "outside.png")
    (frames / "3.png").symlink_to(tmp_path / "outside.png")
    assert decoded_indices(load_video(frames, num_frames=4)) == [0, 1, 2, 7]  # the command line follows it
    with pytest.raises(VideoError, match="cannot open the frame 3.png"):
        load_video(frames, num_frames=4, limits=MediaLimits(**SERVER_LIMITS))


def test_images_are_read_only_by_the_decoders_of_image_files(tmp_path, monkeypatch):
    """An EPS file named .png would run Ghostscript: Pillow is asked for IMAGE_FORMATS only."""
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a) or pytest.fail("Ghostscript"))
    (tmp_path / "drawing.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    with pytest.raises(VideoError, match="not in one of the formats read here: JPEG, PNG"):
        load_video(tmp_path / "drawing.png")
    assert not called


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_an_untrusted_videos_index_is_bounded_before_it_is_built(tmp_path, monkeypatch, container):
    """Under limits a video may have at most MAX_INDEX_ENTRIES index entries: an MP4's are
    counted from its sample tables before FFmpeg opens it, any container's packets as they are
    demuxed (before, every packet was listed whatever their number)."""
    from hostile_media import write_mkv

    import aim_llava.video as video

    path = (write_sample_video(tmp_path / "clip.mp4", num_frames=12, fps=10) if container == "mp4"
            else write_mkv(tmp_path / "clip.mkv", frames=12))
    limits = video.MediaLimits(**SERVER_LIMITS)
    assert len(load_video(path, num_frames=2, limits=limits).frames) == 2
    monkeypatch.setattr(video, "MAX_INDEX_ENTRIES", 11)
    words = "sample tables declare 12 index entries" if container == "mp4" else "more than 11 video packets"
    with pytest.raises(VideoError, match=words):
        load_video(path, num_frames=2, limits=limits)
    assert len(load_video(path, num_frames=2).frames) == 2  # a trusted video is not bounded
