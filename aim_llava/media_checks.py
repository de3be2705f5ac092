"""What a media file declares about the work of decoding it, read before a decoder is given it.

* MP4/QuickTime: FFmpeg builds an index entry for every sample the sample tables declare while
  it opens the file, and the tables are compressed (a constant sample size, runs of durations),
  so a few bytes can declare tens of millions of samples, gigabytes of index.
  :func:`mp4_index_entries` reads the box headers and the tables' counts only and says how many
  entries the index would get: each track's samples (the largest count any of its tables
  declares; for uncompressed audio, FFmpeg's entries of at least 160 samples per chunk) once per
  edit of its edit list, plus the samples of every movie fragment.
* JPEG: a progressive JPEG is decoded scan by scan, each scan a pass over every block of the
  image, and nothing bounds the number of scans: a megabyte can hold ten thousand.
  :func:`jpeg_scan_count` counts them (SOS markers, which entropy-coded data never holds).
"""

from __future__ import annotations

import math
import struct
from typing import BinaryIO

import numpy as np

# boxes whose content is more boxes, on the way to the sample tables and the fragments
MP4_CONTAINERS = frozenset((b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf"))
# the boxes a file may start with: its first box tells an MP4/QuickTime file
MP4_TOP_LEVEL = frozenset((b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp", b"sidx",
                           b"moof", b"junk", b"uuid"))
MAX_MP4_BOXES = 2**17  # visited in one file: far beyond a real one (a fragmented hour of video has ~15,000)
MIN_AUDIO_ENTRY_SAMPLES = 160  # FFmpeg indexes uncompressed audio in entries of at least this many samples
JPEG_SOS = b"\xff\xda"
CHUNK_BYTES = 2**20


class DeclaredTooMuch(ValueError):
    """A file declares more work than a reader takes (the message says what it declares)."""


def read_exactly(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise DeclaredTooMuch("its box structure ends in the middle of a box")
    return data


def is_mp4(file: BinaryIO) -> bool:
    """Whether the file starts with a box of MP4/QuickTime's top level."""
    file.seek(0)
    head = file.read(8)
    return len(head) == 8 and head[4:8] in MP4_TOP_LEVEL


class TrackCounts:
    """What one track's tables declare."""

    def __init__(self):
        self.samples, self.chunks, self.edits = 0, 0, 1
        self.audio = False  # its handler is 'soun'
        self.unit_durations = False  # one run of samples lasting one tick each: FFmpeg indexes it by chunks
        self.chunk_runs: list[tuple[int, int]] = []  # (first chunk, samples per chunk) of its stsc

    def entries(self) -> int:
        """The index entries FFmpeg builds for this track."""
        if self.audio and self.unit_durations:
            ends = [first for first, _ in self.chunk_runs[1:]] + [self.chunks + 1]
            per_edit = sum(max(0, end - first) * math.ceil(samples / MIN_AUDIO_ENTRY_SAMPLES)
                           for (first, samples), end in zip(self.chunk_runs, ends))
        else:
            per_edit = max(self.samples, self.chunks)
        return per_edit * self.edits


def table_entries(file: BinaryIO, count: int, end: int, limit: int, what: str) -> np.ndarray:
    """The 32-bit fields of a table's ``count`` entries of 8 or 12 bytes, read only once their
    number is known to be within ``limit``: [count, fields]."""
    width = 12 if what == "stsc" else 8
    if count > limit or file.tell() + width * count > end:
        raise DeclaredTooMuch(f"its {what} table declares {count:,} entries")
    return np.frombuffer(read_exactly(file, width * count), dtype=">u4").reshape(count, width // 4).astype(np.int64)


def read_table(file: BinaryIO, kind: bytes, body: int, end: int, track: TrackCounts, limit: int) -> None:
    """Reads what one of a track's boxes declares into ``track``."""
    if end - body < 12:
        return
    file.seek(body)
    _, first, second = struct.unpack(">III", read_exactly(file, 12))
    if kind in (b"stsz", b"stz2"):
        track.samples = max(track.samples, second)
    elif kind == b"stss":
        track.samples = max(track.samples, first)
    elif kind in (b"stco", b"co64"):
        track.chunks = max(track.chunks, first)
    elif kind == b"hdlr":
        track.audio = second == int.from_bytes(b"soun", "big")
    elif kind == b"elst":
        track.edits = max(1, first)
    elif kind in (b"stts", b"ctts", b"stsc"):
        file.seek(body + 8)
        entries = table_entries(file, first, end, limit, kind.decode())
        if kind == b"stsc":
            track.chunk_runs = [(int(chunk), int(samples)) for chunk, samples, _ in entries]
            return
        track.samples = max(track.samples, int(entries[:, 0].sum()))
        if kind == b"stts":
            track.unit_durations = first == 1 and int(entries[0, 1]) == 1


def mp4_index_entries(file: BinaryIO, size: int, limit: int) -> int:
    """The index entries FFmpeg would build for an MP4/QuickTime ``file`` of ``size`` bytes;
    DeclaredTooMuch once they (or a table's entries) are more than ``limit``, or once the file
    has shown more than :data:`MAX_MP4_BOXES` boxes."""
    tracks: list[TrackCounts] = []
    fragments, visited = 0, 0
    levels = [(0, size)]  # (position, end) of each level being walked, innermost last
    while levels:
        position, end = levels.pop()
        while position + 8 <= end:
            visited += 1
            if visited > MAX_MP4_BOXES:
                raise DeclaredTooMuch(f"it holds more than {MAX_MP4_BOXES:,} boxes")
            file.seek(position)
            box_size, kind = struct.unpack(">I4s", read_exactly(file, 8))
            header = 8
            if box_size == 1:
                box_size, header = struct.unpack(">Q", read_exactly(file, 8))[0], 16
            elif box_size == 0:
                box_size = end - position
            if box_size < header or position + box_size > end:
                break  # a damaged box ends its level, for FFmpeg too
            body, box_end = position + header, position + box_size
            if kind == b"trak":
                tracks.append(TrackCounts())
            if kind in MP4_CONTAINERS:
                levels.append((box_end, end))
                position, end = body, box_end
                continue
            if kind == b"trun" and box_end - body >= 8:
                file.seek(body + 4)
                fragments += struct.unpack(">I", read_exactly(file, 4))[0]
            elif tracks:  # FFmpeg applies a table to the last track opened
                read_table(file, kind, body, box_end, tracks[-1], limit)
            position = box_end
    total = fragments + sum(track.entries() for track in tracks)
    if total > limit:
        raise DeclaredTooMuch(f"its sample tables declare {total:,} index entries")
    return total


def jpeg_scan_count(file: BinaryIO, stop_after: int) -> int:
    """The scans (SOS markers) of a JPEG file, counted from its start; counting stops once it is
    past ``stop_after``. The file's position is left where it was."""
    position = file.tell()
    file.seek(0)
    count, tail = 0, b""
    try:
        while count <= stop_after and (chunk := file.read(CHUNK_BYTES)):
            data = tail + chunk  # a marker cut between two chunks is counted with the second
            count += data.count(JPEG_SOS)
            tail = data[-1:] if data.endswith(b"\xff") else b""
    finally:
        file.seek(position)
    return count
