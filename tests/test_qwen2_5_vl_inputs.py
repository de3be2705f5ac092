"""Qwen2.5-VL's frame and pixel rules against qwen-vl-utils and transformers: frame counts and
indices, smart_resize, the per-frame pixel cap, and reading a real video by those rules."""

import itertools

import pytest
import torch
from qwen_vl_utils import vision_process

from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLVisionConfig
from aim_llava.model.qwen2_5_vl.processor import ProcessorSettings, Qwen2_5_VLProcessor, smart_resize
from aim_llava.sample_media import read_frame_index, write_sample_video
from aim_llava.video import load_video, qwen_frame_count


@pytest.mark.parametrize("total, video_fps, fps, max_frames", list(itertools.product(
    (1, 3, 9, 40, 301, 2000), (1.0, 24.0, 29.97), (0.5, 2.0, 5.0), (None, 16))))
def test_fps_frame_count_is_qwen_vl_utils_smart_nframes(total, video_fps, fps, max_frames):
    element = {"fps": fps} if max_frames is None else {"fps": fps, "max_frames": max_frames}
    try:
        expected = vision_process.smart_nframes(element, total_frames=total, video_fps=video_fps)
    except ValueError:  # qwen-vl-utils refuses fewer than 2 frames; we repeat the one there is
        expected = 2
    opts = {"fps": fps, "num_frames": 32, "max_frames": max_frames}
    assert qwen_frame_count(total, video_fps, opts) == expected


@pytest.mark.parametrize("frames", [1, 2, 7, 8, 9, 31])
def test_asked_frame_count_rounds_to_the_temporal_patch(frames):
    expected = max(2, vision_process.smart_nframes({"nframes": frames}, total_frames=1000, video_fps=30)
                   if frames > 1 else 2)
    assert qwen_frame_count(1000, 30.0, {"fps": None, "num_frames": frames, "max_frames": None}) == expected


@pytest.mark.parametrize("height, width", [(28, 28), (56, 2000), (720, 1280), (1080, 1920), (333, 517), (4000, 3000),
                                           (20, 40), (100, 7000)])
def test_smart_resize_equals_transformers_and_qwen_vl_utils(height, width):
    """Both agree but where qwen-vl-utils shrinks a side to 0 pixels (a very elongated image);
    transformers keeps one 28-pixel row there, and so do we."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as transformers_resize

    for low, high in ((56 * 56, 28 * 28 * 1280), (128 * 784, 768 * 784), (16 * 784, 64 * 784)):
        ours = smart_resize(height, width, 28, low, high)
        assert ours == transformers_resize(height, width, 28, low, high)
        theirs = vision_process.smart_resize(height, width, 28, low, high)
        assert ours == theirs or 0 in theirs


@pytest.mark.parametrize("frames", [4, 64, 300, 768])
def test_frame_pixel_cap_is_qwen_vl_utils(frames):
    """fetch_video's bound: min(768 tokens, 90% of 128000 tokens shared by the frames x 2), never
    below 1.05 x the minimum (written here from qwen-vl-utils' constants)."""
    factor = 28
    low = vision_process.VIDEO_MIN_TOKEN_NUM * factor * factor
    high = vision_process.VIDEO_MAX_TOKEN_NUM * factor * factor
    total = vision_process.MODEL_SEQ_LEN * factor * factor * 0.9
    cap = max(min(high, total / frames * vision_process.FRAME_FACTOR), int(low * 1.05))
    processor = Qwen2_5_VLProcessor(Qwen2_5_VLVisionConfig(), ProcessorSettings())
    for height, width in ((720, 1280), (1080, 1920), (2160, 3840)):
        assert processor.resized_video_size(frames, height, width) == vision_process.smart_resize(height, width, factor, low,
                                                                                           cap)


def test_reading_a_video_by_qwen_rules(tmp_path):
    """A 40-frame 20 fps clip: 2 fps gives qwen-vl-utils' 4 frames at round(linspace), decoded as
    those frames, sampled at 2 frames a second; ``num_frames=5`` gives its 4 (5 rounded to even,
    half to even)."""
    video = write_sample_video(tmp_path / "clip.mp4", num_frames=40, fps=20)
    clip = load_video(video, fps=2.0, frame_rule="qwen", backend="pyav")
    count = vision_process.smart_nframes({"fps": 2.0}, total_frames=40, video_fps=20.0)
    expected = torch.linspace(0, 39, count).round().long().tolist()
    assert clip.indices == expected and [read_frame_index(frame) for frame in clip.frames] == expected
    assert clip.sampled_fps == pytest.approx(count / 40 * 20)
    uniform = load_video(video, num_frames=5, frame_rule="qwen", backend="pyav")
    count = vision_process.smart_nframes({"nframes": 5}, total_frames=40, video_fps=20.0)
    assert count == 4 and uniform.indices == torch.linspace(0, 39, count).round().long().tolist()
