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
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.sample_media import random_frames
from aim_llava.tiny_checkpoint import write_tiny_checkpoint
from aim_llava.video import VideoClip

HERE = Path(__file__).resolve().parent
ARCHITECTURE = "AimLlavaOnevisionForConditionalGeneration"
QUESTION = "Describe the video."
FRAME_COUNTS = (4, 3)
MAX_TOKENS = 8
# Both engines compute in float32; their logits differ by far less than this, so a greedy choice
# whose top-2 margin is larger cannot flip between them.
MIN_MARGIN = 1e-3

torch.set_num_threads(2)


def vllm_prompt(question: str = QUESTION, markers: tuple[str, ...] = ("video",)) -> str:
    """The qwen_1_5 chat prompt with vLLM's markers in this order (``<video>``, ``<image>``; aim-llava's
    engine marks both with ``<image>``)."""
    parts = build_prompt(question, "qwen_1_5", num_images=len(markers)).split("<image>")
    return parts[0] + "".join(f"<{marker}>{part}" for marker, part in zip(markers, parts[1:]))


def request(videos=(), images=(), mm_processor_kwargs=None) -> dict:
    """A request of engine_run.py: the images' markers first, then the videos'."""
    markers = ("image",) * len(images) + ("video",) * len(videos)
    item = {"prompt": vllm_prompt(markers=markers), "videos": [str(v) for v in videos],
            "images": [str(i) for i in images]}
    if mm_processor_kwargs is not None:
        item["mm_processor_kwargs"] = mm_processor_kwargs
    return item


def aim_overrides(reduction) -> dict:
    return {"architectures": [ARCHITECTURE], "aim_reduction": reduction}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vllm"), "hf", seed=1, head_size=64, processor=True)


def save_video(path: Path, count: int, seed: int) -> Path:
    """Random 384x384 frames (the processors' size: neither engine resizes them) saved as .npy."""
    np.save(path, random_frames(count, 384, 384, seed=seed))
    return path


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> list[Path]:
    """Random videos of FRAME_COUNTS frames."""
    folder = tmp_path_factory.mktemp("videos")
    return [save_video(folder / f"video{seed}.npy", count, seed) for seed, count in enumerate(FRAME_COUNTS)]


def run_vllm(work: Path, model: Path, hf_overrides: dict, calls: list[list[dict]], dtype: str = "float32",
             limit_mm_per_prompt: dict | None = None) -> subprocess.CompletedProcess:
    """engine_run.py in a child process; its results are in work / "out.pt"."""
    spec = {"model": str(model), "hf_overrides": hf_overrides, "calls": calls, "dtype": dtype,
            "limit_mm_per_prompt": limit_mm_per_prompt or {"image": 0, "video": 1}, "max_tokens": MAX_TOKENS}
    (work / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(work / "spec.json"), str(work / "out.pt")],
                          capture_output=True, text=True, timeout=1200, env=env)


def vllm_results(work: Path, model: Path, hf_overrides: dict, calls: list[list[dict]], **engine) -> dict:
    """{"calls": per call, its requests' results or {"error": message}; "encoder": per call of
    the model's encoder, its modality, embeddings and pooled frame tokens} (engine_run.py)."""
    done = run_vllm(work, model, hf_overrides, calls, **engine)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(work / "out.pt", weights_only=False)


def one_by_one(videos: list[Path]) -> list[list[dict]]:
    """One generate call per video."""
    return [[request([video])] for video in videos]


def encoded(run: dict, modality: str, call: int | None = None) -> list[torch.Tensor]:
    """The embeddings the model's encoder returned for items of ``modality`` (in call ``call``)."""
    return [e for batch in run["encoder"] if batch["modality"] == modality and call in (None, batch["call"])
            for e in batch["embeddings"]]


