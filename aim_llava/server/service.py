"""The service behind the HTTP layer: a request is admitted (or refused with 503 beyond
``max_pending``) before its body is read, the body becomes a checked request (off the event
loop), has its media read in a worker thread under the request's limits, goes to the model
thread, and comes back as a completion or as server-sent events. A client that goes away, or a request past its deadline, stops costing
the model anything at the next point where the model looks: before encoding, before prefill,
or at the next decoding step."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aim_llava.errors import AimLlavaError
from aim_llava.pipeline import EncodedVisual, RequestCancelled, Result, VideoLLM
from aim_llava.server.batching import Completion, Job, ModelThread, cut_at_stop
from aim_llava.server.errors import ApiError, bad
from aim_llava.server.limits import ServerLimits
from aim_llava.server.media import MediaRoot, read_media
from aim_llava.server.requests import ChatRequest, RequestParser
from aim_llava.text_files import parse_json
from aim_llava.video import MediaLimits, VideoClip

logger = logging.getLogger("aim_llava.serve")


class Service:
    """Request parsing, admission, media and replies; the HTTP layer only routes to it."""

    def __init__(self, llm: VideoLLM, media_root: Path, model_name: str, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_pending: int = 32, limits: ServerLimits | None = None):
        self.llm, self.model_name = llm, model_name
        self.limits = limits or ServerLimits()
        self.root = MediaRoot(media_root)
        self.parser = RequestParser(llm, model_name, self.limits)
        self.max_pending, self.pending = max_pending, 0
        self.worker = ModelThread(llm, max_batch_size, max_wait_ms)
        self.created = int(time.time())

    def close(self) -> None:
        self.worker.stop()
        self.root.close()

    def health(self) -> tuple[int, dict]:
        if not self.worker.alive:
            return 503, {"status": "error", "reason": "the model thread has stopped: restart the server"}
        return 200, {"status": "ok"}

    def admit(self) -> None:
        """Count a request in, or refuse it while ``max_pending`` requests are in progress; taken
        before its body is read, so that bodies being read and parsed are bounded as well, and a
        flood of requests cannot pile up bodies or decoded frames. A request counts until the
        model has answered it, even if its client has gone (:meth:`release`)."""
        if not self.worker.alive:
            raise ApiError(503, "the model thread has stopped: the server cannot answer", code="server_error")
        if self.pending >= self.max_pending:
            raise ApiError(503, f"the server is busy ({self.pending} requests in progress): retry shortly",
                           code="server_busy", headers={"Retry-After": "1"})
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    def decode(self, raw: bytes) -> object:
        """A request body's JSON (run off the event loop), parsed only if its punctuation fits the
        largest admissible request (:attr:`ServerLimits.max_json_punctuation`): what parsing builds
        is bounded before it starts."""
        punctuation = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
        if punctuation > self.limits.max_json_punctuation:
            raise bad(f"the request body holds {punctuation:,} JSON brackets and commas; a request this server "
                      f"takes holds at most {self.limits.max_json_punctuation:,}", code="too_many_values")
        try:
            return parse_json(raw)
        except ValueError as err:
            raise bad(f"the request body is not valid JSON ({err})", code="malformed_body") from None

    async def checked(self, body: bytes | Callable[[], Awaitable[bytes]]) -> ChatRequest:
        """The request ``body`` holds (or ``body()`` reads), checked off the event loop; the raw
        bytes are dropped once parsed."""
        raw = body if isinstance(body, bytes) else await body()
        decoded = await asyncio.to_thread(self.decode, raw)
        del raw
        return await asyncio.to_thread(self.parser.parse, decoded)

    def read_media(self, job: Job) -> VideoClip | EncodedVisual:
        """The job's frames, or its encoded video when the model's reuse cache holds it (one cache
        per server: the model's, shared by every request; runs in a worker thread, off the event
        loop)."""
        size = self.llm.image_processor.image_size
        limits = MediaLimits(size, self.limits.max_request_pixels, self.limits.max_image_pixels, job.deadline,
                             keep_aspect=self.llm.family.native_resolution)
        request = job.request

        def load(path: str) -> VideoClip | EncodedVisual:
            return self.llm.read(path, request.config, limits, backend="pyav", **request.sampling)

        return read_media(request.media, self.root, load, limits)

    async def complete(self, body: bytes | Callable[[], Awaitable[bytes]],
                       disconnected: Callable[[], Awaitable[None]] | None = None) -> dict | AsyncIterator[str]:
        """The reply to a request body (or to the body ``body()`` reads, once the request is
        admitted): a completion, or the events of a streamed one. ``disconnected()`` returns once
        the client has gone; from then on the model stops working on the reply at its next check."""
        loop = asyncio.get_running_loop()
        self.admit()
        deadline = time.monotonic() + self.limits.request_timeout_s
        try:
            request = await self.checked(body)
        except BaseException:
            self.release()
            raise
        job = Job(request, loop, deadline, answered=self.release)
        watcher = asyncio.ensure_future(self.watch(job, disconnected)) if disconnected else loop.create_future()
        try:
            job.clip = await asyncio.to_thread(self.read_media, job)
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
        return self.reply(*job.done.result())

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
        if isinstance(result.error, AimLlavaError):
            return bad(str(result.error), "messages", "invalid_prompt")
        logger.error("a request failed: %s", result.error, exc_info=result.error)
        return ApiError(500, "the server failed to answer this request (see its log)", code="server_error")

    def header(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    @staticmethod
    def usage(completion: Completion) -> dict:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    def reply(self, result: Result, completion: Completion | None) -> dict:
        if result.error is not None:
            raise self.failure(result)
        message = {"role": "assistant", "content": completion.text}
        return {**self.header("chat.completion"),
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
        header, stops = self.header("chat.completion.chunk"), job.request.stop

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
        if len(completion.text) > sent:
            yield chunk({"content": completion.text[sent:]})
        yield chunk({}, completion.finish_reason)
        if job.request.include_usage:
            yield f"data: {json.dumps({**header, 'choices': [], 'usage': self.usage(completion)})}\n\n"
        yield "data: [DONE]\n\n"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "aim-llava"}]}
