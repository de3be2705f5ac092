"""The ``aim-llava`` command: caption videos or ask about them, one or many at a time.

Errors in what the user gave (a bad path, an unknown preset, a negative frame count) end with one
line on stderr and exit code 2. In a batch, a failing video is recorded with its error and the
others go on; the exit code is then 2 as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aim_llava import __version__
from aim_llava.conversation import check_text
from aim_llava.distributed import Shard
from aim_llava.errors import AimLlavaError, DeviceMemoryError, one_line
from aim_llava.records import (
    ResultsFile,
    check_no_unasked_records,
    check_writable,
    error_message,
    latest_by_key,
    read_records,
    resolve_output,
    write_records,
    write_text_atomically,
)
from aim_llava.reuse_cache import DEFAULT_CACHE_MB
from aim_llava.run_settings import differences, run_settings, settings_id, stamped
from aim_llava.text_files import parse_json, read_text_file
from aim_llava.video import BACKENDS, is_image_file

if TYPE_CHECKING:
    from aim_llava.server.limits import ServerLimits

API_KEYS_VARIABLE = "AIM_LLAVA_API_KEY"
EXIT_BAD_INPUT = 2
EXIT_SYSTEM_ERROR = 1  # the operating system or the device refused (a full disk, out of device memory)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
DEFAULT_MODEL_DIR = "model/llava-onevision-qwen2-7b-ov"


class CliError(AimLlavaError):
    """A command-line usage error."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option that takes a value ends its help with its default, when it has one (not None
    or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default is None or action.default == [] or action.default is argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or action.nargs == 0 or silent:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), and --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CliError(f"{message} (see {self.prog} --help)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights and activations; auto: the checkpoint's on a GPU (float16 where it has no "
                             "bfloat16), bfloat16 on a CPU with bfloat16 instructions, float32 on other CPUs")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention kernel (flash_attention_2 needs flash-attn, else sdpa is used)")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="decode eagerly on a GPU (by default each decoding step is replayed as a CUDA graph)")


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    """How many items are generated together, and how many threads read ahead."""
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="videos encoded and generated together")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="threads reading the next videos while the model works (0: none)")


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """The reuse cache of encoded videos and their KV prefixes (VideoLLM's cache_mb, prefix_reuse)."""
    parser.add_argument("--cache-mb", type=non_negative_float, default=DEFAULT_CACHE_MB,
                        help="memory (on the model's device) for reusing encoded videos and their KV prefixes "
                             "across questions about the same clip (0: off)")
    parser.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                        help="keep only the encoded videos in the cache, not their KV prefixes")


MODEL_HELP = ("checkpoint directory, or a Hugging Face id (org/name) in the local Hugging Face cache "
              "($AIM_LLAVA_MODEL sets the default)")
