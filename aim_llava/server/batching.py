"""The model thread: the only thread that runs the model and its tokenizer. It takes the jobs that
arrived together as one batch (greedy ones share one generate call; a sampled one runs alone, so
that its seed reproduces), drops the jobs whose client has gone or whose deadline has passed
before encoding and again before prefill (and the model ends them at its next decoding step), and
computes each reply's text and token counts before handing it back to the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aim_llava.errors import DeviceFailure
from aim_llava.pipeline import EncodedVisual, Request, RequestCancelled, Result, VideoLLM
from aim_llava.sample_media import random_frames
from aim_llava.server.metrics import Outcome
from aim_llava.server.requests import ChatRequest
from aim_llava.video import VideoClip

logger = logging.getLogger("aim_llava.serve")

WARM_UP_QUESTION = "Describe the video."
# The length of the importance warm-up: Triton compiles a kernel per specialisation of its
# arguments, integers and strides divisible by 16 or not, and the importance's strides hold the
# length (N, heads x N, N x N). An odd length specialises as most requests do (with 28 heads: every
# length not divisible by 4); 64 compiled a kernel only lengths divisible by 16 use.
WARM_UP_IMPORTANCE_TOKENS = 65


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the earliest stop sequence, and whether one was found."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass(frozen=True)
class Completion:
    """A reply as the API returns it: the text cut at the first stop sequence, why it ended, and
    the tokens of the prompt and of the returned text (counted by the model thread); with the
    prompt's visual tokens and when (``time.monotonic()``) its first new token came."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int = 0
    first_token_at: float = 0.0


