"""An OpenAI-compatible HTTP server (``aim-llava serve``): a thin layer over :class:`VideoLLM`.

    aim-llava serve --model DIR --media-root /data/videos [--config aim_default] [--port 8000]

``POST /v1/chat/completions`` takes OpenAI chat messages whose content parts are ``text``,
``image_url`` and ``video_url``. Media are files under ``--media-root`` (``file://`` URLs or paths,
relative to the root or absolute inside it; nothing outside the root is ever opened), or images
as ``data:`` URLs; http(s) URLs are refused (the server is offline). Several images in one request
are taken as the frames of one video (what OpenAI-style clients send for videos). Options:
``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``,
``stream`` (server-sent events in OpenAI's chunk format, with ``stream_options.include_usage``),
and the extras ``frames``, ``fps``, ``max_frames`` and ``config`` (a preset name or
``budget:X``). ``GET /v1/models`` and ``GET /health`` complete the API.

Every request field is treated as hostile: it is checked before anything is read or computed,
and a bad request gets a 4xx with an OpenAI-style error body. Frames are read in threads off the
event loop; one model thread takes the requests that arrived together (up to
``--max-batch-size``, waiting at most ``--max-wait-ms`` for more) and generates the greedy ones in
one batch (sampled ones alone, so that a seed reproduces); beyond ``--max-pending`` requests in
progress, new ones are answered 503. A client that goes away affects nobody else: its reply is
ended at the model's next decoding step. An unexpected failure is logged and answered 500, and
the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from aim_llava.errors import AimLlavaError, one_line
from aim_llava.pipeline import EncodedVisual, Request, Result, VideoLLM
from aim_llava.reduction.budget import parse_budget
from aim_llava.reduction.config import available_presets
from aim_llava.sample_media import random_frames
from aim_llava.text_files import parse_json
from aim_llava.video import MAX_FRAMES, VideoClip, VideoError, open_image_rgb

logger = logging.getLogger("aim_llava.serve")

MAX_BODY_BYTES = 64 * 2**20
MAX_DATA_URL_BYTES = 32 * 2**20
MAX_REQUEST_PIXELS = 2**27  # decoded image pixels per request (~400 MB as RGB): 64 frames of 1080p
MAX_CACHED_CONFIGS = 256
# characters of text per request: far beyond any context (32k tokens are ~130k characters), but
# a bound on the tokenizer's time in the model thread (a 60 MB text takes it minutes)
MAX_TEXT_CHARS = 2**20
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "user", "assistant")
# OpenAI fields this server does not implement, with the values that leave a reply as it would be
# without them: any other value is refused rather than silently ignored (other unknown fields,
# such as user or metadata, change nothing and are ignored)
NEUTRAL_VALUES = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        message = one_line(message)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------- request fields


def integer(body: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be a whole number", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must lie in [{low}, {high}], got {value}", name)
    return value


def number(body: dict, name: str, low: float, high: float, default: float | None = None,
           low_open: bool = False) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad(f"'{name}' must lie in {interval}, got {value}", name)
    return float(value)


def flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"'{param or name}' must be true or false", param or name)
    return value


def stop_sequences(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if (not isinstance(values, list) or len(values) > MAX_STOP_SEQUENCES
            or not all(isinstance(v, str) and v for v in values)):
        raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them", "stop")
    return values


def resolve_media_path(url: str, media_root: Path, param: str) -> Path:
    """A media reference (``file://`` URL or path) as a file inside the media root, or an error.

    The path is resolved with symbolic links followed before the check, so neither ``..`` nor a
    link can lead outside the root."""
    if "\x00" in url:
        raise bad("a media path must not contain NUL characters", param)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise bad("remote media URLs are not fetched (the server is offline): give a file:// URL or a path under "
                  "the server's media root", param, "remote_media")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise bad("file:// URLs must name a local path", param)
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise bad(f"unsupported media URL scheme {parsed.scheme!r}: use file:// URLs or paths", param)
    else:
        path = Path(url)
    root = media_root.resolve()
    try:
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise ApiError(403, "media outside the server's media root are not served", param, "outside_media_root")
        is_file = resolved.is_file()
    except (OSError, ValueError, RuntimeError) as err:  # too long, not encodable, a link loop
        raise bad(f"the media path cannot be used on this server ({getattr(err, 'strerror', None) or err})",
                  param) from None
    if not is_file:
        raise ApiError(404, f"media file not found under the media root: {url}", param, "media_not_found")
    return resolved


def check_data_url(url: str, param: str) -> str:
    """A ``data:image/...;base64,...`` URL of acceptable size (decoded later, off the event loop)."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise bad("data: URLs must be base64 images (data:image/...;base64,...)", param)
    if len(payload) > MAX_DATA_URL_BYTES * 4 // 3 + 4:
        raise ApiError(413, f"an inline image may hold at most {MAX_DATA_URL_BYTES >> 20} MiB", param, "too_large")
    return url


def data_url_image(url: str, max_pixels: int) -> Image.Image:
    try:
        raw = base64.b64decode(url.partition(",")[2], validate=True)
    except (binascii.Error, ValueError):
        raise VideoError("an inline image is not valid base64") from None
    return open_image_rgb(io.BytesIO(raw), "an inline image", max_pixels)


@dataclass
class Media:
    """What a request shows: one video file, one image, or several images taken as frames."""

    video: Path | None = None
    images: list = field(default_factory=list)  # a Path under the media root, or a data: URL
    references: dict[str, str] = field(default_factory=dict)  # resolved path -> the client's reference

    def file(self, url: str, media_root: Path, param: str) -> Path:
        """The file a reference names under the media root (remembered for error messages)."""
        path = resolve_media_path(url, media_root, param)
        self.references[str(path)] = url
        return path

    def in_client_terms(self, message: str) -> str:
        """An error message with the server's paths replaced by the client's own references, so
        that errors do not reveal where the media root lies."""
        for path, url in self.references.items():
            message = message.replace(path, url)
        return message


def part_url(part: dict, kind: str, param: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"a {kind} part needs a url", param)
    return url


def parse_messages(messages, media_root: Path) -> tuple[list[tuple[str, str | None]], Media, str | None]:
    """(turns [(user text, assistant text or None)], media, system prompt) of the messages."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    media, system, texts = Media(), None, []
    for number, message in enumerate(messages):
        param = f"messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"{param} must be an object with a role in {', '.join(ROLES)}", param)
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise bad(f"{param}.content must be a string or a list of content parts", param)
        text = []
        for index, part in enumerate(parts):
            where = f"{param}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.text must be a string", where)
                text.append(part["text"])
            elif kind in ("image_url", "video_url"):
                if role != "user":
                    raise bad(f"{where}: images and videos belong in user messages", where)
                if kind == "video_url":
                    if media.video is not None or media.images:
                        raise bad("a request may show one video (or one image, or the frames of one video)", where)
                    media.video = media.file(part_url(part, kind, where), media_root, where)
                else:
                    if media.video is not None:
                        raise bad("a request may show one video (or one image, or the frames of one video)", where)
                    url = part_url(part, kind, where)
                    media.images.append(check_data_url(url, where) if url.startswith("data:")
                                        else media.file(url, media_root, where))
            else:
                raise bad(f"{where}: unknown content type {kind!r} (use text, image_url or video_url)", where,
                          "unknown_content_type")
        if role == "system":
            if number != 0:
                raise bad("a system message may only come first", param)
            system = "\n".join(text)
        else:
            texts.append((role, "\n".join(text)))
    if media.video is None and not media.images:
        raise bad("the request shows no video or image: add a video_url or image_url part", "messages")
    characters = sum(len(text) for _, text in texts) + len(system or "")
    if characters > MAX_TEXT_CHARS:
        raise ApiError(413, f"the messages hold {characters:,} characters of text; the server takes at most "
                       f"{MAX_TEXT_CHARS:,}", "messages", "too_large")
    turns = []
    for position, (role, text) in enumerate(texts):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise bad("after an optional system message, user and assistant messages must alternate, starting and "
                      "ending with a user message", "messages")
        if role == "user":
            turns.append((text, None))
        else:
            turns[-1] = (turns[-1][0], text)
    if texts[-1][0] != "user":
        raise bad("the last message must come from the user", "messages")
    return turns, media, system


# ---------------------------------------------------------------------------- jobs and the model thread


@dataclass
class Job:
    """One chat completion on its way through the server."""

    turns: list[tuple[str, str | None]]
    system: str | None
    media: Media
    config: object
    sampling: dict
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    clip: VideoClip | EncodedVisual | None = None
    done: asyncio.Future | None = None
    pieces: asyncio.Queue | None = None
    answered: Callable[[], None] = lambda: None  # called on the event loop once the model has answered
    abandoned: bool = False  # the client went away: the model ends this reply at its next step

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple:
        """Jobs that may share one generate call: greedy ones with the same reduction (a sampled
        job runs alone, so that its seed reproduces)."""
        return (self.config, True) if self.greedy else (self.config, id(self))

    def generation(self) -> dict:
        if self.greedy:
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


WARM_UP_QUESTION = "Describe the video."


def warm_up(llm: VideoLLM, frames: int) -> float:
    """Answer one synthetic request (``frames`` random 640x360 frames, the default reduction, a few
    graph-replayed tokens) and run the PageRank importance once at the model's head shapes (which
    requests with a pruning config need) before the server takes requests, so that the first
    client does not pay for compiling GPU kernels, setting up cuBLAS and the allocator's first
    blocks. Returns the seconds it took; a failure raises (the server would fail alike)."""
    import torch

    from aim_llava.model.language_model.generation import MIN_GRAPHED_TOKENS
    from aim_llava.reduction.importance import log_importance

    clip = VideoClip(random_frames(frames), list(range(frames)), [index / 30 for index in range(frames)], frames / 30, 30.0,
                     "warm-up")
    started = time.perf_counter()
    llm.ask(clip, WARM_UP_QUESTION, max_new_tokens=MIN_GRAPHED_TOKENS + 1)
    text, device, dtype = llm.model.config.text, llm.model.device, llm.model.dtype
    head_dim, tokens = text.head_dim, 64
    with torch.no_grad():
        q = torch.randn(1, text.num_attention_heads, tokens, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, text.num_key_value_heads, tokens, head_dim, device=device, dtype=dtype)
        log_importance(q, k, torch.ones(1, tokens, dtype=torch.bool, device=device),
                       torch.zeros(1, tokens, device=device), head_dim**-0.5)
    return time.perf_counter() - started


class ModelThread:
    """Runs the model for every job: takes what arrived together as one batch."""

    def __init__(self, llm: VideoLLM, max_batch_size: int, max_wait_ms: float):
        self.llm, self.max_batch_size, self.max_wait = llm, max_batch_size, max_wait_ms / 1000.0
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self.loop, name="aim-llava-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, deadline = [job], time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    waiting = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if waiting is None:
                    self.jobs.put(None)
                    break
                batch.append(waiting)
            groups: dict[tuple, list[Job]] = {}
            for waiting in batch:
                groups.setdefault(waiting.batch_key(), []).append(waiting)
            for group in groups.values():
                self.answer(group)

    def answer(self, group: list[Job]) -> None:
        try:
            items = []
            for job in group:
                stream = self.streamer(job) if job.stream else None
                items.append((Request(job.clip, job.turns, stream, job.max_tokens, job.system,
                                      cancelled=lambda job=job: job.abandoned), job.clip))
            generation = dict(group[0].generation(), max_new_tokens=max(job.max_tokens for job in group))
            results = self.llm.answer_batch(items, group[0].config, generation)
        except Exception as err:  # the model thread must survive anything
            logger.exception("a batch failed")
            results = [Result(Request(job.clip), error=err) for job in group]
        for job, result in zip(group, results):
            job.loop.call_soon_threadsafe(finish, job, result)

    @staticmethod
    def streamer(job: Job):
        def piece(text: str) -> None:
            job.loop.call_soon_threadsafe(job.pieces.put_nowait, text)

        return piece


def finish(job: Job, result: Result) -> None:
    job.answered()
    if not job.done.done():
        job.done.set_result(result)
    if job.pieces is not None:
        job.pieces.put_nowait(None)


# ---------------------------------------------------------------------------- the service


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the earliest stop sequence, and whether one was found."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Service:
    """Request parsing, validation and replies; the HTTP layer only routes to it."""

    def __init__(self, llm: VideoLLM, media_root: Path, model_name: str, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_pending: int = 32):
        self.llm, self.media_root, self.model_name = llm, media_root, model_name
        self.max_pending, self.pending = max_pending, 0
        self.worker = ModelThread(llm, max_batch_size, max_wait_ms)
        self.presets = set(available_presets())
        self.created = int(time.time())
        # every spelling of a budget is a new key: the cache of resolved configs stays bounded
        self.resolve_config = functools.lru_cache(maxsize=MAX_CACHED_CONFIGS)(self._resolve_config)

    def reduction(self, spec) -> object:
        """The reduction config a request's ``config`` names (the server's default when absent)."""
        if spec is None:
            return self.llm.reduction
        if not isinstance(spec, str) or not spec:
            raise bad("'config' must be a preset name or budget:FRACTION", "config")
        return self.resolve_config(spec)

    def _resolve_config(self, spec: str) -> object:
        if spec.strip().lower().startswith("budget:"):
            try:
                parse_budget(spec)
            except AimLlavaError as err:
                raise bad(str(err), "config") from None
        elif spec not in self.presets:
            raise bad(f"unknown config {spec!r}: use one of {', '.join(sorted(self.presets))} or budget:FRACTION",
                      "config")
        try:
            return self.llm.resolve(spec)
        except AimLlavaError as err:
            raise bad(str(err), "config") from None

    def parse(self, body, loop: asyncio.AbstractEventLoop) -> Job:
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here (this server serves {self.model_name!r})",
                           "model", "model_not_found")
        if integer(body, "n", 1, 1, 1) != 1:
            raise bad("only n=1 is supported", "n")
        for name, neutral in NEUTRAL_VALUES.items():
            value = body.get(name)
            if not any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral):
                raise bad(f"'{name}' is not supported by this server (leave it out)", name, "unsupported_parameter")
        turns, media, system = parse_messages(body.get("messages"), self.media_root)
        context = self.llm.model.config.max_length
        max_tokens = integer(body, "max_completion_tokens", 1, context)
        max_tokens = integer(body, "max_tokens", 1, context, max_tokens or self.llm.generation.max_new_tokens)
        config = self.reduction(body.get("config"))
        sampling = {}
        frames = integer(body, "frames", 1, MAX_FRAMES)
        if frames is not None:
            sampling["num_frames"] = frames
        fps = number(body, "fps", 0.0, 1000.0, low_open=True)
        if fps is not None:
            sampling["fps"] = fps
        max_frames = integer(body, "max_frames", 1, MAX_FRAMES)
        if max_frames is not None:
            sampling["max_frames"] = max_frames
        if len(media.images) > 1 and len(media.images) > (limit := self.llm.frame_limit(config)):
            raise bad(f"{len(media.images)} images as frames but at most {limit} fit in the model's context",
                      "messages")
        stream = flag(body, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        return Job(
            turns=turns, system=system, media=media, config=config, sampling=sampling, max_tokens=max_tokens,
            temperature=number(body, "temperature", 0.0, 2.0, 0.0), top_p=number(body, "top_p", 0.0, 1.0, None, True),
            seed=integer(body, "seed", -(2**63), 2**63 - 1), stop=stop_sequences(body), stream=stream,
            include_usage=flag(options, "include_usage", "stream_options.include_usage"), loop=loop,
        )

    def read_media(self, job: Job) -> VideoClip | EncodedVisual:
        """The job's frames, or its encoded video when the model's reuse cache holds it (runs in a
        worker thread, off the event loop)."""
        media = job.media
        try:
            if media.video is not None:
                return self.llm.read(media.video, job.config, **job.sampling)
            images, pixels_left = [], MAX_REQUEST_PIXELS
            for image in media.images:
                images.append(open_image_rgb(image, max_pixels=pixels_left) if isinstance(image, Path)
                              else data_url_image(image, pixels_left))
                pixels_left -= images[-1].width * images[-1].height
            if len(images) == 1:
                frame = np.asarray(images[0])
                return VideoClip(frame[None], [0], [0.0], 0.0, 0.0, "image", is_image=True)
            size = images[0].size
            frames = np.stack([np.asarray(image if image.size == size else image.resize(size, Image.BILINEAR))
                               for image in images])
            return VideoClip(frames, list(range(len(images))), [float(i) for i in range(len(images))],
                             float(len(images)), 1.0, "frames")
        except AimLlavaError as err:
            raise bad(media.in_client_terms(str(err)), "messages", "unreadable_media") from None

    def admit(self, job: Job) -> None:
        """Count the job in, or refuse it while ``max_pending`` requests hold frames or wait for the
        model: a flood of requests must not pile up decoded frames without bound. A job counts
        until the model has answered it, even if its client has gone."""
        if self.pending >= self.max_pending:
            raise ApiError(503, f"the server is busy ({self.pending} requests in progress): retry shortly",
                           code="server_busy", headers={"Retry-After": "1"})
        self.pending += 1
        job.answered = self.release

    def release(self) -> None:
        self.pending -= 1

    async def complete(self, body, disconnected: Callable[[], Awaitable[None]] | None = None
                       ) -> dict | AsyncIterator[str]:
        """The reply to a request body: a completion, or the events of a streamed one.
        ``disconnected()`` returns once the client has gone (a streamed reply learns it from its
        events no longer being taken); either way the model stops working on the reply."""
        loop = asyncio.get_running_loop()
        job = self.parse(body, loop)
        self.admit(job)
        try:
            job.clip = await asyncio.to_thread(self.read_media, job)
        except BaseException:
            job.answered()
            raise
        job.done = loop.create_future()
        job.pieces = asyncio.Queue() if job.stream else None
        self.worker.submit(job)
        if job.stream:
            return self.stream(job)
        return self.reply(job, await self.answer(job, disconnected))

    @staticmethod
    async def answer(job: Job, disconnected: Callable[[], Awaitable[None]] | None) -> Result:
        """The model's result for ``job``; if its client leaves first, the reply is abandoned."""
        if disconnected is not None:
            watcher = asyncio.ensure_future(disconnected())
            try:
                await asyncio.wait({job.done, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            job.abandoned = not job.done.done()
        return await job.done

    def failure(self, result: Result) -> ApiError:
        if isinstance(result.error, AimLlavaError):
            return bad(str(result.error), "messages", "invalid_prompt")
        logger.error("a request failed: %s", result.error, exc_info=result.error)
        return ApiError(500, "the server failed to answer this request (see its log)", code="server_error")

    def usage(self, result: Result, text: str) -> dict:
        response = result.response
        completion = response.num_new_tokens - (1 if response.ended_by_eos else 0)
        if text != response.text:  # cut at a stop sequence: count the tokens of what is returned
            completion = len(self.llm.tokenizer(text).input_ids) if text else 0
        return {"prompt_tokens": response.prompt_tokens, "completion_tokens": completion,
                "total_tokens": response.prompt_tokens + completion}

    def header(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    def reply(self, job: Job, result: Result) -> dict:
        if result.error is not None:
            raise self.failure(result)
        text, stopped = cut_at_stop(result.response.text, job.stop)
        reason = "stop" if stopped or result.response.ended_by_eos else "length"
        return {**self.header("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": self.usage(result, text)}

    async def stream(self, job: Job) -> AsyncIterator[str]:
        """The events of a streamed reply; when they stop being taken (the client went away)
        before the model is done, the reply is abandoned."""
        try:
            async for event in self.events(job):
                yield event
        finally:
            job.abandoned = not job.done.done()

    async def events(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. The streamed text is exactly the text of
        the plain reply: leading blanks are skipped, and the last characters are held back while
        they could still be trailing blanks or the start of a stop sequence."""
        header = self.header("chat.completion.chunk")

        def chunk(delta: dict, reason: str | None = None) -> str:
            payload = {**header, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        produced, sent = "", 0
        hold = max((len(stop) for stop in job.stop), default=1) - 1
        while (piece := await job.pieces.get()) is not None:
            produced += piece
            visible = produced.lstrip()
            safe = min(len(cut_at_stop(visible, job.stop)[0]), len(visible) - hold, len(visible.rstrip()))
            if safe > sent:
                yield chunk({"content": visible[sent:safe]})
                sent = safe
        result = await job.done
        if result.error is not None:
            yield f"data: {json.dumps(self.failure(result).body())}\n\n"
            return
        text, stopped = cut_at_stop(result.response.text, job.stop)
        if len(text) > sent:
            yield chunk({"content": text[sent:]})
        yield chunk({}, "stop" if stopped or result.response.ended_by_eos else "length")
        if job.include_usage:
            usage = {**header, "choices": [], "usage": self.usage(result, text)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "aim-llava"}]}


def create_app(service: Service):
    """The FastAPI application routing to ``service``."""

    app = FastAPI(title="aim-llava", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):
        logger.exception("unexpected server error")
        return JSONResponse(ApiError(500, "internal server error (see the server's log)").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await read_json(request)
        answer = await service.complete(body, lambda: until_disconnected(request))
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def until_disconnected(request: HttpRequest) -> None:
    """Returns once the client has gone (the body has been read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request) -> object:
    """The request body as JSON, read up to :data:`MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError(413, f"the request body may hold at most {MAX_BODY_BYTES >> 20} MiB", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body may hold at most {MAX_BODY_BYTES >> 20} MiB", code="too_large")
        chunks.append(chunk)
    try:
        return parse_json(b"".join(chunks))
    except ValueError as err:
        raise bad(f"the request body is not valid JSON ({err})", code="malformed_body") from None