CONFIG_HELP = "reduction: a preset (aim-llava presets lists them), a YAML path, fitprune:RECIPE.json or budget:FRACTION"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get("AIM_LLAVA_MODEL", DEFAULT_MODEL_DIR), help=MODEL_HELP)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """How replies are sampled (GenerationOptions)."""
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="sampling temperature (0: greedy decoding, the same reply every time)")
    parser.add_argument("--top-p", type=unit_fraction, help="nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability reaches this (with --temperature)")
    parser.add_argument("--seed", type=_int, help="seed of the sampling, for replies that repeat (with --temperature)")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument("--config", default="baseline", help=CONFIG_HELP)
    parser.add_argument("--frames", type=positive_int,
                        help="frames sampled uniformly (default: the model's rule, 32 frames for LLaVA-OneVision, "
                             "2 a second for Qwen2.5-VL)")
    parser.add_argument("--fps", type=positive_float, help="sample at this rate instead (capped by --max-frames)")
    parser.add_argument("--max-frames", type=positive_int, help="upper bound on sampled frames")
    parser.add_argument("--start", type=non_negative_float, help="window start in seconds")
    parser.add_argument("--end", type=positive_float, help="window end in seconds")
    parser.add_argument("--frame-rate", type=positive_float, default=1.0,
                        help="frames per second of a directory of frame images (its files are its frames, in name "
                             "order)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="video decoder")
    parser.add_argument("--time-aware", action="store_true", help="state duration and frame times in the prompt")
    parser.add_argument("--template", default="qwen_1_5", help="conversation template")
    add_runtime_options(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="the longest reply, in tokens")
    add_generation_options(parser)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (not with --json)")
    parser.add_argument("--json", action="store_true", help="one JSON line per video on stdout")
    parser.add_argument("--output", type=Path,
                        help="also write the records to this JSONL file, each as soon as it is done "
                             "(docs/records.schema.json)")
    parser.add_argument("--resume", action="store_true",
                        help="with --output: go on from its records (items done there with the same settings are "
                             "skipped)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --output: replace its records (the old file stays whole until the run ends)")
    add_batch_options(parser)
    add_cache_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="aim-llava", description="Fast video LLM inference with visual-token reduction.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    caption = commands.add_parser("caption", help="describe videos (or images)")
    caption.add_argument("videos", nargs="+", help="videos, frame directories, images, or .txt lists of paths")
    caption.add_argument("--prompt", help="instruction instead of the default caption request")
    add_common_options(caption)
    ask = commands.add_parser("ask", help="ask a question about a video")
    ask.add_argument("video", help="a video, frame directory, image, or .txt list of paths")
    ask.add_argument("question", help="the question, in quotes")
    add_common_options(ask)
    flops = commands.add_parser("flops", help="analytic compute of a setting (paper accounting and as executed)")
    flops.add_argument("--arch", required=True, help="named architecture or a config.json path")
    flops.add_argument("--frames", type=positive_int, default=32, help="frames of the video")
    flops.add_argument("--text-tokens", type=non_negative_int, default=100, help="text tokens of the prompt")
    flops.add_argument("--config", default="baseline", help=CONFIG_HELP)
    flops.add_argument("--kv-bytes", type=positive_int, default=2, help="bytes per cached value (2 for bf16)")
    flops.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    presets = commands.add_parser("presets", help="list the reduction presets, or show what one does")
    presets.add_argument("name", nargs="?",
                         help="a preset (or YAML path, budget:X, fitprune:R.json) to show: its YAML, the visual "
                              "tokens entering each LLM layer and its prefill FLOPs against the baseline")
    presets.add_argument("--arch", default="llava-onevision-qwen2-7b",
                         help="named architecture or a config.json path")
    presets.add_argument("--frames", type=positive_int, default=32, help="frames of the video")
    presets.add_argument("--text-tokens", type=non_negative_int, default=100,
                         help="text tokens of the prompt")
    presets_format = presets.add_mutually_exclusive_group()
    presets_format.add_argument("--json", action="store_true", help="JSON instead of text (one object per preset)")
    presets_format.add_argument("--markdown", action="store_true", help="the list as a Markdown table (the README's)")
    bench = commands.add_parser("bench", help="measure prefill/decode speed of several configs in one run")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--arch", default="llava-onevision-qwen2-0.5b", help="named architecture, random weights")
    source.add_argument("--model", help="a checkpoint (directory or cached Hugging Face id) instead of random weights")
    bench.add_argument("--configs", default="baseline,aim_default",
                       help="reductions to compare, comma-separated (presets, YAML paths, budget:X)")
    bench.add_argument("--frames", type=positive_int, default=16, help="frames of the video")
    bench.add_argument("--video", help="read the frames from this video (default: synthetic frames)")
    bench.add_argument("--backend", choices=BACKENDS, default="auto", help="video decoder for --video")
    bench.add_argument("--text-tokens", type=positive_int, default=100, help="text tokens of the prompt")
    bench.add_argument("--decode-tokens", type=positive_int, default=16, help="tokens generated to time decoding")
    bench.add_argument("--repeats", type=positive_int, default=3,
                       help="timed rounds after the warm-up (each stage's median is reported)")
    bench.add_argument("--batch", type=positive_int, default=1, help="prompts generated together (decode tokens/s)")
    add_runtime_options(bench)
    bench.add_argument("--json", nargs="?", const=True, metavar="FILE",
                       help="print the report as JSON instead of the table (--json FILE writes it to FILE, as "
                            "--output does)")
    bench.add_argument("--output", help="also write the full report as JSON to this file")
    bench.add_argument("--plot", help="write a PNG: FLOPs vs measured time, and tokens per layer")
    calibrate = commands.add_parser("fitprune-calibrate", help="fit a FitPrune recipe to a FLOPs budget")
    calibrate.add_argument("--model", required=True, help=MODEL_HELP.split(" ($")[0])
    calibrate.add_argument("--data", required=True, type=Path,
                           help='JSONL, one {"video" or "image": PATH, "question": TEXT} per line (5 to 100)')
    calibrate.add_argument("--budget", type=positive_float, required=True, help="fraction of the unpruned prefill FLOPs")
    calibrate.add_argument("--out", required=True, type=Path, help="recipe JSON to write")
    calibrate.add_argument("--frames", type=positive_int, default=32, help="frames sampled uniformly")
    add_runtime_options(calibrate)
    evaluate = commands.add_parser("eval", help="multiple-choice video QA accuracy of one or several configs")
    evaluate.add_argument("--data", required=True, type=Path,
                          help='JSONL: {"id", "video", "question", "options": [...], "answer", "category"} per line')
    add_model_option(evaluate)
    evaluate.add_argument("--config", default="baseline", help=CONFIG_HELP)
    evaluate.add_argument("--configs", help="several configs, comma-separated (a comparison table)")
    evaluate.add_argument("--output", type=Path, default=Path("outputs/eval"),
                          help="directory for each config's records (CONFIG.jsonl) and summary.json")
    evaluate.add_argument("--resume", action="store_true",
                          help="go on from the records in --output (items answered there with the same settings are "
                               "skipped)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the records in --output (each old file stays whole until the run ends)")
    evaluate.add_argument("--frames", type=positive_int, default=32, help="frames sampled uniformly")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=8,
                          help="the longest reply, in tokens (the answer is its first option letter)")
    add_generation_options(evaluate)
    add_runtime_options(evaluate)
    add_batch_options(evaluate)
    add_cache_options(evaluate)
    evaluate.add_argument("--plot", help="PNG of accuracy against prefill FLOPs")
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions)")
    serve.add_argument("model_argument", nargs="?", metavar="MODEL", help=f"the model to serve: {MODEL_HELP}")
    serve.add_argument("--model", help="the model, as MODEL")
    serve.add_argument("--media-root", required=True, type=Path,
                       help="the only directory whose files (videos, images) requests may name")
    serve.add_argument("--config", default="baseline", help="default reduction (requests may pick another)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", help="the model id of the API (default: the checkpoint's folder name)")
    serve.add_argument("--frames", type=positive_int, default=32, help="frames sampled per video by default")
    serve.add_argument("--max-new-tokens", type=positive_int, default=256, help="default max_tokens")
    serve.add_argument("--max-batch-size", type=positive_int, default=8, help="requests generated together (1: none)")
    serve.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                       help="take requests at once (by default one synthetic request runs first, so that the first "
                            "client does not pay for compiling GPU kernels)")
    serve.add_argument("--max-wait-ms", type=non_negative_float, default=10.0,
                       help="how long a request waits for others to batch with")
    serve.add_argument("--max-pending", type=positive_int, default=32,
                       help="requests in progress (reading frames or waiting for the model) beyond which new "
                            "ones are answered 503")
    serve.add_argument("--max-connections", type=positive_int, default=128,
                       help="open connections beyond which requests are answered 503")
    serve.add_argument("--max-tokens-limit", type=positive_int, default=4096,
                       help="the most max_tokens a request may ask")
    serve.add_argument("--request-timeout", type=positive_float, default=600.0,
                       help="seconds a request may take from admission to its last token")
    serve.add_argument("--media-readers", type=positive_int, default=8,
                       help="requests whose media are decoded at once, each in a worker process of its own; "
                            "others wait for a reader")
    serve.add_argument("--media-cpu-seconds", type=positive_float, default=120.0,
                       help="CPU-seconds a decoding process may spend on one media item before it is stopped (400)")
    serve.add_argument("--media-memory-mb", type=positive_int, default=1536,
                       help="memory (MiB) a decoding process may take beyond what it starts with")
    serve.add_argument("--api-key", action="append", default=[],
                       help=f"require Authorization: Bearer KEY on /v1 (repeat for several keys). Prefer "
                            f"${API_KEYS_VARIABLE} (comma-separated keys): other users see the command line in ps")
    serve.add_argument("--allowed-host", action="append", default=[],
                       help="a host name the server answers to besides the bound address and localhost (repeat)")
    serve.add_argument("--allowed-origin", action="append", default=[],
                       help="a web origin (https://app.example) whose pages may call the server, with CORS (repeat)")
    add_runtime_options(serve)
    add_cache_options(serve)
    explain = commands.add_parser("explain", help="a picture of what each reduction keeps of a video or image, "
                                                  "with its answer and figures (PNG or HTML)")
    explain.add_argument("video", help="a video, frame directory or image")
    explain.add_argument("question", help="the question to ask about it")
    explain.add_argument("--config", default="baseline,aim_default",
                         help="reductions, comma-separated (presets or budget:FRACTION): one panel each")
    explain.add_argument("--output", type=Path, required=True, help="the report: a .png or .html file")
    explain.add_argument("--layer", type=non_negative_int,
                         help="the LLM layer whose kept tokens the pictures show (default: for each reduction, the "
                              "first layer with at most half its visual tokens left, else its last pruning layer)")
    add_model_option(explain)
    explain.add_argument("--frames", type=positive_int, default=8, help="frames sampled uniformly")
    explain.add_argument("--fps", type=positive_float, help="sample at this rate instead (capped by --max-frames)")
    explain.add_argument("--max-frames", type=positive_int, help="upper bound on sampled frames")
    explain.add_argument("--backend", choices=BACKENDS, default="auto", help="video decoder")
    explain.add_argument("--max-new-tokens", type=positive_int, default=64, help="the longest answer, in tokens")
    add_runtime_options(explain)
    demo = commands.add_parser("demo", help="a web page (Gradio) to try reductions on your clips and see what they "
                                            "keep")
    add_model_option(demo)
    demo.add_argument("--media-root", type=Path,
                      help="a directory whose files (videos, images) the page may also pick; nothing outside it is "
                           "opened (uploads are always possible)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=positive_int, default=7860, help="port to listen on")
    demo.add_argument("--frames", type=positive_int, default=8, help="frames sampled per video by default")
    demo.add_argument("--max-new-tokens", type=positive_int, default=64, help="the longest answer, in tokens")
    demo.add_argument("--max-upload-mb", type=positive_float, default=200.0, help="the largest upload, in MiB")
    demo.add_argument("--max-queue", type=positive_int, default=32,
                      help="requests waiting for the model beyond which new ones are refused")
    add_runtime_options(demo)
    add_cache_options(demo)
    return parser


def expand_inputs(items: list[str]) -> list[str]:
    """Paths as given; a ``.txt`` file contributes its non-empty, non-# lines."""
    paths = []
    for item in items:
        if item.endswith(".txt") and os.path.isfile(item) and not is_image_file(item):
            lines = read_text_file(item, "video list").splitlines()
            paths += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            paths.append(item)
    if not paths:
        raise CliError("no videos given (the list files are empty)")
    return paths


def print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def check_new_tokens(max_new_tokens: int, model_config) -> None:
    if max_new_tokens >= model_config.max_length:
        raise CliError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
                       f"{model_config.max_length} tokens")


