"""Generated sample videos whose frames carry their own index (for tests and offline demos).

Each frame shows its index in binary as ``INDEX_BITS`` vertical bars (white = 1), wide enough to
survive lossy compression, so a reader can tell exactly which source frames were sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

INDEX_BITS = 10


def index_frame(index: int, height: int = 96, width: int = 160) -> np.ndarray:
    """An HxWx3 uint8 frame encoding ``index`` in its bars."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    bar = width // INDEX_BITS
    for bit in range(INDEX_BITS):
        if (index >> bit) & 1:
            frame[:, bit * bar : (bit + 1) * bar] = 255
    return frame


def textured_frame(index: int, height: int = 96, width: int = 160) -> np.ndarray:
    """An HxWx3 uint8 frame with what resampling filters differ on: smooth waves, a gradient, a
    checkerboard with sharp edges (moving with ``index``). It does not carry its index."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 127 + 120 * np.sin(x / 37 + index / 5) * np.cos(y / 53)
    green = 255 * x / width
    blue = 255.0 * ((x // 80 + y // 80 + index) % 2)
    return np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)


def random_frames(count: int, height: int = 360, width: int = 640, seed: int = 0) -> np.ndarray:
    """``count`` frames of uniform noise [T, H, W, 3] uint8 (from ``seed``): 640x360 by default, the
    stand-in for a decoded video where only the sizes matter (benchmarks, the server's warm-up)."""
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def read_frame_index(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frame` (reads the centre of each bar)."""
    height, width = frame.shape[:2]
    bar = width // INDEX_BITS
    value = 0
    for bit in range(INDEX_BITS):
        patch = frame[height // 4 : 3 * height // 4, bit * bar + bar // 4 : (bit + 1) * bar - bar // 4]
        if patch.mean() > 127:
            value |= 1 << bit
    return value


def write_sample_video(path: str | Path, num_frames: int = 90, fps: int = 30, height: int = 96, width: int = 160,
                       gop: int = 12, bframes: int | None = None,
                       draw: Callable[[int, int, int], np.ndarray] = index_frame) -> Path:
    """Encode an H.264 mp4 of ``num_frames`` frames at ``fps`` (a keyframe every ``gop`` frames;
    ``bframes`` B-frames between references, x264's default when None); frame i is
    ``draw(i, height, width)``, an index frame by default."""
    return _encode(path, [1] * num_frames, fps, height, width, gop, bframes, draw)


def write_vfr_sample_video(path: str | Path, durations: list[int], height: int = 96, width: int = 160,
                           gop: int = 12) -> Path:
    """A variable-frame-rate mp4: frame i lasts ``durations[i]`` ticks of 1/90 s."""
    return _encode(path, durations, 90, height, width, gop, None)


def _encode(path, durations: list[int], rate: int, height: int, width: int, gop: int, bframes: int | None,
            draw: Callable[[int, int, int], np.ndarray] = index_frame) -> Path:
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        options = {"crf": "18", "g": str(gop), "keyint_min": str(gop)}
        if bframes is not None:
            options["bf"] = str(bframes)
        stream.options = options
        pts = 0
        for i, duration in enumerate(durations):
            frame = av.VideoFrame.from_ndarray(draw(i, height, width), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, rate)
            pts += duration
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_hls_playlist(path: str | Path, segment: str | Path, seconds: float) -> Path:
    """An HLS playlist naming one segment by its absolute path (for tests: what a hostile client
    names as a video, since a demuxer that follows it opens another file)."""
    path = Path(path)
    path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:{math.ceil(seconds)}\n#EXTINF:{seconds:.1f},\n"
                    f"{Path(segment).resolve()}\n#EXT-X-ENDLIST\n")
    return path
