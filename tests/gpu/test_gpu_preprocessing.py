"""GPU tier: frames preprocessed on the GPU (through the fixed pinned staging buffer, in chunks)
equal PIL's within the documented tolerance and take one chunk's memory beyond the result. Run on
a CUDA machine: ``pytest tests/gpu``."""

import numpy as np
import torch

from aim_llava.model.image_processor import PREPROCESS_CHUNK_BYTES, SiglipImageProcessor


def test_gpu_preprocessing_equals_pil_and_holds_one_chunk():
    frames = np.random.default_rng(0).integers(0, 256, (40, 1080, 1920, 3), dtype=np.uint8)
    processor = SiglipImageProcessor()
    processor.preprocess_frames(frames[:2], "cuda")  # the staging buffer and the allocator's first blocks
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pixels = processor.preprocess_frames(frames, "cuda")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - pixels.nbytes
    chunk_frames = max(1, PREPROCESS_CHUNK_BYTES // (1080 * 1920 * 3 * 4))
    assert extra <= 2.5 * chunk_frames * 1080 * 1920 * 3 * 4  # float pixels, resized passes, uint8 frames
    pil = processor.preprocess(list(frames[::13]))["pixel_values"]
    levels = (pil - pixels[::13].cpu()).abs() * 0.5 * 255
    assert levels.max() <= 2.0 + 1e-3 and levels.mean() <= 0.2
