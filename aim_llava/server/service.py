"""The service behind the HTTP layer: a request is refused (503) while ``max_pending`` requests
are in progress, before its body is read; its body is read within a byte budget shared by the
bodies arriving at the same time (so slow clients, which hold few bytes, block nobody), then the
request is admitted, the body becomes a checked request (off the event loop), has its media read
by a media reader (:mod:`aim_llava.server.decoding`: a bounded pool apart from parsing, each
read decoded in a worker process under the request's limits), goes to the model thread, and
comes back as a completion or as server-sent events. A client that goes away, or a request past
its deadline, stops costing anything at the next point where the server looks: its decoding
process is killed at once; the model drops it before encoding or before prefill, or ends it at
the next decoding step."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aim_llava.errors import AimLlavaError, DeviceFailure, DeviceMemoryError, NonFiniteOutputError
from aim_llava.pipeline import EncodedVisual, RequestCancelled, Result, VideoLLM
from aim_llava.server.batching import Completion, Job, ModelThread, cut_at_stop
from aim_llava.server.body import parse_body
from aim_llava.server.decoding import MediaReaders
from aim_llava.server.errors import ApiError, bad
from aim_llava.server.limits import ServerLimits
from aim_llava.server.media import MediaRoot
from aim_llava.server.metrics import Outcome, ServerMetrics
from aim_llava.server.requests import ChatRequest, RequestParser
from aim_llava.video import VideoClip

logger = logging.getLogger("aim_llava.serve")


class BodyBudget:
    """The bytes of the request bodies being read, bounded together (used on the event loop
    only): a body takes its bytes as they arrive and gives them back once read."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, count: int) -> None:
        if self.held + count > self.limit:
            raise ApiError(503, f"the server is receiving {self.held >> 20:,} MiB of request bodies, its most: "
                                "retry shortly", code="server_busy", headers={"Retry-After": "1"})
        self.held += count

    def give_back(self, count: int) -> None:
        self.held -= count