def planned_question(video: str, question: str | None, prompt: str | None) -> str:
    """The question a caption or ask item sends (images and videos have different default
    caption requests; which one is known from the path)."""
    from aim_llava.pipeline import DEFAULT_CAPTION_PROMPT, DEFAULT_IMAGE_CAPTION_PROMPT

    if question is not None:
        return question
    return prompt or (DEFAULT_IMAGE_CAPTION_PROMPT if is_image_file(video) else DEFAULT_CAPTION_PROMPT)


def caption_key(record: dict) -> tuple:
    """Resume identity of a caption/ask record: the same video and question, made with the same
    settings (:mod:`aim_llava.run_settings`)."""
    return record["video"], record.get("question"), record.get("settings_id")


def caption_record(video: str, question: str, settings: dict, result=None, error: str | None = None,
                   arch=None) -> dict:
    """The JSONL record of one caption/ask item made with ``settings`` (``result``: a pipeline
    Result of a model of config ``arch``)."""
    from aim_llava.flops import record_cost

    record = {"video": video, "question": question, "config": settings["config"], "text": None, "error": error}
    if result is None:
        return stamped(record, settings)
    if result.error is not None:
        record["error"] = error_message(result.error)
        return stamped(record, settings)
    visual, response = result.visual, result.response
    record.update(
        text=response.text,
        modality=visual.modality,
        frames=len(visual.clip.indices),
        frame_indices=visual.clip.indices,
        timestamps=visual.clip.timestamps,
        duration=round(visual.clip.duration, 3),
        visual_tokens=response.visual_tokens,
        **record_cost(arch, result),
        new_tokens=response.num_new_tokens,
        encode_seconds=round(visual.encode_seconds, 3),
        generate_seconds=round(response.seconds, 3),
    )
    return stamped(record, settings)


def report(record: dict, args, many: bool, progress=None) -> None:
    note_repeated_frames(record, progress)
    if args.json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elif record["error"] is not None:
        pass
    elif args.stream:
        print(flush=True)
    elif many:
        print(f"== {record['video']}\n{record['text']}", flush=True)
    else:
        print(record["text"], flush=True)
    if record["error"] is not None:
        print_error(f"{record['video']}: {record['error']}", progress)


def note_repeated_frames(record: dict, progress=None) -> None:
    """A note when the model saw frames repeated: a source with fewer frames than asked for (a
    frame directory of 9 images at --frames 32, a short clip) gives each of them several times,
    as the published evaluation does, at the cost of their tokens."""
    indices = record.get("frame_indices") or []
    distinct = len(set(indices))
    if distinct == 0 or distinct == len(indices):
        return
    print_line(f"aim-llava: note: {one_line(record['video'])} gave {distinct} distinct frames for the {len(indices)} "
               f"sampled, so each is seen about {len(indices) / distinct:.0f} times ({record['visual_tokens']:,} visual "
               f"tokens): --frames {distinct} shows each once", progress)


