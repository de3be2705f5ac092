"""Reading frames from videos, frame directories and image files.

Sampling rules (the source's frame i has timestamp i / fps):

* uniform (default): ``numpy.linspace(first, last, num_frames, dtype=int)`` over the frames of
  the [start, end] window; for a whole video that is exactly the published evaluation's
  ``linspace(0, total_frames - 1, num_frames, dtype=int)``. Asking for more frames than the
  window has repeats frames, as the published code does (a 2-frame video asked for 32 frames
  gives frame 0 thirty-one times, then frame 1): the model sees ``num_frames`` frames whatever
  the source.
* fps: one frame every 1/fps seconds from the window's start (the nearest source frame); when
  that gives more than ``max_frames``, uniform sampling of ``max_frames`` over the window instead
  (LLaVA-Video's rule).
* ``frame_rule="qwen"`` (Qwen2.5-VL's rules, those of qwen-vl-utils): counts are even (a temporal
  patch is 2 frames): ``num_frames`` rounded to the nearest even number, or by fps ``window x fps``
  kept within [4, min(max_frames or 768, window)] and rounded down to even; the indices are
  ``round(torch.linspace(first, last, count))``.

Backends: ``decord``, ``pyav``, ``torchcodec`` and ``qwen`` (qwen-vl-utils' reader). Each decodes
only what the sampled frames need, with all cores: pyav indexes the packets (no decoding) and
decodes from the keyframe before each sampled frame, decord and torchcodec seek themselves.
``qwen`` keeps qwen-vl-utils' own uniform rule (``round(torch.linspace(first, last, n))`` with n
rounded to an even number) because that is what a user picking it wants; use another backend for
the published indices. ``auto`` tries decord, then pyav (qwen only when neither is installed).
A failure becomes one VideoError line. Reading is thread-safe (the command line reads ahead in
worker threads); decoders' own C-level messages are the command's concern (aim_llava.cli).

Media from an untrusted source (the server's clients) are read under :class:`MediaLimits`: with
PyAV only, its demuxers limited to video containers and its protocols to plain files, FFmpeg's
decoder limited to frames of ``max_source_pixels`` and to :data:`UNTRUSTED_DECODER_THREADS`
threads, every frame brought to the model's input size as it is decoded, a pixel budget checked
before decoding, the index an MP4 file declares and the packets of any container bounded by
:data:`MAX_INDEX_ENTRIES` before they are indexed, directories of at most :data:`MAX_FRAMES`
entries, frames that are regular files of one link, and a deadline. Images are opened with
Pillow's decoders for :data:`IMAGE_FORMATS` only, everywhere (never EPS/PS, which would run
Ghostscript), and a JPEG's scans are counted before it is decoded (:func:`check_jpeg_scans`).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from aim_llava.errors import InputError
from aim_llava.media_checks import DeclaredTooMuch, is_mp4, jpeg_scan_count, mp4_index_entries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Pillow's decoders for those extensions: no other decoder ever sees a file (EPS and PS would run
# Ghostscript; the others are attack surface nobody needs here)
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF")
# FFmpeg demuxers that untrusted videos may use: containers of one file (no HLS/DASH playlists, no
# concat lists, no image sequences, which open other files)
VIDEO_CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "ogg", "asf")
BACKENDS = ("auto", "decord", "pyav", "qwen", "torchcodec")
UNTRUSTED_DECODER_THREADS = 2  # FFmpeg's decoding threads for an untrusted video (frames in flight)
# the index entries (packets, samples) an untrusted video may have: 38 hours at 30 frames a second,
# ~160 MB of FFmpeg's index and ours
MAX_INDEX_ENTRIES = 2**22
# a JPEG's scans: each is a pass over the whole image, so their number is bounded, and more tightly
# for larger images (a progressive JPEG has about ten)
MAX_JPEG_SCANS = 1000
MAX_JPEG_SCAN_PIXELS = 2**31  # scans x pixels: 32 scans of the largest image allowed (2**26 pixels)


class VideoError(InputError):
    """A video, frame directory or image that cannot be read as asked."""


class ReadingTimeExceeded(VideoError):
    """Reading stopped at the deadline of :class:`MediaLimits`."""


@dataclass
class VideoClip:
    """Sampled frames [T, H, W, 3] uint8 with their source indices and timestamps (seconds)."""

    frames: np.ndarray
    indices: list[int]
    timestamps: list[float]
    duration: float
    fps: float
    source: str
    is_image: bool = False
    sampled_fps: float = 0.0  # samples per second of the window they come from (0: unknown)


@dataclass(frozen=True)
class MediaLimits:
    """How media from an untrusted source are read (see the module docstring).

    Every video frame, and every image taken as a frame, is resized to ``frame_size`` x
    ``frame_size`` as soon as it is decoded, with PIL's bicubic filter (the resampling the model's
    own preprocessing reproduces, so the model sees within 2/255 of what it sees from a full-size
    frame; tests/test_video.py), and nothing larger is kept; the sampled frames may hold
    ``max_pixels`` pixels at that size (a sampling that would hold more is refused before anything
    is decoded); one decoded image or video frame may have ``max_source_pixels`` (checked from its
    header first); reading stops with an error at ``deadline`` (a ``time.monotonic()`` value).
    With ``keep_aspect`` (models that take frames at their native resolution), a frame keeps its
    aspect ratio and is only shrunk, to at most ``frame_size`` squared pixels."""

    frame_size: int
    max_pixels: int
    max_source_pixels: int
    deadline: float | None = None
    keep_aspect: bool = False

    def check_frames(self, count: int, source: str) -> None:
        held = count * self.frame_size**2
        if held > self.max_pixels:
            raise VideoError(f"sampling {source} gives {count} frames, {held:,} pixels at the model's input size "
                             f"{self.frame_size}x{self.frame_size}, more than the {self.max_pixels:,} a request may "
                             "hold: ask for fewer frames")

    def check_source(self, width: int, height: int, source: str) -> None:
        if width * height > self.max_source_pixels:
            raise VideoError(f"{source} is {width}x{height} pixels, more than the {self.max_source_pixels:,} allowed "
                             "for one image or frame: send smaller media")

    def check_deadline(self, source: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ReadingTimeExceeded(f"reading {source} took longer than the request's time limit")

    def frame(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image at the model's input size (within it, keeping its aspect ratio)."""
        size = (self.frame_size, self.frame_size)
        if self.keep_aspect:
            scale = min(1.0, self.frame_size / math.sqrt(image.width * image.height))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return np.asarray(image if image.size == size else image.resize(size, Image.BICUBIC))


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def uniform_indices(first: int, last: int, num_frames: int) -> list[int]:
    """The published rule: ``numpy.linspace(first, last, num_frames, dtype=int)``."""
    return np.linspace(first, last, num_frames, dtype=int).tolist()


