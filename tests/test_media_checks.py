"""The costs a media file declares, read before a decoder is given it (aim_llava.media_checks):
checked against what FFmpeg itself indexes and against an independent walk of a JPEG's segments."""

import io

import av
import numpy as np
import pytest
from hostile_media import jpeg_segments, scan_bomb_jpeg, write_sample_table_bomb
from PIL import Image

from aim_llava.media_checks import CHUNK_BYTES, DeclaredTooMuch, is_mp4, jpeg_scan_count, mp4_index_entries
from aim_llava.sample_media import write_sample_video

LIMIT = 2**22


def ffmpeg_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)


def write_fragmented(path, frames: int) -> None:
    """An H.264 mp4 in movie fragments (an empty moov, one moof per keyframe)."""
    with av.open(str(path), mode="w", options={"movflags": "frag_keyframe+empty_moov"}) as container:
        stream = container.add_stream("libx264", rate=10, options={"g": "4"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 9, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("frames", [1, 12, 45])
def test_an_mp4_declares_the_entries_ffmpeg_indexes(tmp_path, frames):
    path = write_sample_video(tmp_path / "clip.mp4", num_frames=frames, fps=10)
    with open(path, "rb") as file:
        assert is_mp4(file)
        assert mp4_index_entries(file, path.stat().st_size, LIMIT) == ffmpeg_frames(path)


def test_a_fragmented_mp4_declares_its_fragments_samples(tmp_path):
    path = tmp_path / "fragments.mp4"
    write_fragmented(path, 18)
    with open(path, "rb") as file:
        assert mp4_index_entries(file, path.stat().st_size, LIMIT) == ffmpeg_frames(path) == 18


def test_a_sample_table_bomb_is_counted_from_its_few_bytes(tmp_path):
    """Three tables of a few dozen bytes declaring 30 million samples (FFmpeg builds ~740 MB of
    index from them): refused from the counts, nothing else read."""
    source = write_sample_video(tmp_path / "source.mp4", num_frames=12, fps=10)
    bomb = write_sample_table_bomb(source, tmp_path / "bomb.mp4")
    with open(bomb, "rb") as file, pytest.raises(DeclaredTooMuch, match="30,000,000"):
        mp4_index_entries(file, bomb.stat().st_size, LIMIT)
    with open(bomb, "rb") as file:
        assert mp4_index_entries(file, bomb.stat().st_size, 30_000_000) == 30_000_000


def test_other_containers_are_not_read_as_mp4(tmp_path):
    for data in (b"\x1a\x45\xdf\xa3" + bytes(60), b"RIFF" + bytes(60), b"\x47" * 188):
        assert not is_mp4(io.BytesIO(data))


@pytest.mark.parametrize("mode, progressive", [("RGB", True), ("L", True), ("RGB", False)])
def test_a_jpegs_scans_are_its_sos_segments(mode, progressive):
    buffer = io.BytesIO()
    Image.new(mode, (64, 48), 90).save(buffer, "JPEG", progressive=progressive)
    data = buffer.getvalue()
    expected = sum(1 for marker, _, _ in jpeg_segments(data) if marker == 0xDA)
    assert jpeg_scan_count(io.BytesIO(data), 1000) == expected > 0
    assert expected > 1 if progressive else expected == 1


def test_scans_are_counted_across_read_chunks():
    data = b"\x00" * (CHUNK_BYTES - 1) + b"\xff\xda" + b"\x00" * 10  # a marker cut by the first chunk's end
    file = io.BytesIO(data)
    file.seek(7)
    assert jpeg_scan_count(file, 10) == 1 and file.tell() == 7  # the position is left where it was
    assert jpeg_scan_count(io.BytesIO(scan_bomb_jpeg(256, 5000)), 100) == 5000
