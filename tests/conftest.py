"""Shared fixtures: tiny checkpoints written offline, our model and transformers' oracle."""

import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from aim_llava import load_pretrained_model
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.conversation import build_prompt
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.reduction.config import build_plan
from aim_llava.tiny_checkpoint import write_tiny_checkpoint

torch.set_num_threads(2)

GPU_TIER = Path(__file__).parent / "gpu"


def pytest_collection_modifyitems(config, items):
    """The GPU tier (tests/gpu) needs CUDA: on a machine without it its tests are reported as
    skipped, with the reason; on the GPU machine run them with `pytest tests/gpu`."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU tier: needs CUDA (run `pytest tests/gpu` on a GPU machine)")
    for item in items:
        if GPU_TIER in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llava_qwen"), "llava_qwen", seed=0)


@pytest.fixture(scope="session")
def scripted_qwen_dir(tmp_path_factory):
    """The tiny checkpoint rewired to answer with the letter of its prompt's keyword
    (tests/scripted_checkpoint.py: "dog" -> A, "cat" -> B, "car" -> C, "ball" -> D)."""
    from scripted_checkpoint import write_scripted_checkpoint

    return write_scripted_checkpoint(tmp_path_factory.mktemp("scripted_llava_qwen"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_hf"), "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint written by our writer (published layout)."""
    from aim_llava.tiny_qwen2_5_vl import write_tiny_qwen_checkpoint

    return write_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def hf_qwen25_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint written by transformers' own classes (Qwen2_5_VLConfig,
    save_pretrained, Qwen2_5_VLProcessor) with our tiny tokenizer carrying Qwen's special tokens."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from aim_llava.model.qwen2_5_vl.chat import QWEN2_5_VL_CHAT_TEMPLATE
    from aim_llava.tiny_checkpoint import build_tokenizer
    from aim_llava.tiny_qwen2_5_vl import QWEN_SPECIAL_TOKENS, TINY_VIDEO_PIXELS

    out = tmp_path_factory.mktemp("hf_qwen2_5_vl")
    tokenizer = build_tokenizer(1, QWEN_SPECIAL_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3], tokens_per_second=2, window_size=112)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spreads that keep activations of order one (transformers' init is 0.02)
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif param.dim() == 2:
                param.copy_(noise * 0.1 * min(1.0, (128 / param.shape[1]) ** 0.5))
            else:
                param.copy_(noise * (0.05 if param.dim() == 5 else 0.1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384),
        video_processor=Qwen2VLVideoProcessor(size={"shortest_edge": TINY_VIDEO_PIXELS[0],
                                                    "longest_edge": TINY_VIDEO_PIXELS[1]}),
        tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen25(hf_qwen25_dir):
    """(tokenizer, model, processor, max_length) of the transformers-written Qwen2.5-VL, float32."""
    return load_pretrained_model(hf_qwen25_dir, device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="session")
def qwen25_oracle(hf_qwen25_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_qwen25_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def loaded(tiny_qwen_dir):
    """(tokenizer, model, image_processor, max_length) from the LLaVA-NeXT layout, float32, sdpa."""
    return load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="session")
def hf_oracle(tiny_hf_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
    return model.eval()


def random_frames(n: int, height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def png_data_url(width: int, height: int, colour: tuple[int, int, int] = (0, 0, 0)) -> str:
    """A ``data:`` URL of a one-colour PNG (a few hundred KB even at 12000 x 12000)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def in_process_service(model_dir, media_root, frames: int = 2, max_new_tokens: int | None = None, **options):
    """(VideoLLM, Service) of a checkpoint on the CPU, in this process; the model thread stops on exit."""
    from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM
    from aim_llava.serve import Service

    generation = GenerationOptions(max_new_tokens=max_new_tokens) if max_new_tokens else None
    llm = VideoLLM.from_pretrained(model_dir, device="cpu", sampling=SamplingOptions(num_frames=frames),
                                   generation=generation)
    service = Service(llm, media_root, "tiny", **options)
    try:
        yield llm, service
    finally:
        service.close()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt_ids(tokenizer, question: str, num_images: int = 1) -> torch.Tensor:
    """[1, L] ids of a qwen_1_5 prompt with ``num_images`` placeholders (0: text only)."""
    if num_images == 0:
        return torch.tensor([tokenizer(build_prompt(question, num_images=0)).input_ids])
    return tokenizer_image_token(build_prompt(question, num_images=num_images), tokenizer, return_tensors="pt")[None]


def expand_placeholders(ids: torch.Tensor, counts: list[int], token_id: int) -> torch.Tensor:
    """transformers' convention: one special token per visual embedding instead of one -200."""
    counts_iter = iter(counts)
    out = []
    for token in ids[0].tolist():
        out += [token_id] * next(counts_iter) if token == IMAGE_TOKEN_INDEX else [token]
    return torch.tensor([out])


def left_padded_batch(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of several [1, L] prompts right-aligned in one tensor, with the attention mask."""
    longest = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), longest), pad)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - p.shape[1] :] = p[0]
        mask[i, longest - p.shape[1] :] = 1
    return ids, mask


def plan(model, spec):
    """The built reduction plan of a preset name / mapping for this model."""
    return build_plan(spec, model.config.text.num_hidden_layers)


def run_under_triton_interpreter(code: str) -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels executed on the
    CPU; the flag is read at import) and this directory importable; it must print ``ok``."""
    pytest.importorskip("triton")  # installed with torch on Linux x86-64, where CI runs
    tests = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


MCQ_TASK_YAML = """task: aim_local_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
MCQ_TASK_UTILS = '''from aim_llava.evaluation import Item, parse_choice


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return Item(str(doc["id"]), doc["video"], doc["question"], doc["options"], doc["answer"], "all").prompt()


def process_results(doc, results):
    return {"accuracy": float(parse_choice(results[0], len(doc["options"])) == doc["answer"])}
'''


def write_mcq_task(root: Path, data: Path, max_new_tokens: int = 4) -> Path:
    """The lmms-eval task ``aim_local_mcq`` over ``data`` (the JSONL of ``aim-llava eval``), in the
    multiple-choice prompt of aim_llava.evaluation; returns the folder to give as --include_path."""
    task_dir = root / "tasks" / "aim_local_mcq"
    task_dir.mkdir(parents=True)
    (task_dir / "aim_local_mcq.yaml").write_text(MCQ_TASK_YAML.format(data=data, max_new_tokens=max_new_tokens))
    (task_dir / "utils.py").write_text(MCQ_TASK_UTILS)
    return root / "tasks"


def run_lmms_eval(command: list[str], cwd: Path) -> str:
    """Run an lmms-eval command line offline; it must exit 0 without logging an error (it exits 0
    after logging one it caught, e.g. an import failing inside its evaluator). Returns its output
    without loguru's colours."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert not [line for line in output.splitlines() if "| ERROR" in line or "Traceback" in line], output[-3000:]
    return output


def lmms_eval_logged_replies(output_dir: Path) -> list[str]:
    """The replies lmms-eval logged (--log_samples) for the task ``aim_local_mcq``, in doc order."""
    (samples,) = output_dir.rglob("*_samples_aim_local_mcq.jsonl")
    records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return [r["filtered_resps"] for r in records]


DTYPE_NOTE = "aim-llava: dtype auto on "  # the line a command writes when it loads a model with --dtype auto


def without_dtype_note(err: str) -> str:
    """A command's stderr without the line saying which dtype ``auto`` chose (aim_llava.capabilities)."""
    return "\n".join(line for line in err.splitlines() if not line.startswith(DTYPE_NOTE))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list, log: Path, env: dict | None = None, preexec_fn=None,
                  entry: tuple[str, ...] = ("aim_llava.cli", "serve"), ready: str = "/health", start_s: float = 120):
    """A real ``aim-llava serve`` process on 127.0.0.1 (``python -m`` ``entry``, then ``args``;
    the port is chosen here), its output in ``log``: yields (base URL, process) once ``ready``
    answers (within ``start_s`` seconds)."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", *entry, *map(str, args), "--port", str(port)]
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                   env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start: {log.read_text()}")
            try:
                if httpx.get(f"{base}{ready}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield base, process
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def serve_in_thread(app):
    """uvicorn serving ``app`` on 127.0.0.1 from a thread of this process: yields its port."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def record_new_tokens(llm, monkeypatch) -> list[int]:
    """The new tokens of each reply the model gives from now on (0 for one dropped before its
    prefill), in a list that fills as it answers."""
    produced, original = [], llm.answer_batch

    def recording(*args, **kwargs):
        results = original(*args, **kwargs)
        produced.extend(result.response.num_new_tokens if result.response else 0 for result in results)
        return results

    monkeypatch.setattr(llm, "answer_batch", recording)
    return produced


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk (length, type, data, CRC): for PNGs that say what a test needs."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels (what a decoder reads before decoding)."""
    import struct

    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IEND", b""))


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_growth_mib(pid: int, send):
    """(MiB the process's resident memory peaked above its size before ``send()``, what it returned)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak becomes the current size
    before = status_kib(pid, "VmRSS")
    result = send()
    return (status_kib(pid, "VmHWM") - before) / 1024, result