@pytest.fixture(scope="session")
def vllm_stock(tmp_path_factory, checkpoint, videos) -> dict:
    """vLLM's own LLaVA-OneVision (the plugin is loaded but not selected)."""
    return vllm_results(tmp_path_factory.mktemp("stock"), checkpoint, {}, one_by_one(videos))


@pytest.fixture(scope="session")
def vllm_merged(tmp_path_factory, checkpoint, videos) -> dict:
    """The plugin's architecture with AIM's merging alone, one generate call per video; then one
    per video whose request asks for pool_12 (a frame baseline: average pooling to 5x5)."""
    pooled = [[request([video], mm_processor_kwargs={"aim_reduction": "pool_12"})] for video in videos]
    return vllm_results(tmp_path_factory.mktemp("merged"), checkpoint, aim_overrides("aim_merge_only"),
                        one_by_one(videos) + pooled)


# The videos of the batching tests: two of 4 frames (vLLM stacks videos of one size into a
# tensor), and 3, 2 and 5 (it passes videos of different sizes as a list).
BATCH_FRAMES = (4, 4, 3, 2, 5)
CUSTOM = {"name": "merge_10_100", "method": "aim", "merge_steps": [10, 100], "prune": None}
# per generate call, its requests' videos (indices into BATCH_FRAMES), with the deployment's preset
CUSTOM_CALLS = [[(1,)], [(0,), (2,), (3, 4)]]
IMAGE_CALL = len(CUSTOM_CALLS)  # then a call with an image beside the 2-frame video batch_videos[3]
# per generate call, its requests: (video, the request's preset, or None for the deployment's)
REQUEST_PRESET_CALLS = [[(2, "pool_12"), (0, "random_25"), (0, None), (1, "aim_merge_only")]]
# requests refused: a preset acting inside the LLM, one with more tokens per frame than the
# deployment's (its memory was not profiled for them), and a file path (requests name presets only)
REFUSED_REQUEST_PRESETS = ["aim_default", "baseline", str(HERE.parent / "configs" / "pool_12.yaml")]


@pytest.fixture(scope="session")
def batch_videos(tmp_path_factory) -> list[Path]:
    """Random videos of BATCH_FRAMES frames."""
    folder = tmp_path_factory.mktemp("batch_videos")
    return [save_video(folder / f"video{i}.npy", count, seed=10 + i) for i, count in enumerate(BATCH_FRAMES)]


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Path:
    """A random 384x384 image (anyres: a base view and one crop). Square: for other shapes,
    transformers' processor resizes the base view a little differently from our engine's
    (max 0.02 in the embeddings of a 512x384 one; the crops agree to 1e-5)."""
    path = tmp_path_factory.mktemp("image") / "image.npy"
    np.save(path, random_frames(1, 384, 384, seed=20)[0])
    return path


@pytest.fixture(scope="session")
def vllm_custom(tmp_path_factory, checkpoint, batch_videos, image) -> dict:
    """The plugin with a merge_steps mapping (room for two videos and an image a prompt): the
    calls of CUSTOM_CALLS; one with an image beside a video; the calls of REQUEST_PRESET_CALLS;
    one call per refused request preset."""
    calls = [[request([batch_videos[i] for i in videos]) for videos in call] for call in CUSTOM_CALLS]
    calls.append([request([batch_videos[3]], images=[image])])
    calls += [[request([batch_videos[i]], mm_processor_kwargs=None if preset is None else {"aim_reduction": preset})
               for i, preset in call] for call in REQUEST_PRESET_CALLS]
    calls += [[request([batch_videos[2]], mm_processor_kwargs={"aim_reduction": preset})]
              for preset in REFUSED_REQUEST_PRESETS]
    return vllm_results(tmp_path_factory.mktemp("custom"), checkpoint, aim_overrides(CUSTOM), calls,
                        limit_mm_per_prompt={"image": 1, "video": 2})


@pytest.fixture(scope="session")
def our_engine(checkpoint):
    from aim_llava.pipeline import VideoLLM

    return VideoLLM.from_pretrained(checkpoint, device="cpu", dtype="float32")