@dataclass
class Job:
    """One admitted chat completion on its way through the server."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() by which the reply must be complete
    clip: VideoClip | EncodedVisual | None = None  # an encoded video when the reuse cache held it
    done: asyncio.Future | None = None  # set to (Result, Completion or None) on the event loop
    pieces: asyncio.Queue | None = None  # streamed text, then None
    answered: Callable[[], None] = lambda: None  # called on the event loop once the model has answered
    # the client went away, or its deadline passed (the event loop gave up waiting): the model
    # drops the job, or ends its reply
    abandoned: bool = False
    arrived: float = 0.0  # time.monotonic() when the request arrived
    outcome: Outcome = field(default_factory=Outcome)  # what the reply came to, for the access log and /metrics

    def cancelled(self) -> bool:
        """Whether the model should stop working on this job (asked before encoding, before
        prefill and at each decoding step): abandoned, or past its deadline (even before the
        event loop has noticed)."""
        return self.abandoned or time.monotonic() > self.deadline

    def batch_key(self) -> tuple:
        """Jobs that may share one generate call: greedy ones with the same reduction."""
        return (self.request.config, True) if self.request.greedy else (self.request.config, id(self))


def warm_up(llm: VideoLLM, frames: int) -> float:
    """Answer one synthetic request (``frames`` random frames at the model's input size, as the
    server's requests bring them, the default reduction, a few graph-replayed tokens) and run the
    PageRank importance once at the model's head shapes (which requests with a pruning config
    need) before the server takes requests, so that the first client does not pay for compiling
    GPU kernels, setting up cuBLAS and the allocator's first blocks; the random clip is then
    dropped from the model's reuse cache (it would only take room). Returns the seconds it took;
    a failure raises (the server would fail alike)."""
    import torch

    from aim_llava.model.language_model.generation import MIN_GRAPHED_TOKENS
    from aim_llava.reduction.importance import log_importance

    size = llm.image_processor.image_size
    clip = VideoClip(random_frames(frames, size, size), list(range(frames)), [index / 30 for index in range(frames)],
                     frames / 30, 30.0, "warm-up")
    started = time.perf_counter()
    llm.ask(clip, WARM_UP_QUESTION, max_new_tokens=MIN_GRAPHED_TOKENS + 1)
    with torch.no_grad():
        q, k, valid, log_start = importance_warm_up_inputs(llm.model.config.text, llm.model.device, llm.model.dtype)
        log_importance(q, k, valid, log_start, q.shape[-1] ** -0.5)
    if llm.cache is not None:
        llm.cache.clear()
    return time.perf_counter() - started


def importance_warm_up_inputs(text, device, dtype, tokens: int = WARM_UP_IMPORTANCE_TOKENS):
    """Random q [1, heads, N, d] and k [1, kv_heads, N, d], laid out as the decoder's attention
    hands them to the importance (heads transposed from [1, N, heads, d]), every key valid, and the
    start weights, for the text model ``text`` (a :class:`~aim_llava.model.config.TextConfig`)."""
    import torch

    from aim_llava.reduction.importance import log_start_weights

    q = torch.randn(1, tokens, text.num_attention_heads, text.head_dim, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, tokens, text.num_key_value_heads, text.head_dim, device=device, dtype=dtype).transpose(1, 2)
    valid = torch.ones(1, tokens, dtype=torch.bool, device=device)
    return q, k, valid, log_start_weights(valid)


class ModelThread:
    """Runs the model for every job: takes what arrived together as one batch. Once the GPU has
    failed (:class:`~aim_llava.errors.DeviceFailure`), ``failure`` says why and every job is
    answered at once with that error."""

    def __init__(self, llm: VideoLLM, max_batch_size: int, max_wait_ms: float):
        self.llm, self.max_batch_size, self.max_wait = llm, max_batch_size, max_wait_ms / 1000.0
        self.failure: str | None = None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self.loop, name="aim-llava-model", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def loop(self) -> None:
        while (batch := self.next_batch()) is not None:
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.batch_key(), []).append(job)
            for group in groups.values():
                self.answer(group)

    def next_batch(self) -> list[Job] | None:
        """The next job and those that arrive within ``max_wait`` (None: stop)."""
        job = self.jobs.get()
        if job is None:
            return None
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
        return batch

    def answer(self, group: list[Job]) -> None:
        live = []
        for job in group:
            if self.failure is not None:
                self.hand_back(job, Result(Request(job.clip), error=DeviceFailure(self.failure)))
            elif job.cancelled():  # its client has gone or its time is up: not even encoded
                self.hand_back(job, Result(Request(job.clip), error=RequestCancelled("the request was dropped")))
            else:
                live.append(job)
        if not live:
            return
        try:
            items = [(Request(job.clip, job.request.turns, self.streamer(job) if job.request.stream else None,
                              job.request.max_tokens, job.request.system, cancelled=job.cancelled), job.clip)
                     for job in live]
            generation = dict(live[0].request.generation(), max_new_tokens=max(job.request.max_tokens for job in live))
            results = self.llm.answer_batch(items, live[0].request.config, generation)
        except DeviceFailure as err:
            logger.error("%s", err)
            self.failure = str(err)
            results = [Result(Request(job.clip), error=err) for job in live]
        except Exception as err:  # the model thread must survive anything
            logger.exception("a batch failed")
            results = [Result(Request(job.clip), error=err) for job in live]
        answered = time.monotonic()
        for job, result in zip(live, results):
            self.hand_back(job, result, answered)

    def hand_back(self, job: Job, result: Result, answered: float = 0.0) -> None:
        """Sends a result to the job's event loop; a reply the model cut because its time was up
        is not a complete reply, and goes back as cancelled (the client gets the timeout).
        ``answered``: when the model returned it (its first token came its generation's length
        minus its time to first token before)."""
        if result.error is None and job.cancelled():
            result.error = RequestCancelled("the request was cut at its deadline")
        completion = None
        if result.error is None:
            try:
                completion = self.completion(job, result, answered)
            except Exception as err:  # noqa: BLE001 (a tokenizer failure is this job's, not the thread's)
                result.error = err
        try:
            job.loop.call_soon_threadsafe(finish, job, result, completion)
        except RuntimeError:  # the event loop has closed: nobody waits for this reply any more
            logger.warning("a reply had nowhere to go (its event loop has closed)")

    def completion(self, job: Job, result: Result, answered: float) -> Completion:
        """The reply's API view; a reply cut at a stop sequence has its returned tokens counted
        here, with the tokenizer, in this thread."""
        response = result.response
        text, stopped = cut_at_stop(response.text, job.request.stop)
        tokens = response.num_new_tokens - (1 if response.ended_by_eos else 0)
        if text != response.text:
            tokens = len(self.llm.tokenizer(text).input_ids) if text else 0
        reason = "stop" if stopped or response.ended_by_eos else "length"
        return Completion(text, reason, response.prompt_tokens, tokens, response.visual_tokens,
                          answered - response.seconds + response.first_token_s)

    @staticmethod
    def streamer(job: Job):
        def piece(text: str) -> None:
            job.loop.call_soon_threadsafe(job.pieces.put_nowait, text)

        return piece


def finish(job: Job, result: Result, completion: Completion | None) -> None:
    job.answered()
    if not job.done.done():
        job.done.set_result((result, completion))
    if job.pieces is not None:
        job.pieces.put_nowait(None)