def fps_frame_count(first: int, last: int, source_fps: float, fps: float, max_frames: int | None) -> int:
    """How many frames :func:`fps_indices` gives (computed without building them)."""
    count = int(math.floor((last - first) / (source_fps / fps) + 1e-9)) + 1
    return count if max_frames is None else min(count, max_frames)


def fps_indices(first: int, last: int, source_fps: float, fps: float, max_frames: int | None) -> list[int]:
    """Nearest source frames every 1/fps seconds from ``first``; uniform if over ``max_frames``."""
    step = source_fps / fps
    count = fps_frame_count(first, last, source_fps, fps, None)
    if max_frames is not None and count > max_frames:
        return uniform_indices(first, last, max_frames)
    return [min(last, first + int(round(k * step))) for k in range(count)]


def frame_window(total: int, fps: float, start: float | None, end: float | None, source: str) -> tuple[int, int]:
    """First and last frame index inside [start, end] seconds."""
    duration = total / fps if fps > 0 else float(total)
    first = 0 if start is None else int(math.ceil(start * fps - 1e-9))
    last = total - 1 if end is None else min(total - 1, int(math.floor(end * fps + 1e-9)))
    if start is not None and first >= total:
        raise VideoError(f"start={start}s is beyond the end of {source} ({duration:.2f}s)")
    if last < first:
        raise VideoError(f"the window start={start}s end={end}s of {source} holds no frame")
    return first, last


QWEN_FRAME_FACTOR = 2  # Qwen2.5-VL's temporal patch: frame counts are multiples of it
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
FRAME_RULES = ("llava", "qwen")