def video_token_id(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["video_token_index"]


def call_results(run: dict, call: int) -> list[dict]:
    """The results of the requests of ``run``'s call ``call`` (failing with its error if it had one)."""
    results = run["calls"][call]
    assert not isinstance(results, dict), results["error"]
    return results


def video_placeholders(result: dict, checkpoint: Path) -> int:
    """How many video tokens vLLM placed in the request's prompt."""
    return result["prompt_token_ids"].count(video_token_id(checkpoint))


def clip_of(path: Path) -> VideoClip:
    """The video of an .npy file as aim-llava's engine takes it."""
    frames = np.load(path)
    count = frames.shape[0]
    return VideoClip(frames, list(range(count)), [float(i) for i in range(count)], float(count), 1.0, str(path))


def image_clip_of(path: Path) -> VideoClip:
    """The image of an .npy file [H, W, 3] as aim-llava's engine takes it."""
    return VideoClip(np.load(path)[None], [0], [0.0], 0.0, 0.0, str(path), is_image=True)


def our_greedy(engine, items: list[VideoClip], presets: list) -> tuple[list[int], list[int], list[float]]:
    """Our engine's prompt ids (-200 marks each image or video, in the order of ``items``), greedy
    tokens (EOS not stopping, as vLLM's ignore_eos) and the top-2 logit margin of each choice (the
    prompt and the tokens re-run). ``presets[i]`` reduces ``items[i]``; the LLM runs the first's
    plan (the plugin's presets do nothing inside the LLM)."""
    plan = engine.plan(engine.resolve(presets[0]))
    features = [engine.encode(clip, reduction=preset).features for clip, preset in zip(items, presets)]
    ids = tokenizer_image_token(build_prompt(QUESTION, num_images=len(items)), engine.tokenizer)
    tokens = engine.model.generate(torch.tensor([ids]), visual_features=features, max_new_tokens=MAX_TOKENS,
                                   eos_token_id=[], reduction=plan)[0].tolist()
    logits = engine.model(torch.tensor([ids + tokens[:-1]]), visual_features=features, reduction=plan).logits
    top = logits[0, -len(tokens):].topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == tokens
    return ids, tokens, (top.values[:, 0] - top.values[:, 1]).tolist()


def assert_greedy_equals_ours(result: dict, engine, items: list[VideoClip], presets: list, checkpoint: Path) -> None:
    """vLLM's greedy tokens and top-2 margins for a request equal our engine's for the same items
    and presets, where every margin makes greedy decoding stable; the prompts' text agrees."""
    ids, tokens, margins = our_greedy(engine, items, presets)
    assert min(margins) > MIN_MARGIN, f"greedy is not stable on this checkpoint and prompt: margins {margins}"
    config = json.loads((checkpoint / "config.json").read_text())
    placeholders = {config["video_token_index"], config["image_token_index"]}
    assert [t for t in result["prompt_token_ids"] if t not in placeholders] == [t for t in ids if t != -200]
    assert result["token_ids"] == tokens
    their_margins = [first - second for first, second in result["top2_logprobs"]]
    assert their_margins == pytest.approx(margins, abs=MIN_MARGIN / 10)


def assert_each_was_encoded(expected: list[torch.Tensor], embeddings: list[torch.Tensor], atol: float) -> None:
    """Every expected item [tokens, C] has an embedding of its shape within ``atol`` among
    ``embeddings`` (vLLM encodes a call's items in an order of its own), one each."""
    assert len(embeddings) == len(expected), [e.shape for e in embeddings]
    for item, want in enumerate(expected):
        differences = [(e.float() - want.float()).abs().max().item() if e.shape == want.shape else float("inf")
                       for e in embeddings]
        assert min(differences) <= atol, (f"item {item} {tuple(want.shape)}: nearest embedding differs by "
                                          f"{min(differences)} (shapes {[tuple(e.shape) for e in embeddings]})")
