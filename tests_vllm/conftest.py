"""Fixtures of the vLLM plugin's tests (run by scripts/run_vllm_tests.sh in .venv-vllm, which has
vLLM's CPU build; the main suite does not collect this folder).

vLLM runs in a child process per engine (tests_vllm/engine_run.py); aim-llava's own engine runs
here, on the same tiny checkpoint (HF layout with processor files, text head size 64, which
vLLM's CPU attention supports) and the same frames, in float32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aim_llava.conversation import build_prompt
from aim_llava.tiny_checkpoint import write_tiny_checkpoint

HERE = Path(__file__).resolve().parent
ARCHITECTURE = "AimLlavaOnevisionForConditionalGeneration"
QUESTION = "Describe the video."
FRAME_COUNTS = (4, 3)
MAX_TOKENS = 8

torch.set_num_threads(2)


def vllm_prompt(question: str = QUESTION) -> str:
    """The qwen_1_5 chat prompt with vLLM's video marker (aim-llava's engine uses <image>)."""
    return build_prompt(question, "qwen_1_5").replace("<image>", "<video>")


def aim_overrides(reduction) -> dict:
    return {"architectures": [ARCHITECTURE], "aim_reduction": reduction}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vllm"), "hf", seed=1, head_size=64, processor=True)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> list[Path]:
    """Random 384x384 videos (the processors' size: neither engine resizes them)."""
    folder = tmp_path_factory.mktemp("videos")
    paths = []
    for seed, count in enumerate(FRAME_COUNTS):
        frames = np.random.default_rng(seed).integers(0, 256, (count, 384, 384, 3), dtype=np.uint8)
        np.save(folder / f"video{seed}.npy", frames)
        paths.append(folder / f"video{seed}.npy")
    return paths


def run_vllm(work: Path, model: Path, hf_overrides: dict, videos: list[Path]) -> subprocess.CompletedProcess:
    """engine_run.py in a child process; its results are in work / "out.pt"."""
    spec = {"model": str(model), "hf_overrides": hf_overrides, "videos": [str(v) for v in videos],
            "prompts": [vllm_prompt()] * len(videos), "max_tokens": MAX_TOKENS}
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(work / "spec.json"), str(work / "out.pt")],
                          capture_output=True, text=True, timeout=1200, env=env)


def vllm_results(work: Path, model: Path, hf_overrides: dict, videos: list[Path]) -> list[dict]:
    done = run_vllm(work, model, hf_overrides, videos)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(work / "out.pt", weights_only=False)


@pytest.fixture(scope="session")
def vllm_stock(tmp_path_factory, checkpoint, videos) -> list[dict]:
    """vLLM's own LLaVA-OneVision (the plugin is loaded but not selected)."""
    return vllm_results(tmp_path_factory.mktemp("stock"), checkpoint, {}, videos)


@pytest.fixture(scope="session")
def vllm_merged(tmp_path_factory, checkpoint, videos) -> list[dict]:
    """The plugin's architecture with AIM's merging alone."""
    return vllm_results(tmp_path_factory.mktemp("merged"), checkpoint, aim_overrides("aim_merge_only"), videos)


@pytest.fixture(scope="session")
def vllm_pooled(tmp_path_factory, checkpoint, videos) -> list[dict]:
    """The plugin's architecture with a frame baseline (average pooling to 5x5 per frame)."""
    return vllm_results(tmp_path_factory.mktemp("pooled"), checkpoint, aim_overrides("pool_12"), videos)


@pytest.fixture(scope="session")
def our_engine(checkpoint):
    from aim_llava.pipeline import VideoLLM

    return VideoLLM.from_pretrained(checkpoint, device="cpu", dtype="float32")