def run(args) -> int:
    from aim_llava.model.builder import checkpoint_config, model_directory
    from aim_llava.model.families import family_of
    from aim_llava.pipeline import SamplingOptions, family_sampling
    from aim_llava.reduction.budget import is_budget, resolve_reduction

    check_output_mode(args, "--output FILE")
    shard = Shard.from_environment()
    if shard.world > 1 and args.output is None:
        raise CliError("with several processes give --output FILE (each writes FILE.rankN; rank 0 merges into FILE)")
    if args.stream and args.batch_size > 1:
        raise CliError("--stream prints one reply as it is generated: use it with --batch-size 1")
    if args.stream and args.json:
        raise CliError("--stream prints the reply as text while --json prints one JSON record per video: give one "
                       "of the two")
    sources = args.videos if args.command == "caption" else [args.video]
    videos = expand_inputs(sources)
    question = check_text(args.question, "the question") if args.command == "ask" else None
    if getattr(args, "prompt", None) is not None:
        check_text(args.prompt, "--prompt")
    SamplingOptions(**{"num_frames": 32, **requested_sampling(args)})  # checked before the model is read
    generation = generation_options(args)
    model_config = checkpoint_config(args.model)
    check_new_tokens(args.max_new_tokens, model_config)
    family = family_of(model_config)
    family.check_template(args.template)
    sampling = family_sampling(family, family.image_processor(model_config, model_directory(args.model)),
                               requested_sampling(args))
    frames = sampling.frame_count()
    if frames is None and is_budget(args.config):
        rate = "--fps" if args.fps is not None else f"{family.title}'s default sampling"
        raise CliError(f"{args.config} is solved for one frame count, and sampling by rate ({rate}) gives each "
                       "video its own: give --frames N")
    reduction = resolve_reduction(args.config, model_config, frames or sampling.num_frames)
    settings = planned_settings(args, model_config, reduction, sampling, generation, args.template, args.time_aware)
    items = [(video, planned_question(video, question, getattr(args, "prompt", None))) for video in videos]
    if args.output is not None:
        resolve_output(args.output, videos + sources)
        if shard.world > 1:
            check_no_unasked_records(args.output, caption_key, args.resume, args.overwrite)
    own_output = args.output if shard.world == 1 else args.output.with_name(f"{args.output.name}.rank{shard.rank}")
    results = (ResultsFile(own_output, caption_key, args.resume, videos + sources, args.overwrite)
               if own_output else None)
    try:
        merged_before = read_records(args.output, caption_key) if args.resume and shard.world > 1 else []
        earlier = (results.records if results is not None else []) + merged_before
        done = {caption_key(r) for r in earlier if r.get("error") is None}
        todo = [item for item in shard.take(items) if (*item, settings_id(settings)) not in done]
        if len(todo) < len(shard.take(items)) and shard.rank == 0:
            print(f"aim-llava: resuming: {len(items) - len(todo)} of {len(items)} already in {args.output}",
                  file=sys.stderr)
        if shard.rank == 0:
            say_other_settings(earlier, lambda r: (r["video"], r.get("question")), todo, settings, args.output)
        device = shard.start(args.device)
        failures, out_of_memory = 0, False
        progress = None
        if len(items) > 1:
            from tqdm import tqdm

            progress = tqdm(total=len(todo), file=sys.stderr, unit="video", dynamic_ncols=True)
        try:
            for record, error in caption_records(args, todo, reduction, sampling, generation, settings, device):
                failures += record["error"] is not None
                out_of_memory |= isinstance(error, DeviceMemoryError)
                if results is not None:
                    results.append(record)
                report(record, args, len(items) > 1, progress)
                if progress is not None:
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
    finally:
        if results is not None:
            results.close()
    code = merge_caption_shards(shard, videos, args.output, failures, args.resume)
    return EXIT_SYSTEM_ERROR if out_of_memory else code


def requested_sampling(args) -> dict:
    """The sampling fields the command line sets (the model's own rule gives the others)."""
    fields = {"num_frames": args.frames, "fps": args.fps, "max_frames": args.max_frames, "start": args.start,
              "end": args.end, "backend": args.backend, "frame_rate": args.frame_rate}
    return {name: value for name, value in fields.items() if value is not None}


def generation_options(args):
    """The GenerationOptions of --max-new-tokens, --temperature, --top-p, --seed and --no-cuda-graph."""
    from aim_llava.pipeline import GenerationOptions

    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        given = "--top-p" if args.top_p is not None else "--seed"
        raise CliError(f"{given} shapes sampling, and decoding is greedy without --temperature: give --temperature "
                       "above 0 too (e.g. 0.7)")
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             cuda_graph=args.cuda_graph)


def check_output_mode(args, output: str) -> None:
    """--resume and --overwrite need an output (that they exclude each other, ResultsFile says)."""
    for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)):
        if given and args.output is None:
            raise CliError(f"{flag} needs {output}")


def planned_settings(args, model_config, reduction, sampling, generation, template: str, time_aware: bool) -> dict:
    """The settings the records of this run will carry, known before the model loads (the dtype
    ``auto`` will choose included)."""
    from aim_llava.model.builder import model_directory, resolve_device, resolve_dtype

    dtype = resolve_dtype(args.dtype, model_config, resolve_device(args.device), say=False)
    return run_settings(os.path.realpath(model_directory(args.model)), str(dtype).removeprefix("torch."), reduction,
                        sampling, generation, template, time_aware)


def say_other_settings(earlier: list[dict], identity, todo: list, settings: dict, where: Path) -> None:
    """One note when items to do (``todo``: their identities) have records in ``where`` made with
    other settings (``identity(record)``: the item a record is of): they are done again and the
    earlier records stay. Says how many, and what differs for the first."""
    current = settings_id(settings)
    other = {identity(r): r for r in earlier if r.get("settings_id") != current}
    again = [item for item in todo if item in other]
    if again:
        print(f"aim-llava: note: {len(again)} item(s) in {where} were done with other settings "
              f"({differences(other[again[0]].get('settings'), settings)}): they are done again with these, and the "
              "earlier records stay", file=sys.stderr)