def qwen_frame_count(window_frames: int, source_fps: float, opts: dict) -> int:
    """qwen-vl-utils' count (``smart_nframes``): ``num_frames`` rounded to even, or by fps
    ``window / source_fps * fps`` kept within [4, max_frames] and the window, rounded down to even;
    at least 2 (a shorter window repeats its frames)."""
    factor = QWEN_FRAME_FACTOR
    if opts["fps"] is None:
        return qwen_even_count(uniform_frame_count(opts["num_frames"], opts["max_frames"]))
    least = math.ceil(QWEN_MIN_FRAMES / factor) * factor
    most = math.floor(min(opts["max_frames"] or QWEN_MAX_FRAMES, window_frames) / factor) * factor
    count = min(max(window_frames / source_fps * opts["fps"], least), most, window_frames)
    return max(factor, math.floor(count / factor) * factor)


def qwen_even_count(frames: int) -> int:
    """qwen-vl-utils' count for a fixed number of ``frames``: rounded to even, at least 2."""
    return max(QWEN_FRAME_FACTOR, round(frames / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR)


def qwen_indices(first: int, last: int, count: int) -> list[int]:
    """qwen-vl-utils' indices: ``torch.linspace(first, last, count).round()``."""
    import torch

    return torch.linspace(first, last, count).round().long().tolist()


def check_frame_count(count: int, limit: int | None, source: str) -> None:
    if limit is not None and count > limit:
        raise VideoError(
            f"sampling {source} gives {count} frames but at most {limit} fit in the model's context: "
            "ask for fewer frames (--frames, or --max-frames with --fps)"
        )


def uniform_frame_count(num_frames: int, max_frames: int | None) -> int:
    """How many frames a uniform sampling gives."""
    return num_frames if max_frames is None else min(num_frames, max_frames)


def check_sampled_count(count: int, frame_limit: int | None, limits: MediaLimits | None, source: str) -> None:
    """Refuse a sampling of ``count`` frames beyond the context's ``frame_limit`` or the request's
    ``limits``, before any is built or decoded."""
    check_frame_count(count, frame_limit, source)
    if limits is not None:
        limits.check_frames(count, source)


def choose_indices(total: int, source_fps: float, opts: dict, source: str) -> list[int]:
    """The sampled frame indices, their count checked against the limits before they are built
    (an fps sampling of a long source could otherwise list millions)."""
    first, last = frame_window(total, source_fps, opts["start"], opts["end"], source)
    if opts.get("frame_rule") == "qwen":
        count = qwen_frame_count(last - first + 1, source_fps, opts)
        check_sampled_count(count, opts.get("frame_limit"), opts.get("limits"), source)
        return qwen_indices(first, last, count)
    if opts["fps"] is not None:
        count = fps_frame_count(first, last, source_fps, opts["fps"], opts["max_frames"])
    else:
        count = uniform_frame_count(opts["num_frames"], opts["max_frames"])
    check_sampled_count(count, opts.get("frame_limit"), opts.get("limits"), source)
    if opts["fps"] is not None:
        return fps_indices(first, last, source_fps, opts["fps"], opts["max_frames"])
    return uniform_indices(first, last, count)


def _read_decord(path: str, opts: dict) -> tuple[np.ndarray, list[int], float, int]:
    import decord
    import decord.logging

    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg's log lines; failures raise

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)  # 0: decode with all cores
    total, source_fps = len(reader), float(reader.get_avg_fps())
    if total == 0:
        raise VideoError(f"{path} has no video frames")
    indices = choose_indices(total, source_fps, opts, path)
    return reader.get_batch(indices).asnumpy(), indices, source_fps, total


def rgb24(frame) -> np.ndarray:
    """A decoded PyAV frame as [H, W, 3] uint8 RGB."""
    return frame.to_ndarray(format="rgb24")


def no_check() -> None:
    """What a reader without limits checks while it works: nothing."""


@dataclass
class PacketIndex:
    """Presentation timestamps of a stream's frames (sorted: frame i has ``pts[i]``) and of its
    keyframes, read by demuxing alone (no decoding)."""

    pts: list[int]
    keyframes: list[int]

    @classmethod
    def read(cls, container, stream, check: Callable[[], None] = no_check,
             max_packets: int | None = None) -> PacketIndex | None:
        """None when some packet has no timestamp (then frames can only be counted by decoding);
        ``check()`` runs at every packet (it raises to stop); a stream of more than
        ``max_packets`` packets is a VideoError, raised before they are all listed."""
        pts, keyframes = [], []
        for packet in container.demux(stream):
            check()
            if packet.size == 0:
                continue
            if packet.pts is None:
                return None
            if max_packets is not None and len(pts) >= max_packets:
                raise VideoError(f"{container.name} holds more than {max_packets:,} video packets")
            pts.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
        pts.sort()
        keyframes.sort()
        return cls(pts, keyframes or pts[:1])

    def keyframe_before(self, pts: int) -> int:
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, pts) - 1)]


