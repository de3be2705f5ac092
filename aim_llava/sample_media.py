"""Generated sample videos whose frames carry their own index (for tests and offline demos).

Each frame shows its index in binary as ``INDEX_BITS`` vertical bars (white = 1), wide enough to
survive lossy compression, so a reader can tell exactly which source frames were sampled.
"""

from __future__ import annotations

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


def random_frames(count: int, height: int = 360, width: int = 640) -> np.ndarray:
    """``count`` frames of uniform noise [T, H, W, 3] uint8 (seeded): 640x360 by default, the
    stand-in for a decoded video where only the sizes matter (benchmarks, the server's warm-up)."""
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


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
                       gop: int = 12, bframes: int | None = None) -> Path:
    """Encode an H.264 mp4 of ``num_frames`` index frames at ``fps`` (a keyframe every ``gop``
    frames; ``bframes`` B-frames between references, x264's default when None)."""
    return _encode(path, [1] * num_frames, fps, height, width, gop, bframes)


def write_vfr_sample_video(path: str | Path, durations: list[int], height: int = 96, width: int = 160,
                           gop: int = 12) -> Path:
    """A variable-frame-rate mp4: frame i lasts ``durations[i]`` ticks of 1/90 s."""
    return _encode(path, durations, 90, height, width, gop, None)


def _encode(path, durations: list[int], rate: int, height: int, width: int, gop: int, bframes: int | None) -> Path:
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
            frame = av.VideoFrame.from_ndarray(index_frame(i, height, width), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, rate)
            pts += duration
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