def caption_records(args, todo: list[tuple[str, str]], reduction, sampling, generation, settings: dict, device):
    """The records of the (video, question) items, in order, each with the error it failed with
    (None when it was answered or failed its check). Each video is first checked for what can be
    known without decoding it (aim_llava.video.probe): those that fail are recorded as failed
    without the model, which is loaded only if some video is left; the next videos are read in
    worker threads while the model works on a batch."""
    from aim_llava.pipeline import Request, VideoLLM
    from aim_llava.video import VideoError, probe

    problems = {}
    for video, _ in todo:
        try:
            probe(video, sampling.start)
        except VideoError as err:
            problems[video] = str(err)
    readable = [(video, asked) for video, asked in todo if video not in problems]
    results = iter(())
    if readable:
        llm = VideoLLM.from_pretrained(
            args.model, reduction, device=device, dtype=args.dtype, attn_implementation=args.attn,
            conv_template=args.template, time_aware=args.time_aware, sampling=sampling, generation=generation,
            cache_mb=args.cache_mb, prefix_reuse=args.prefix_reuse,
        )
        stream = print_now if args.stream else None
        requests = [Request(video, [(asked, None)]) for video, asked in readable]
        results = llm.run(requests, args.batch_size, args.workers, stream=stream)
    for video, asked in todo:
        if video in problems:
            yield caption_record(video, asked, settings, error=problems[video]), None
        else:
            result = next(results)
            yield caption_record(video, asked, settings, result, arch=llm.model.config), result.error


def merge_caption_shards(shard, videos: list[str], output: Path | None, failures: int, resume: bool) -> int:
    """With several processes: after all are done, rank 0 writes every record to ``output`` (after
    the records it held, when resuming), this run's videos in input order. Returns the exit code
    (2 if any video failed)."""
    if shard.world == 1:
        return EXIT_BAD_INPUT if failures else 0
    shard.wait_for_all()
    if shard.rank == 0:
        records = read_records(output, caption_key) if resume else []
        for rank in range(shard.world):
            records += read_records(output.with_name(f"{output.name}.rank{rank}"), caption_key)
        order = {video: index for index, video in enumerate(videos)}
        latest = latest_by_key(records, caption_key)
        merged = sorted((r for r in latest if r["video"] in order), key=lambda r: order[r["video"]])
        write_records(output, [r for r in latest if r["video"] not in order] + merged)
        failures = sum(r.get("error") is not None for r in merged)
    shard.finish()
    return EXIT_BAD_INPUT if failures else 0


def run_flops(args) -> int:
    from aim_llava.flops import flops_report, format_report, resolve_architecture
    from aim_llava.reduction.budget import resolve_reduction

    name, arch = resolve_architecture(args.arch)
    reduction = resolve_reduction(args.config, arch, args.frames, args.text_tokens)
    report = flops_report(name, arch, reduction, args.frames, args.text_tokens, args.kv_bytes)
    print(report.to_json() if args.json else format_report(report))
    return 0


def run_presets(args) -> int:
    from aim_llava.flops import resolve_architecture
    from aim_llava.preset_report import format_list, format_preset, markdown_table, preset_report, preset_reports

    name, arch = resolve_architecture(args.arch)
    if args.name is not None:
        if args.markdown:
            raise CliError("--markdown is for the list: leave out the preset name")
        report = preset_report(args.name, name, arch, args.frames, args.text_tokens)
        print(report.to_json() if args.json else format_preset(report))
        return 0
    reports = preset_reports(name, arch, args.frames, args.text_tokens)
    if args.json:
        print("\n".join(report.to_json() for report in reports))
    else:
        print(markdown_table(reports) if args.markdown else format_list(reports))
    return 0