def _decode_seeking(container, stream, index: PacketIndex, indices: list[int],
                    convert: Callable[[object], np.ndarray] = rgb24,
                    check: Callable[[], None] = no_check) -> dict[int, np.ndarray] | None:
    """The frames at ``indices`` (each through ``convert``), decoded from the keyframe before each
    run of them rather than from the start; None if the decoder's timestamps do not match the
    packets' (then the caller decodes sequentially). ``check()`` runs at every decoded frame."""
    wanted = {index.pts[i]: i for i in set(indices)}
    decoded: dict[int, np.ndarray] = {}
    frames, last = None, None
    for target in sorted(wanted):
        if target in decoded:
            continue
        keyframe = index.keyframe_before(target)
        if frames is None or last is None or last < keyframe or last >= target:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            check()
            if frame.pts is None:
                return None
            last = frame.pts
            if frame.pts in wanted:
                decoded[wanted[frame.pts]] = convert(frame)
            if frame.pts >= target:
                break
        if wanted[target] not in decoded:
            return None
    return decoded


def _decode_sequential(container, stream, indices: list[int], convert: Callable[[object], np.ndarray] = rgb24,
                       check: Callable[[], None] = no_check) -> dict[int, np.ndarray]:
    """The frames at ``indices``, counting decoded frames from the start (any container)."""
    wanted, decoded = set(indices), {}
    for i, frame in enumerate(container.decode(stream)):
        check()
        if i in wanted:
            decoded[i] = convert(frame)
        if i >= indices[-1]:
            break
    return decoded


def _read_pyav(path: str, opts: dict) -> tuple[np.ndarray, list[int], float, int]:
    """Frame i is the i-th frame in presentation order. The packets are indexed first (demuxing
    only); the sampled frames are then decoded from the keyframe before each of them, with the
    codec's own threads. Under limits, only :data:`VIDEO_CONTAINERS` and plain files are opened
    and each frame is brought to the model's input size as it is decoded."""
    import av

    limits: MediaLimits | None = opts.get("limits")
    convert, check, options = rgb24, no_check, None
    if limits is not None:
        options = {"format_whitelist": ",".join(VIDEO_CONTAINERS), "protocol_whitelist": "file"}

        def convert(frame):
            limits.check_source(frame.width, frame.height, path)
            return limits.frame(frame.to_image())

        def check():
            limits.check_deadline(path)

    if limits is not None:
        check_declared_index(path)
    with av.open(path, container_options=options) as container:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream")
        stream = container.streams.video[0]
        if limits is not None:
            if stream.frames > MAX_INDEX_ENTRIES:
                raise VideoError(f"{path} declares {stream.frames:,} frames, more than the {MAX_INDEX_ENTRIES:,} "
                                 "a video may have here")
            limits.check_source(stream.codec_context.width, stream.codec_context.height, path)
            # FFmpeg itself refuses larger frames (a stream may change size after its header), and
            # frame threading holds one decoded frame per thread: a few threads, not all cores
            stream.codec_context.options = {"max_pixels": str(limits.max_source_pixels)}
            stream.codec_context.thread_count = UNTRUSTED_DECODER_THREADS
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or 0)
        index = PacketIndex.read(container, stream, check, MAX_INDEX_ENTRIES if limits is not None else None)
        total = len(index.pts) if index is not None else stream.frames
        if total == 0 or source_fps <= 0:
            raise VideoError(f"{path} has no decodable video frames")
        indices = choose_indices(total, source_fps, opts, path)
        decoded = _decode_seeking(container, stream, index, indices, convert, check) if index is not None else None
        if decoded is None:
            container.seek(0)
            decoded = _decode_sequential(container, stream, indices, convert, check)
    missing = set(indices) - set(decoded)
    if missing:
        raise VideoError(f"{path} is truncated or damaged: frame {max(missing)} of {total} does not decode")
    return np.stack([decoded[i] for i in indices]), indices, source_fps, total


