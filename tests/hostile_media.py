"""Media made to cost a reader time or memory (issue 40), small on disk and quick to make."""

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}
REPLACED_TABLES = {b"stsz", b"stts", b"stss", b"ctts", b"stsc", b"sdtp"}
LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one file


def write_mkv(path: Path, frames: int = 4, size: int = 32) -> Path:
    """A real H.264 Matroska clip of a few frames."""
    import av

    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * index % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_sparse_mkv(path: Path, size: int = 2**30) -> Path:
    """A real clip followed by a hole up to ``size`` bytes (4 KiB on disk): FFmpeg's Matroska
    demuxer scans the zeros for a cluster without producing a packet (~7 s a GiB)."""
    write_mkv(path)
    os.truncate(path, size)
    return path


def mp4_boxes(data: bytes) -> list:
    """[kind, children or payload] of each box of ``data`` (containers on the way to sample tables)."""
    boxes, position = [], 0
    while position + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + size]
        boxes.append([kind, mp4_boxes(body) if kind in MP4_CONTAINERS else body])
        position += size
    return boxes


def mp4_bytes(boxes: list) -> bytes:
    out = b""
    for kind, body in boxes:
        payload = mp4_bytes(body) if isinstance(body, list) else body
        out += struct.pack(">I4s", 8 + len(payload), kind) + payload
    return out


def write_sample_table_bomb(source: Path, path: Path, samples: int = 30_000_000) -> Path:
    """``source`` (an mp4 with its moov after its mdat) with its sample tables replaced by ones
    declaring ``samples`` samples of 16 bytes in one chunk: a few dozen bytes, from which FFmpeg
    builds an index entry per sample (24 bytes each) while it opens the file."""
    boxes = mp4_boxes(source.read_bytes())

    def edit(level: list) -> None:
        for box in level:
            kind, body = box
            if kind == b"stbl":
                box[1] = [b for b in body if b[0] not in REPLACED_TABLES] + [
                    [b"stts", struct.pack(">IIII", 0, 1, samples, 1)],
                    [b"stsc", struct.pack(">IIIII", 0, 1, 1, samples, 1)],
                    [b"stsz", struct.pack(">III", 0, 16, samples)],
                ]
            elif isinstance(body, list):
                edit(body)

    edit(boxes)
    path.write_bytes(mp4_bytes(boxes))
    return path


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan's entropy-coded data belongs to its SOS."""
    position, segments = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        end = position + 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, position, end))
        position = end
    return segments


def scan_bomb_jpeg(side: int = 2048, scans: int = 4000) -> bytes:
    """A grey progressive JPEG whose last scan is repeated up to ``scans`` scans: each one is a
    pass over every block (a few ms at 2048 x 2048), a few bytes each."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    sos = [(start, end) for marker, start, end in jpeg_segments(data) if marker == 0xDA]
    start, end = sos[-1]
    return data[:end] + data[start:end] * (scans - len(sos)) + data[end:]


def make_huge_directory(path: Path, entries: int) -> Path:
    """A directory of ``entries`` names (hard links to a few empty files: no inode each)."""
    path.mkdir()
    source = None
    for index in range(entries):
        name = path / f"{index}.png"
        if index % LINKS_PER_FILE == 0:
            name.touch()
            source = name
        else:
            os.link(source, name)
    return path


def make_deep_path(root: Path, depth: int) -> str:
    """A chain of ``depth`` nested directories under ``root`` (made one at a time from its
    parent's descriptor); returns it relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    parent = os.open(root, os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=parent)
            child = os.open("d", os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
    finally:
        os.close(parent)
    return "/".join(["d"] * depth)