def run_bench(args) -> int:
    import torch

    from aim_llava.architectures import architecture
    from aim_llava.bench import markdown, plot, random_model
    from aim_llava.bench import run_bench as bench
    from aim_llava.model.builder import load_pretrained_model, resolve_device, resolve_dtype
    from aim_llava.reduction.budget import check_reduction_spec

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs:
        raise CliError(f"--configs {args.configs!r} names no config: give e.g. baseline,aim_default")
    for spec in configs:
        check_reduction_spec(spec)
    if isinstance(args.json, str):  # --json FILE, as --output FILE
        if args.output:
            raise CliError("--json FILE and --output FILE both name the JSON report's file: give --output FILE")
        args.output, args.json = args.json, False
    for path, option in ((args.output, "--output"), (args.plot, "--plot")):
        if path:
            resolve_output(path, what=option)
    if args.video and not os.path.exists(args.video):
        raise CliError(f"video not found: {args.video}")
    if args.model:
        _, model, _, _ = load_pretrained_model(args.model, device_map=args.device, torch_dtype=args.dtype,
                                               attn_implementation=args.attn)
        name = args.model
    else:
        config = architecture(args.arch)
        device = resolve_device(args.device)
        model = random_model(config, device, resolve_dtype(args.dtype, config, device), args.attn)
        name = args.arch
    from tqdm import tqdm

    with torch.no_grad(), tqdm(total=(args.repeats + 1) * len(configs), file=sys.stderr, unit="run",
                               desc="bench", dynamic_ncols=True) as progress:

        def measured(what: str) -> None:
            progress.set_postfix_str(what, refresh=False)
            progress.update(1)

        report = bench(model, name, configs, args.frames, args.text_tokens, args.decode_tokens, args.repeats,
                       args.video, args.backend, args.batch, args.cuda_graph, measured)
    print(json.dumps(report.to_dict(), indent=2) if args.json else markdown(report))
    if args.output:
        write_text_atomically(args.output, json.dumps(report.to_dict(), indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


def read_calibration_items(path: Path) -> list[dict]:
    items = []
    for number, line in enumerate(read_text_file(path, "calibration data").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = parse_json(line)
        except ValueError as err:
            raise CliError(f"{path} line {number} is not JSON ({err})") from None
        if not isinstance(item, dict) or not (item.get("video") or item.get("image")) or not item.get("question"):
            raise CliError(f'{path} line {number} needs "video" (or "image") and "question"')
        items.append(item)
    if not items:
        raise CliError(f"{path} holds no calibration items")
    return items


def run_fitprune_calibrate(args) -> int:
    from aim_llava.mm_utils import tokenizer_image_token
    from aim_llava.pipeline import SamplingOptions, VideoLLM
    from aim_llava.reduction.methods.fitprune import (
        Calibration,
        collect_statistics,
        fit_recipe,
    )

    items = read_calibration_items(args.data)
    resolve_output(args.out, [args.data], what="--out")
    if len(items) < 5:
        print(f"aim-llava: note: {len(items)} calibration items; FitPrune is meant for 5 to 100", file=sys.stderr)
    llm = VideoLLM.from_pretrained(args.model, "baseline", device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn, sampling=SamplingOptions(num_frames=args.frames))
    calibration = Calibration()
    for item in items:
        source = item.get("video") or item.get("image")
        try:
            visual = llm.encode(source)
        except AimLlavaError as err:
            print_error(f"{source}: {err} (skipped)")
            continue
        prompt = llm.prompt(visual, [(item["question"], None)])
        ids = tokenizer_image_token(prompt, llm.tokenizer, return_tensors="pt")[None]
        inputs = llm.model.prepare_multimodal_inputs(ids, visual_features=[visual.features])
        calibration.samples.append(collect_statistics(llm.model, inputs))
        calibration.visual_tokens.append(int(inputs.visual.sum()))
        calibration.text_tokens.append(int((inputs.valid & ~inputs.visual).sum()))
    if not calibration.samples:
        raise CliError("no calibration item could be read")
    recipe = fit_recipe(calibration, llm.model.config.text, args.budget)
    write_text_atomically(args.out, json.dumps(recipe.__dict__, indent=2))
    print(f"wrote {args.out}: drops {sum(recipe.drop):.0f} of {recipe.visual_tokens:.0f} visual tokens "
          f"(alpha {recipe.alpha:.3f}, {len(calibration.samples)} samples); use --config fitprune:{args.out}")
    return 0


def run_eval(args) -> int:
    from aim_llava import evaluation
    from aim_llava.conversation import build_prompt
    from aim_llava.mm_utils import tokenizer_image_token
    from aim_llava.model.builder import checkpoint_config, load_tokenizer, model_directory
    from aim_llava.model.families import family_of
    from aim_llava.pipeline import family_sampling
    from aim_llava.reduction.budget import resolve_reduction

    check_output_mode(args, "--output DIR")
    items = evaluation.read_items(args.data)
    specs = [c.strip() for c in (args.configs or args.config).split(",") if c.strip()]
    if not specs:
        raise CliError("no config given: use --config NAME or --configs A,B")
    check_output_dir(args.output)
    model_config = checkpoint_config(args.model)
    check_new_tokens(args.max_new_tokens, model_config)
    prompt = build_prompt(items[0].prompt(), "qwen_1_5")
    text_tokens = len(tokenizer_image_token(prompt, load_tokenizer(model_directory(args.model)))) - 1  # FLOPs column
    family = family_of(model_config)
    sampling = family_sampling(family, family.image_processor(model_config, model_directory(args.model)),
                               {"num_frames": args.frames})
    reductions = [resolve_reduction(spec, model_config, sampling.frame_count(), text_tokens) for spec in specs]
    stems = distinct_results_stems(specs, reductions)
    generation = generation_options(args)
    settings = [planned_settings(args, model_config, r, sampling, generation, "qwen_1_5", False) for r in reductions]
    shard = Shard.from_environment()
    if shard.world > 1:
        for stem in stems:
            check_no_unasked_records(args.output / f"{stem}.jsonl", evaluation.item_key, args.resume, args.overwrite)
    args.output.mkdir(parents=True, exist_ok=True)
    inputs = [args.data] + [item.video for item in items]
    results = []
    try:
        for stem in stems:
            results.append(ResultsFile(evaluation.records_path(args.output, stem, shard), evaluation.item_key,
                                       args.resume, inputs, args.overwrite))
        if shard.rank == 0:
            for file, config_settings in zip(results, settings):
                say_other_settings(file.records, lambda r: evaluation.item_key(r)[:-1],
                                   [item.key(config_settings)[:-1] for item in items], config_settings, file.shown)
        configs = list(zip(specs, reductions, stems, settings))
        rows, failures, out_of_memory = evaluate_configs(args, items, shard, configs, results, model_config,
                                                         text_tokens, sampling, generation)
    finally:
        for file in results:
            file.close()
    if shard.rank != 0:
        return 0
    print(evaluation.comparison_table(rows))
    write_text_atomically(args.output / "summary.json", json.dumps(rows, indent=2))
    if args.plot:
        evaluation.plot_accuracy_vs_flops(rows, args.plot)
    if failures:
        print(f"aim-llava: error: {failures} item(s) could not be answered (their records hold the reason)",
              file=sys.stderr)
    return EXIT_SYSTEM_ERROR if out_of_memory else EXIT_BAD_INPUT if failures else 0


def distinct_results_stems(specs: list[str], reductions: list) -> list[str]:
    """Each config's results file name (:func:`aim_llava.evaluation.results_stem`); two configs
    that would share one are the same reduction given twice, which is refused."""
    from aim_llava.evaluation import results_stem

    stems: dict[str, str] = {}
    for spec, reduction in zip(specs, reductions):
        stem = results_stem(spec, reduction)
        if stem in stems:
            raise CliError(f"--configs gives {stems[stem]} and {spec}, the same reduction (name {reduction.name!r}, "
                           "same settings): give it once")
        stems[stem] = spec
    return list(stems)


def evaluate_configs(args, items, shard, configs, results, model_config, text_tokens, sampling,
                     generation) -> tuple[list[dict], int, bool]:
    """Run every config (``configs``: (spec, reduction, results stem, settings) each) over this
    process's share; rank 0 returns the summary rows and the count of failed items; every rank
    whether an item of its share ran out of device memory."""
    from aim_llava import evaluation
    from aim_llava.flops import flops_report
    from aim_llava.pipeline import VideoLLM

    device = shard.start(args.device)
    llm = VideoLLM.from_pretrained(args.model, "baseline", device=device, dtype=args.dtype,
                                   attn_implementation=args.attn, sampling=sampling, generation=generation,
                                   cache_mb=args.cache_mb, prefix_reuse=args.prefix_reuse)
    rows, failures, out_of_memory = [], 0, []
    for (spec, reduction, stem, settings), file in zip(configs, results):
        label = spec if stem != evaluation.safe_name(reduction.name) else reduction.name
        progress = None
        if shard.rank == 0:
            from tqdm import tqdm

            todo = len(evaluation.todo_items(items, shard, file, settings))
            progress = tqdm(total=todo, file=sys.stderr, unit="item", desc=label)

        def report(record, error, progress=progress):
            out_of_memory.append(isinstance(error, DeviceMemoryError))
            print_error(f"item {record['id']} ({record['video']}): {record['error']}", progress)

        before = llm.cache.snapshot() if llm.cache is not None else None
        try:
            records = evaluation.run_config(llm, items, shard, file, reduction, settings, progress, report,
                                            args.batch_size, args.workers)
        finally:
            if progress is not None:
                progress.close()
        cache = llm.cache.snapshot().since(before).as_dict() if before is not None else None
        if shard.world > 1:
            file.close()
            shard.wait_for_all()
            if shard.rank != 0:
                continue
            records = evaluation.merge_shards(items, args.output, stem, shard.world, settings, args.resume)
        summary = evaluation.summarize(records)
        failures += summary["errors"]
        cost = flops_report("", model_config, reduction, sampling.frame_count(), text_tokens)
        rows.append({"config": label, "records": f"{stem}.jsonl", "prefill_tflops": cost.prefill_tflops, **summary,
                     "cache": cache})
    shard.finish()
    return rows, failures, any(out_of_memory)


def check_output_dir(path: Path) -> None:
    """An output directory that can be created and written, checked before any work."""
    existing = path
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as err:  # a name too long for the file system, a parent that cannot be searched
        raise CliError(f"--output {path} cannot be created ({err.strerror}): give another directory") from None
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise CliError(f"--output {path} {what}: give a directory")
    try:
        check_writable(existing)
    except OSError as err:
        raise CliError(f"--output {path} cannot be written ({(err.strerror or str(err)).lower()}): "
                       "give a writable directory") from None


def api_keys(given: list[str]) -> list[str]:
    """The server's API keys: ``--api-key`` values and those of ``$AIM_LLAVA_API_KEY``
    (comma-separated); each printable ASCII without spaces, as an HTTP header carries it."""
    keys = list(given) + [key.strip() for key in os.environ.get(API_KEYS_VARIABLE, "").split(",") if key.strip()]
    for key in keys:
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            raise CliError(f"an API key must be printable ASCII without spaces (--api-key or ${API_KEYS_VARIABLE})")
    return keys


def serve_model(args) -> str:
    """The model ``serve`` serves: MODEL or --model (once), else $AIM_LLAVA_MODEL or the default."""
    if args.model_argument and args.model and args.model_argument != args.model:
        raise CliError(f"two models given, {args.model_argument} and --model {args.model}: give one")
    return args.model_argument or args.model or os.environ.get("AIM_LLAVA_MODEL", DEFAULT_MODEL_DIR)


def server_limits(args) -> ServerLimits:
    """The server's limits, with what ``serve``'s flags change."""
    from aim_llava.server.limits import ServerLimits

    return ServerLimits(max_tokens_limit=args.max_tokens_limit, request_timeout_s=args.request_timeout,
                        media_readers=args.media_readers, media_cpu_s=args.media_cpu_seconds,
                        media_memory_bytes=args.media_memory_mb * 2**20)


def run_serve(args) -> int:
    import torch

    from aim_llava.model.builder import checkpoint_config
    from aim_llava.reduction.budget import resolve_reduction

    if not os.path.isdir(args.media_root):
        raise CliError(f"--media-root {args.media_root} is not a directory")
    if args.port > 65535:
        raise CliError(f"--port {args.port} is not a port number (1..65535)")
    if not hasattr(os, "O_PATH"):
        raise CliError("aim-llava serve needs Linux (it opens media through O_PATH handles)")
    args.model = serve_model(args)
    keys = api_keys(args.api_key)
    if args.api_key:
        print(f"aim-llava: warning: a key given with --api-key is visible to every user of this machine (ps, "
              f"/proc): set ${API_KEYS_VARIABLE} instead", file=sys.stderr, flush=True)
    model_config = checkpoint_config(args.model)
    check_new_tokens(args.max_new_tokens, model_config)
    if args.max_new_tokens > args.max_tokens_limit:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} is above --max-tokens-limit {args.max_tokens_limit}")
    resolve_reduction(args.config, model_config, args.frames)
    try:
        import uvicorn

        from aim_llava.server.batching import warm_up
        from aim_llava.server.http import LOCAL_HOSTS, AccessPolicy, create_app, server_config
        from aim_llava.server.service import Service
    except ImportError:
        raise CliError("aim-llava serve needs FastAPI and uvicorn: pip install 'aim-llava[serve]'") from None
    from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM

    llm = VideoLLM.from_pretrained(args.model, args.config, device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn, sampling=SamplingOptions(num_frames=args.frames),
                                   generation=GenerationOptions(max_new_tokens=args.max_new_tokens,
                                                                cuda_graph=args.cuda_graph),
                                   cache_mb=args.cache_mb, prefix_reuse=args.prefix_reuse)
    if args.warm_up:
        try:
            seconds = warm_up(llm, args.frames)
        except AimLlavaError as err:
            raise CliError(f"the warm-up request ({args.frames} frames) failed: {err}") from None
        except torch.OutOfMemoryError:
            raise CliError(f"the warm-up request ({args.frames} frames) ran out of device memory: serve fewer "
                           "--frames (or use --no-warm-up to find out with the first request)") from None
        except Exception as err:  # a kernel that cannot compile on this machine, ...: one line, not a traceback
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CliError(f"the warm-up request failed on {llm.model.device}: {type(err).__name__}: {first_line} "
                           "(--no-warm-up starts the server without it)") from None
        print(f"aim-llava: warmed up in {seconds:.1f} s", file=sys.stderr, flush=True)
    name = args.served_model_name or Path(args.model).resolve().name
    limits = server_limits(args)
    service = Service(llm, args.media_root.absolute(), name, args.max_batch_size, args.max_wait_ms, args.max_pending,
                      limits)
    policy = AccessPolicy.for_address(args.host, keys, args.allowed_host, args.allowed_origin)
    print(f"aim-llava: serving {name} on http://{args.host}:{args.port}/v1 (media root {args.media_root}; "
          f"{'API keys required' if keys else 'no API key'})", file=sys.stderr, flush=True)
    if not keys and args.host not in LOCAL_HOSTS:
        print(f"aim-llava: warning: {args.host} is reachable from other machines and no --api-key is set: anyone who "
              "can reach the port can use the model", file=sys.stderr, flush=True)
    restored = args.native_stderr.restored() if args.native_stderr is not None else contextlib.nullcontext()
    cache_log = logging.getLogger("aim_llava.cache")
    if llm.cache is not None:
        cache_log.setLevel(logging.INFO)  # its hits and misses, in the server's log (for this command only)
    try:
        with restored:
            uvicorn.Server(server_config(create_app(service, policy), args.host, args.port,
                                         args.max_connections)).run()
    finally:
        service.close()
        cache_log.setLevel(logging.NOTSET)
    return 0


def report_path(output: Path, source: str) -> Path:
    """``explain``'s --output: a .png or .html file in a writable directory, not its input."""
    from aim_llava.explain import REPORT_SUFFIXES

    if output.suffix.lower() not in REPORT_SUFFIXES:
        raise CliError(f"--output {output} must end in {' or '.join(REPORT_SUFFIXES)} (the report's format)")
    if output.is_dir():
        raise CliError(f"--output {output} is a directory: give a file name ending in .png or .html")
    if os.path.exists(source) and output.exists() and os.path.samefile(output, source):
        raise CliError(f"--output {output} is the input itself: give another file name")
    check_output_dir(output.parent)
    return output


def run_explain(args) -> int:
    import importlib.util

    from aim_llava.explain import explain, random_weights_notice, read_clip, write_report
    from aim_llava.model.builder import checkpoint_config
    from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM
    from aim_llava.reduction.budget import resolve_reduction

    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("aim-llava explain draws its report with matplotlib: pip install 'aim-llava[plot]'")
    output = report_path(args.output, args.video)
    question = check_text(args.question, "the question")
    specs = [spec.strip() for spec in args.config.split(",") if spec.strip()]
    if not specs:
        raise CliError("--config names no reduction: give one or more, comma-separated (e.g. baseline,aim_default)")
    if not os.path.exists(args.video):
        raise CliError(f"{args.video} does not exist: give a video, frame directory or image")
    sampling = SamplingOptions(args.frames, args.fps, args.max_frames, backend=args.backend)
    model_config = checkpoint_config(args.model)
    check_new_tokens(args.max_new_tokens, model_config)
    if args.layer is not None and args.layer > model_config.text.num_hidden_layers:
        raise CliError(f"--layer {args.layer} is beyond the model's {model_config.text.num_hidden_layers} layers")
    configs = [resolve_reduction(spec, model_config, sampling.max_frames or sampling.num_frames) for spec in specs]
    llm = VideoLLM.from_pretrained(args.model, configs[0], device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn, sampling=sampling,
                                   generation=GenerationOptions(max_new_tokens=args.max_new_tokens,
                                                                cuda_graph=args.cuda_graph))
    clip, read_seconds = read_clip(llm, args.video, configs)
    runs = [explain(llm, clip, question, config, read_seconds) for config in configs]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_report(runs, question, output, args.layer, random_weights_notice(llm))
    for run in runs:
        print(f"{run.config}: {run.answer}", flush=True)
    print(f"aim-llava: wrote {output}", file=sys.stderr, flush=True)
    return 0


def run_demo(args) -> int:
    import importlib.util

    from aim_llava.model.builder import checkpoint_config

    if importlib.util.find_spec("gradio") is None:
        raise CliError("aim-llava demo needs Gradio: pip install 'aim-llava[demo]'")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise CliError(f"--media-root {args.media_root} is not a directory")
    if args.port > 65535:
        raise CliError(f"--port {args.port} is not a port number (1..65535)")
    check_new_tokens(args.max_new_tokens, checkpoint_config(args.model))
    from aim_llava.demo import serve_demo

    return serve_demo(args)


COMMANDS = {
    "caption": run, "ask": run, "flops": run_flops, "presets": run_presets, "bench": run_bench, "fitprune-calibrate": run_fitprune_calibrate,
    "eval": run_eval, "serve": run_serve, "explain": run_explain, "demo": run_demo,
}


class NativeStderr:
    """Messages written to the process's stderr from C (decoder libraries, in any thread) go
    nowhere while this context is entered, so an error stays the one line we print; Python's
    ``sys.stderr`` (our messages, progress, warnings, logging) is moved to a copy of the real
    stream first, or left alone when something else already captures it. A long-running command
    (the server) gives the real stream back for its lifetime with :meth:`restored`: an operator
    must see what native code says there (a CUDA error, a crash)."""

    def __enter__(self) -> NativeStderr:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.python_stderr = sys.stderr
        if sys.stderr is sys.__stderr__:
            sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding=self.python_stderr.encoding,  # noqa: SIM115
                              errors=self.python_stderr.errors)
        self.silence()
        return self

    @staticmethod
    def silence() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    @contextlib.contextmanager
    def restored(self):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            self.silence()

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if sys.stderr is not self.python_stderr:
            sys.stderr.close()
            sys.stderr = self.python_stderr


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with NativeStderr() as native_stderr:
        logging.basicConfig(level=logging.WARNING, format="aim-llava: %(message)s", stream=sys.stderr, force=True)
        logging.getLogger("aim_llava.capabilities").setLevel(logging.INFO)  # the device's defaults, said once
        return run_command(argv, native_stderr)


def print_error(message: str, progress=None) -> None:
    """One ``aim-llava: error:`` line on stderr, kept apart from a progress bar when one is shown;
    names and fields echoed into the message cannot break it over lines."""
    print_line(f"aim-llava: error: {one_line(message)}", progress)


def print_line(line: str, progress=None) -> None:
    """A line on stderr, kept apart from a progress bar when one is shown."""
    if progress is not None:
        progress.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def run_command(argv: list[str] | None, native_stderr: NativeStderr | None = None) -> int:
    """Parse and run one command; the package's errors become one line and exit code 2, those of
    the operating system or the device (out of its memory) one line and exit code 1."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.native_stderr = native_stderr
        return COMMANDS[args.command](args)
    except DeviceMemoryError as err:
        print_error(str(err))
        return EXIT_SYSTEM_ERROR
    except AimLlavaError as err:
        print_error(str(err))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\naim-llava: interrupted{resume_note(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed by the reader (``| head``): records already written to --output stay;
        # stop quietly, as command-line tools do, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:  # what was checked up front cannot cover a disk that fills up mid-run
        where = f": {err.filename}" if err.filename else ""
        print_error(f"{err.strerror or err}{where}{resume_note(args)}")
        return EXIT_SYSTEM_ERROR


def resume_note(args) -> str:
    """What an interrupted run keeps, said for a command writing its records to a results file
    (caption, ask and eval with --output): nothing for the others."""
    if getattr(args, "output", None) is None or not hasattr(args, "resume"):
        return ""
    return " (what was finished is saved; --resume goes on from there)"


if __name__ == "__main__":
    sys.exit(main())