def check_declared_index(path: str) -> None:
    """Refuses an MP4/QuickTime file whose sample tables declare more than
    :data:`MAX_INDEX_ENTRIES` index entries (read before FFmpeg opens it and builds its index)."""
    with open(path, "rb") as file:
        if not is_mp4(file):
            return
        try:
            mp4_index_entries(file, os.fstat(file.fileno()).st_size, MAX_INDEX_ENTRIES)
        except DeclaredTooMuch as err:
            raise VideoError(f"{path} cannot be indexed here: {err} (at most {MAX_INDEX_ENTRIES:,})") from None


def _read_torchcodec(path: str, opts: dict) -> tuple[np.ndarray, list[int], float, int]:
    """torchcodec's decoder, exact frame index (a scan of the file), FFmpeg's threads."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=0)
    total, source_fps = int(decoder.metadata.num_frames or 0), float(decoder.metadata.average_fps or 0)
    if total == 0 or source_fps <= 0:
        raise VideoError(f"{path} has no decodable video frames")
    indices = choose_indices(total, source_fps, opts, path)
    frames = decoder.get_frames_at(indices).data
    return frames.permute(0, 2, 3, 1).numpy(), indices, source_fps, total


def _read_qwen(path: str, opts: dict) -> tuple[np.ndarray, list[int], float, int]:
    from qwen_vl_utils import vision_process

    element = {"video": path}
    if opts["fps"] is not None:
        element.update(fps=opts["fps"], max_frames=opts["max_frames"] or 768)
    else:
        count = opts["num_frames"] if opts["max_frames"] is None else min(opts["num_frames"], opts["max_frames"])
        element["nframes"] = max(2, count)
    if opts["start"] is not None:
        element["video_start"] = opts["start"]
    if opts["end"] is not None:
        element["video_end"] = opts["end"]
    reader = vision_process.VIDEO_READER_BACKENDS[vision_process.get_video_reader_backend()]
    video, metadata, _ = reader(element)
    frames = video.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return frames, list(metadata["frames_indices"]), float(metadata["fps"]), int(metadata["total_num_frames"])


READERS = {"decord": _read_decord, "pyav": _read_pyav, "qwen": _read_qwen, "torchcodec": _read_torchcodec}


def _backend_available(name: str) -> bool:
    import importlib.util

    module = {"decord": "decord", "pyav": "av", "qwen": "qwen_vl_utils", "torchcodec": "torchcodec"}[name]
    return importlib.util.find_spec(module) is not None


def open_image_rgb(path, name: str | None = None, max_pixels: int | None = None,
                   formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """An image file (a path or a binary file object, called ``name`` in messages) in one of
    Pillow's ``formats``, as RGB; unreadable files, other formats, decompression bombs (images whose
    declared size is far beyond any real frame) and images declaring more than ``max_pixels``
    pixels (checked before decoding) become one VideoError."""
    name = name or str(path)
    try:
        with Image.open(path, formats=formats) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise VideoError(f"{name} is {image.width}x{image.height} pixels, more than the {max_pixels:,} "
                                 "allowed: send smaller images")
            if image.format == "JPEG":
                check_jpeg_scans(image, name)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError:
        raise VideoError(f"{name} declares an image too large to decode safely (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise VideoError(f"cannot read {name} as an image (not in one of the formats read here: "
                         f"{', '.join(formats)})") from None
    except OSError as err:
        raise VideoError(f"cannot read {name} as an image ({err})") from None


def check_jpeg_scans(image: Image.Image, name: str) -> None:
    """Refuses a JPEG of more scans than :data:`MAX_JPEG_SCANS`, or than
    :data:`MAX_JPEG_SCAN_PIXELS` allow at its size (counted in its file before it is decoded)."""
    pixels = max(1, image.width * image.height)
    allowed = min(MAX_JPEG_SCANS, max(1, MAX_JPEG_SCAN_PIXELS // pixels))
    scans = jpeg_scan_count(image.fp, allowed)
    if scans > allowed:
        raise VideoError(f"{name} is a JPEG of more than {allowed:,} scans (each a pass over its "
                         f"{image.width}x{image.height} pixels; a progressive JPEG has about ten): send it re-encoded")


def _load_image_file(path: Path, limits: MediaLimits | None) -> VideoClip:
    frame = np.asarray(open_image_rgb(path, max_pixels=limits.max_source_pixels if limits else None))
    return VideoClip(frame[None], [0], [0.0], 0.0, 0.0, "image", is_image=True)


def directory_names(path: str | Path, max_entries: int | None = None) -> list[str]:
    """The names of a directory's entries (unsorted, nothing read but the names); one of more
    than ``max_entries`` entries is a VideoError once the next is listed."""
    names = []
    with os.scandir(path) as listing:
        for entry in listing:
            if max_entries is not None and len(names) >= max_entries:
                raise VideoError(f"directory {path} holds more than {max_entries:,} entries")
            names.append(entry.name)
    return names


def _frame_files(path: Path, limits: MediaLimits | None) -> list[str]:
    """The names of a frame directory's image files in natural order (numbers compared as
    numbers); under limits, a directory of more than :data:`MAX_FRAMES` entries is refused before
    they are sorted."""
    def natural_key(name: str):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    names = [name for name in directory_names(path, MAX_FRAMES if limits is not None else None)
             if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not names:
        raise VideoError(f"directory {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(names, key=natural_key)


def _open_frame_file(directory: Path, name: str, limits: MediaLimits) -> np.ndarray:
    """An untrusted directory's frame at the model's input size: opened without following a
    symbolic link (which could lead anywhere), and only if it is a regular file of one link (a
    hard link may be a file from anywhere on the file system)."""
    try:
        handle = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise VideoError(f"cannot open the frame {name} ({err.strerror})") from None
    with os.fdopen(handle, "rb") as file:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode):
            raise VideoError(f"the frame {name} is not a regular file")
        if status.st_nlink > 1:
            raise VideoError(f"the frame {name} has {status.st_nlink} hard links (one may lead outside the media "
                             "root): give each frame one link")
        return limits.frame(open_image_rgb(file, name, limits.max_source_pixels))


def _load_frame_dir(path: Path, opts: dict) -> VideoClip:
    limits: MediaLimits | None = opts.get("limits")
    files = _frame_files(path, limits)
    source_fps = opts.get("frame_rate") or 1.0
    indices = choose_indices(len(files), source_fps, opts, str(path))
    frames, size = [], None
    for i in indices:
        if limits is not None:
            limits.check_deadline(str(path))
            frames.append(_open_frame_file(path, files[i], limits))
            continue
        frame = open_image_rgb(path / files[i])
        size = size or frame.size
        frames.append(np.asarray(frame if frame.size == size else frame.resize(size, Image.BILINEAR)))
    return VideoClip(np.stack(frames), indices, [i / source_fps for i in indices], len(files) / source_fps,
                     source_fps, "frames", sampled_fps=sampled_rate(indices, len(files), source_fps, opts))


MAX_FRAMES = 100_000  # far beyond any model's context; a bound on what a request may ask


def check_local(path: str | Path) -> None:
    """A path that names nothing here is one clear error (a URL says that it is one)."""
    if re.match(r"[a-z][a-z0-9+.-]*://", str(path), flags=re.IGNORECASE):
        raise VideoError(f"{path} is a URL: only local files are read; download it first")
    if not os.path.exists(path):
        raise VideoError(f"file not found: {path}")


def probe(path: str | Path, start: float | None = None) -> None:
    """Check, without decoding any frame, what can be known of ``path`` before a model is loaded:
    that it exists and is not empty, that a frame directory holds images, that PyAV can open a
    video file and finds a video stream in it, and that ``start`` (seconds) is not past its end
    when the container states its duration. Raises VideoError with the message reading it would
    (one that cannot be read, e.g. a directory without permission to list it, included)."""
    check_local(path)
    path = Path(path)
    try:
        if path.is_dir():
            _frame_files(path, None)
            return
        if path.stat().st_size == 0:
            raise VideoError(f"{path} is empty (0 bytes)")
    except OSError as err:
        raise VideoError(f"cannot read {path} ({err.strerror or err})") from None
    if is_image_file(path) or not _backend_available("pyav"):
        return
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream")
            duration = container.duration / av.time_base if container.duration else None
    except VideoError:
        raise
    except Exception as err:  # PyAV raises its own error types for what it cannot open
        raise VideoError(f"cannot decode {path} as a video (pyav: {str(err).splitlines()[0] if str(err) else err})")
    if start is not None and duration is not None and start >= duration:
        raise VideoError(f"start={start}s is beyond the end of {path} ({duration:.2f}s)")


def sampled_rate(indices: list[int], total: int, source_fps: float, opts: dict) -> float:
    """Samples per second of the window they were taken from (qwen-vl-utils' ``sample_fps``)."""
    first, last = frame_window(total, source_fps, opts["start"], opts["end"], "the source")
    return len(indices) / (last - first + 1) * source_fps


def validate_sampling(num_frames: int, fps: float | None, max_frames: int | None, start, end,
                      frame_rate: float = 1.0) -> None:
    if num_frames is None or num_frames < 1:
        raise VideoError(f"the number of frames must be at least 1, got {num_frames}")
    if num_frames > MAX_FRAMES or (max_frames is not None and max_frames > MAX_FRAMES):
        raise VideoError(f"at most {MAX_FRAMES} frames can be sampled, got {max(num_frames, max_frames or 0)}")
    if fps is not None and fps <= 0:
        raise VideoError(f"fps must be positive, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be at least 1, got {max_frames}")
    if start is not None and start < 0:
        raise VideoError(f"start must be >= 0 seconds, got {start}")
    if frame_rate <= 0:
        raise VideoError(f"the frame rate of a frame directory must be positive, got {frame_rate}")
    if start is not None and end is not None and end <= start:
        raise VideoError(f"end ({end}s) must be after start ({start}s)")


def load_video(
    path: str | Path,
    num_frames: int = 32,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str = "auto",
    frame_limit: int | None = None,
    limits: MediaLimits | None = None,
    frame_rate: float = 1.0,
    frame_rule: str = "llava",
) -> VideoClip:
    """Sample frames from a video file, a directory of frame images, or one image file.

    Frame directories are taken at ``frame_rate`` frames per second (sorted by name, numbers
    compared as numbers). An image file gives one frame with ``is_image=True``. A sampling that gives more than
    ``frame_limit`` frames is refused before any frame is decoded. ``limits``: read an untrusted
    source (see :class:`MediaLimits`; videos with PyAV). ``frame_rule``: ``llava`` (the published
    rules above) or ``qwen`` (Qwen2.5-VL's).
    """
    validate_sampling(num_frames, fps, max_frames, start, end, frame_rate)
    if frame_rule not in FRAME_RULES:
        raise VideoError(f"unknown frame rule {frame_rule!r}; use one of {', '.join(FRAME_RULES)}")
    if fps is None:
        count = uniform_frame_count(num_frames, max_frames)
        if frame_rule == "qwen":
            count = qwen_even_count(count)
        check_sampled_count(count, frame_limit, limits, str(path))
    if backend not in BACKENDS:
        raise VideoError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if limits is not None and backend not in ("auto", "pyav"):
        raise VideoError(f"untrusted media are read with pyav, not {backend}")
    check_local(path)
    path = Path(path)
    opts = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end, frame_limit=frame_limit,
                limits=limits, frame_rate=frame_rate, frame_rule=frame_rule)
    if path.is_dir():
        return _load_frame_dir(path, opts)
    if path.stat().st_size == 0:
        raise VideoError(f"{path} is empty (0 bytes)")
    if is_image_file(path):
        return _load_image_file(path, limits)
    if limits is not None:
        names = ["pyav"]
    elif backend == "auto":
        # qwen-vl-utils decodes with decord or torchvision itself: it is only a last resort.
        names = [b for b in ("decord", "pyav") if _backend_available(b)] or ["qwen"]
    else:
        names = [backend]
    failures = []
    for name in names:
        try:
            frames, indices, source_fps, total = READERS[name](str(path), opts)
        except VideoError:
            raise
        except Exception as err:  # each decoder library raises its own error types
            failures.append(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        check_frame_count(len(indices), frame_limit, str(path))  # qwen-vl-utils picks its own count
        timestamps = [i / source_fps for i in indices]
        # qwen-vl-utils counts the window's frames as the video's
        rate = len(indices) / total * source_fps if name == "qwen" else sampled_rate(indices, total, source_fps, opts)
        return VideoClip(frames, indices, timestamps, total / source_fps, source_fps, name, sampled_fps=rate)
    if not failures:
        raise VideoError(f"no video backend is installed for {backend!r} (pip install av)")
    raise VideoError(f"cannot decode {path} as a video ({'; '.join(failures)})")
