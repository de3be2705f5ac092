"""Generated sample videos whose frames carry their own index (for tests and offline demos).

Each frame shows its index in binary as ``INDEX_BITS`` vertical bars (white = 1), wide enough to
survive lossy compression, so a reader can tell exactly which source frames were sampled.
"""

from __future__ import annotations

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


def write_sample_video(path: str | Path, num_frames: int = 90, fps: int = 30, height: int = 96, width: int = 160) -> Path:
    """Encode an H.264 mp4 of ``num_frames`` index frames at ``fps``."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "g": "12"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