class Service:
    """Request parsing, admission, media and replies; the HTTP layer only routes to it."""

    def __init__(self, llm: VideoLLM, media_root: Path, model_name: str, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_pending: int = 32, limits: ServerLimits | None = None):
        self.llm, self.model_name = llm, model_name
        self.limits = limits or ServerLimits()
        self.root = MediaRoot(media_root)
        self.parser = RequestParser(llm, model_name, self.limits)
        self.max_pending, self.pending = max_pending, 0
        self.bodies = BodyBudget(max_pending * self.limits.max_body_bytes)
        self.readers = MediaReaders(self.limits)
        self.worker = ModelThread(llm, max_batch_size, max_wait_ms)
        self.metrics = ServerMetrics()
        self.created = int(time.time())

    def close(self) -> None:
        self.worker.stop()
        self.readers.close()
        self.root.close()

    def health(self) -> tuple[int, dict]:
        if not self.worker.alive:
            return 503, {"status": "error", "reason": "the model thread has stopped: restart the server"}
        if self.worker.failure is not None:
            return 503, {"status": "error", "reason": self.worker.failure}
        if (trouble := self.readers.trouble()) is not None:
            return 503, trouble
        return 200, {"status": "ok"}

    def check_room(self) -> None:
        """Refuse a request while the model thread has stopped or ``max_pending`` requests are in
        progress, before its body is read."""
        if not self.worker.alive:
            raise ApiError(503, "the model thread has stopped: the server cannot answer", code="server_error")
        if self.worker.failure is not None:
            raise ApiError(503, self.worker.failure, code="server_error")
        if self.pending >= self.max_pending:
            raise ApiError(503, f"the server is busy ({self.pending} requests in progress): retry shortly",
                           code="server_busy", headers={"Retry-After": "1"})

    def admit(self) -> None:
        """Count a request in (its body read), or refuse it while ``max_pending`` requests are in
        progress, so that a flood of requests cannot pile up parsed bodies or decoded frames. A
        request counts until the model has answered it, even if its client has gone
        (:meth:`release`)."""
        self.check_room()
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    def decode(self, raw: bytes | bytearray) -> object:
        """A request body's JSON (run off the event loop), parsed within a small multiple of its
        size (:mod:`aim_llava.server.body`)."""
        return parse_body(raw, self.limits)

    async def checked(self, raw: bytes | bytearray) -> ChatRequest:
        """The request ``raw`` holds, checked off the event loop."""
        decoded = await asyncio.to_thread(self.decode, raw)
        del raw
        return await asyncio.to_thread(self.parser.parse, decoded)

    def read_media(self, job: Job) -> VideoClip | EncodedVisual:
        """The job's frames, or its encoded video when the model's reuse cache holds it (one cache
        per server: the model's, shared by every request); run by a media reader, each file
        decoded in the job's own decoding process, which is killed at its deadline or when its
        client goes."""
        limits = self.limits.media_limits(self.llm.image_processor.image_size, job.deadline,
                                          self.llm.family.native_resolution)
        request = job.request

        def load(path: str, reader: Callable[..., VideoClip]) -> VideoClip | EncodedVisual:
            return self.llm.read(path, request.config, limits, reader, backend="pyav", **request.sampling)

        return self.readers.read_media(request.media, self.root, limits, job.cancelled, load)

    async def complete(self, body: bytes | Callable[[BodyBudget], Awaitable[bytes]],
                       disconnected: Callable[[], Awaitable[None]] | None = None,
                       outcome: Outcome | None = None) -> dict | AsyncIterator[str]:
        """The reply to a request body (or to the body ``body(budget)`` reads, taking its bytes from
        ``budget`` as they arrive): a completion, or the events of a streamed one.
        ``disconnected()`` returns once the client has gone; from then on reading its media and
        the model's work on it stop at their next check. ``outcome`` gets what the reply came to."""
        loop = asyncio.get_running_loop()
        self.check_room()
        arrived = time.monotonic()
        raw = body if isinstance(body, bytes) else await body(self.bodies)
        self.admit()
        deadline = time.monotonic() + self.limits.request_timeout_s
        try:
            request = await self.checked(raw)
        except BaseException:
            self.release()
            raise
        del raw
        job = Job(request, loop, deadline, answered=self.release, arrived=arrived, outcome=outcome or Outcome())
        watcher = asyncio.ensure_future(self.watch(job, disconnected)) if disconnected else loop.create_future()
        if request.media.video is not None or request.media.images:  # a text-only chat reads nothing
            try:
                job.clip = await self.readers.read(lambda: self.read_media(job))
            except BaseException:
                watcher.cancel()
                job.answered()
                raise
        job.done = loop.create_future()
        job.pieces = asyncio.Queue() if request.stream else None
        self.worker.submit(job)
        if request.stream:
            return self.stream(job, watcher)
        try:
            await asyncio.wait({job.done, watcher}, timeout=max(0.0, job.deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not job.done.done():  # the client went away, or the deadline passed first
            job.abandoned = True
            if time.monotonic() >= job.deadline:
                raise self.timeout()
            raise ApiError(499, "the client closed the request", code="client_closed")
        return self.reply(job, *job.done.result())

    @staticmethod
    async def watch(job: Job, disconnected: Callable[[], Awaitable[None]]) -> None:
        """Marks the job abandoned once its client has gone (unless its reply is complete)."""
        await disconnected()
        if job.done is None or not job.done.done():
            job.abandoned = True

    def timeout(self) -> ApiError:
        return ApiError(504, f"the request took longer than the server's limit of {self.limits.request_timeout_s:g} s",
                        code="timeout")

    def failure(self, result: Result) -> ApiError:
        if isinstance(result.error, RequestCancelled):  # the model ended it at its deadline
            return self.timeout()
        if isinstance(result.error, DeviceFailure):
            return ApiError(503, str(result.error), code="server_error")
        if isinstance(result.error, DeviceMemoryError):  # the server's load or its settings, not the request's fault
            logger.warning("a request failed: %s", result.error)
            return ApiError(503, "the server ran out of device memory for this request: retry later, or with fewer "
                            "frames or a config that keeps fewer visual tokens (e.g. aim_default)",
                            code="server_error", headers={"Retry-After": "1"})
        if isinstance(result.error, NonFiniteOutputError):  # the server's dtype, not the request, is at fault
            logger.error("a request failed: %s", result.error)
            return ApiError(500, str(result.error), code="server_error")
        if isinstance(result.error, AimLlavaError):
            return bad(str(result.error), "messages", "invalid_prompt")
        logger.error("a request failed: %s", result.error, exc_info=result.error)
        return ApiError(500, "the server failed to answer this request (see its log)", code="server_error")

    def header(self, kind: str, job: Job) -> dict:
        job.outcome.id = job.outcome.id or f"chatcmpl-{uuid.uuid4().hex}"
        return {"id": job.outcome.id, "object": kind, "created": int(time.time()), "model": self.model_name}

    @staticmethod
    def usage(completion: Completion) -> dict:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    @staticmethod
    def record(job: Job, completion: Completion) -> None:
        """The reply's token counts and time to first token, for the access log and /metrics."""
        outcome = job.outcome
        outcome.prompt_tokens, outcome.visual_tokens = completion.prompt_tokens, completion.visual_tokens
        outcome.completion_tokens = completion.completion_tokens
        outcome.first_token_s = max(0.0, completion.first_token_at - job.arrived)

    def reply(self, job: Job, result: Result, completion: Completion | None) -> dict:
        if result.error is not None:
            raise self.failure(result)
        self.record(job, completion)
        message = {"role": "assistant", "content": completion.text}
        return {**self.header("chat.completion", job),
                "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason}],
                "usage": self.usage(completion)}

    async def stream(self, job: Job, watcher: asyncio.Future) -> AsyncIterator[str]:
        """The events of a streamed reply; when they stop being taken (the client went away)
        before the model is done, the reply is abandoned."""
        watcher.cancel()  # from here on, the response's own disconnect listener ends this generator
        try:
            async for event in self.events(job):
                yield event
        finally:
            if not job.done.done():
                job.abandoned = True

    async def events(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. The streamed text is exactly the text of
        the plain reply: leading blanks are skipped, and the last characters are held back while
        they could still be trailing blanks or the start of a stop sequence."""
        header, stops = self.header("chat.completion.chunk", job), job.request.stop

        def chunk(delta: dict, reason: str | None = None) -> str:
            payload = {**header, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        produced, sent = "", 0
        hold = max((len(stop) for stop in stops), default=1) - 1
        while True:
            try:
                piece = await asyncio.wait_for(job.pieces.get(), max(0.0, job.deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.abandoned = True
                yield f"data: {json.dumps(self.timeout().body())}\n\n"
                return
            if piece is None:
                break
            produced += piece
            visible = produced.lstrip()
            safe = min(len(cut_at_stop(visible, stops)[0]), len(visible) - hold, len(visible.rstrip()))
            if safe > sent:
                yield chunk({"content": visible[sent:safe]})
                sent = safe
        result, completion = await job.done
        if result.error is not None:
            yield f"data: {json.dumps(self.failure(result).body())}\n\n"
            return
        self.record(job, completion)
        if len(completion.text) > sent:
            yield chunk({"content": completion.text[sent:]})
        yield chunk({}, completion.finish_reason)
        if job.request.include_usage:
            yield f"data: {json.dumps({**header, 'choices': [], 'usage': self.usage(completion)})}\n\n"
        yield "data: [DONE]\n\n"

    def metrics_text(self) -> str:
        """The server's metrics in Prometheus' text format (:mod:`aim_llava.server.metrics`)."""
        busy, waiting = self.readers.counts()
        gauges = {
            "aim_llava_requests_pending": ("Requests admitted and not yet answered by the model.", self.pending),
            "aim_llava_requests_waiting_for_model": ("Requests read and waiting for the model thread.",
                                                     self.worker.jobs.qsize()),
            "aim_llava_media_readers_busy": ("Media readers decoding a request's media.", busy),
            "aim_llava_media_reads_waiting": ("Requests waiting for a free media reader.", waiting),
            "aim_llava_request_body_bytes": ("Bytes of the request bodies being read.", self.bodies.held),
        }
        cache = self.llm.cache.snapshot() if self.llm.cache is not None else None
        return self.metrics.render(gauges, cache)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "aim-llava"}]}
