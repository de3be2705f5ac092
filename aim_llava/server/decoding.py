"""Media decoded in worker processes, so that no file or image, however it was made, takes more
than its share of the server.

A request's media are decoded by a process of its own, started when the request first needs a
decoder (one whose video the reuse cache holds starts none), forked from a small fork server that
has only the decoders loaded (NumPy, Pillow, PyAV; never torch). The process

* runs at a lower priority than the server (:data:`NICENESS`): the event loop and the model
  thread come first;
* may allocate ``media_memory_bytes`` beyond what it starts with (``RLIMIT_DATA``): past that the
  decoder's allocation fails and the request gets a 400;
* may spend ``media_cpu_s`` CPU-seconds on each media item (``RLIMIT_CPU``), with or without a
  deadline: the kernel stops it and the request gets a 400;
* is killed at the request's deadline (504) and as soon as its client has gone, wherever its
  decoder is: a demuxer scanning gigabytes of a sparse file never comes back to Python to look
  at a clock.

The server opens each file (under the media root, :class:`~aim_llava.server.media.MediaRoot`) and
hands the process its descriptor; the pixels come back in a sealed memfd that the server maps
without a copy. The threads that wait on these processes are :class:`MediaReaders`, a pool of
``media_readers`` apart from the threads that parse requests; ``/health`` says when all of them
are busy and requests wait for one.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import mmap
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import reduction
from typing import TypeVar

import numpy as np

from aim_llava.errors import AimLlavaError
from aim_llava.server.errors import ApiError, cut
from aim_llava.server.limits import ServerLimits
from aim_llava.server.media import InlineImage, OpenedMedia, decode_inline
from aim_llava.video import MediaLimits, ReadingTimeExceeded, VideoClip, VideoError, load_video, open_image_rgb

logger = logging.getLogger("aim_llava.serve")

NICENESS = 10  # added to a decoding process's nice value: the server's own threads come first
POLL_S = 0.05  # how often a reader thread looks at its request's deadline and client while it waits
# a memfd of decoded pixels can no longer change once it is handed over
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
CLIP_FIELDS = ("indices", "timestamps", "duration", "fps", "source", "is_image")
T = TypeVar("T")


# ---------------------------------------------------------------------------- in the decoding process


def data_bytes() -> int:
    """This process's data size as RLIMIT_DATA counts it (VmData)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def allow_cpu(seconds: float) -> None:
    """Lets this process spend ``seconds`` more CPU time (all its threads) before the kernel
    stops it with SIGXCPU."""
    used = sum(os.times()[:2])
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + seconds), resource.RLIM_INFINITY))


def video_task(task: dict, path: str) -> tuple[np.ndarray, dict]:
    clip = load_video(path, *task["args"], **task["kwargs"])
    return clip.frames, {name: getattr(clip, name) for name in CLIP_FIELDS}


def image_task(task: dict, path: str | None) -> tuple[np.ndarray, dict]:
    limits: MediaLimits = task["limits"]
    if path is None:
        decoded = decode_inline(task["image"], limits.max_source_pixels)
    else:
        decoded = open_image_rgb(path, task["name"], limits.max_source_pixels)
    return (limits.frame(decoded) if task["as_frame"] else np.asarray(decoded)), {}


TASKS = {"video": video_task, "image": image_task}


def send_array(conn, array: np.ndarray, fields: dict) -> None:
    """Sends ``array`` as a sealed memfd with its shape and ``fields``."""
    array = np.ascontiguousarray(array)
    handle = os.memfd_create("aim-llava-pixels", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view, written = memoryview(array).cast("B"), 0
        while written < len(view):
            written += os.write(handle, view[written:])
        fcntl.fcntl(handle, fcntl.F_ADD_SEALS, SEALS)
        conn.send({"shape": array.shape, "dtype": array.dtype.str, **fields})
        reduction.send_handle(conn, handle, os.getppid())
    finally:
        os.close(handle)


def failure_of(err: BaseException) -> dict:
    if isinstance(err, ReadingTimeExceeded):
        return {"error": "timeout", "message": str(err)}
    if isinstance(err, AimLlavaError):
        return {"error": "media", "message": str(err)}
    if isinstance(err, MemoryError):
        return {"error": "memory"}
    return {"error": "decoder", "message": f"{type(err).__name__}: {cut(str(err))}"}


def decode_tasks(conn, cpu_s: float, memory_bytes: int) -> None:
    """A decoding process: limits itself, then decodes each task it is sent until it gets None."""
    os.nice(NICENESS)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ceiling = data_bytes() + memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (ceiling, ceiling))
    while (task := conn.recv()) is not None:
        handle = reduction.recv_handle(conn) if task["path"] is not None else None
        own_path = None if handle is None else f"/proc/self/fd/{handle}"
        allow_cpu(cpu_s)
        try:
            send_array(conn, *TASKS[task["kind"]](task, own_path))
        except Exception as err:  # noqa: BLE001 (every failure goes back to the server, as one message)
            reply = failure_of(err)
            if own_path is not None and "message" in reply:  # named as the server knows the file
                reply["message"] = reply["message"].replace(own_path, task["path"])
            conn.send(reply)
        finally:
            if handle is not None:
                os.close(handle)


# ---------------------------------------------------------------------------- in the server


def decoder_context():
    """The multiprocessing context of the decoding processes: a fork server with this module
    (and so the decoders) imported, started now."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    multiprocessing.forkserver.ensure_running()
    return context


def mapped_array(handle: int, header: dict) -> np.ndarray:
    """The pixels of a memfd the decoding process sent (checked against its header and seals)."""
    shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
    size = math.prod(shape) * dtype.itemsize
    if (dtype != np.uint8 or os.fstat(handle).st_size != size
            or fcntl.fcntl(handle, fcntl.F_GET_SEALS) & SEALS != SEALS):
        raise VideoError("the decoder sent pixels that do not match their description")
    if size == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(handle, size, access=mmap.ACCESS_COPY), dtype).reshape(shape)


class DecodingProcess:
    """The process that decodes one request's media (see the module docstring): started by its
    first task, ended with the request (a context manager)."""

    def __init__(self, context, limits: MediaLimits, cancelled: Callable[[], bool], cpu_s: float,
                 memory_bytes: int):
        self.context, self.limits, self.cancelled = context, limits, cancelled
        self.cpu_s, self.memory_bytes = cpu_s, memory_bytes
        self.process, self.conn = None, None

    def __enter__(self) -> DecodingProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def video(self, opened: OpenedMedia) -> Callable[..., VideoClip]:
        """A reader called as :func:`~aim_llava.video.load_video` that decodes ``opened`` here."""
        def read(path: str, *args, **kwargs) -> VideoClip:
            header, frames = self.ask({"kind": "video", "path": path, "args": args, "kwargs": kwargs},
                                      opened.handle, path)
            return VideoClip(frames, **{name: header[name] for name in CLIP_FIELDS})

        return read

    def image(self, image: OpenedMedia | InlineImage, name: str, as_frame: bool) -> np.ndarray:
        """One image as [H, W, 3] uint8: at the model's input size if it is one of several frames."""
        task = {"kind": "image", "name": name, "limits": self.limits, "as_frame": as_frame}
        if isinstance(image, InlineImage):
            return self.ask({**task, "image": image, "path": None}, None, name)[1]
        return self.ask({**task, "path": image.path}, image.handle, name)[1]

    def ask(self, task: dict, handle: int | None, name: str) -> tuple[dict, np.ndarray]:
        """Sends one task (with the descriptor ``handle``) and waits for its pixels."""
        self.check(name)
        if self.process is None:
            self.start()
        try:
            self.conn.send(task)
            if handle is not None:
                reduction.send_handle(self.conn, handle, self.process.pid)
        except OSError:
            raise self.stopped(name) from None
        header = self.receive(name)
        if "error" in header:
            raise self.failure(header, name)
        try:
            pixels = reduction.recv_handle(self.conn)
        except (OSError, EOFError, RuntimeError):
            raise self.stopped(name) from None
        try:
            return header, mapped_array(pixels, header)
        finally:
            os.close(pixels)

    def start(self) -> None:
        ours, theirs = self.context.Pipe()
        self.process = self.context.Process(target=decode_tasks, args=(theirs, self.cpu_s, self.memory_bytes),
                                            name="aim-llava-decoder", daemon=True)
        self.process.start()
        theirs.close()
        self.conn = ours

    def check(self, name: str) -> None:
        """Stops the process once the request is cancelled: 504 at its deadline, 499 when its
        client has gone."""
        if not self.cancelled():
            return
        self.stop()
        self.limits.check_deadline(name)
        raise ApiError(499, "the client closed the request", code="client_closed")

    def receive(self, name: str) -> dict:
        while not self.conn.poll(POLL_S):
            self.check(name)
        try:
            return self.conn.recv()
        except (OSError, EOFError):
            raise self.stopped(name) from None

    def stopped(self, name: str) -> VideoError:
        """What became of a process that stopped in the middle of a task."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        self.stop()
        if code == -signal.SIGXCPU:
            return VideoError(f"decoding {name} took more than the {self.cpu_s:g} CPU-seconds one media item may "
                              "take: send shorter or smaller media")
        reason = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        logger.warning("a decoding process stopped (%s) while reading %s", reason, name)
        return VideoError(f"the decoder stopped ({reason}) while reading {name}")

    def failure(self, reply: dict, name: str) -> VideoError:
        if reply["error"] == "timeout":
            return ReadingTimeExceeded(reply["message"])
        if reply["error"] == "memory":
            return VideoError(f"decoding {name} needs more than the {self.memory_bytes >> 20:,} MiB a media reader "
                              "may use: send smaller media")
        if reply["error"] == "decoder":
            logger.warning("a decoder failed: %s", reply["message"])
            return VideoError(f"the media cannot be decoded ({reply['message']})")
        return VideoError(reply["message"])

    def stop(self) -> None:
        """Ends the process now, wherever it is (its pixels already sent stay mapped)."""
        if self.process is None:
            return
        self.process.kill()
        self.process.join()
        self.conn.close()
        self.process, self.conn = None, None


class MediaReaders:
    """The bounded pool of threads that read requests' media, each waiting on one decoding
    process; apart from the threads that parse requests, so that hostile media never delay them."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.context = decoder_context()
        self.executor = ThreadPoolExecutor(limits.media_readers, thread_name_prefix="aim-llava-media")
        self.lock = threading.Lock()
        self.busy = self.waiting = 0

    async def read(self, work: Callable[[], T]) -> T:
        """``work()`` run by one of the readers (waiting for a free one)."""
        def counted() -> T:
            with self.lock:
                self.waiting -= 1
                self.busy += 1
            try:
                return work()
            finally:
                with self.lock:
                    self.busy -= 1

        with self.lock:
            self.waiting += 1
        future = self.executor.submit(counted)
        future.add_done_callback(self.forget_if_cancelled)
        return await asyncio.wrap_future(future)

    def forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # it never ran: it no longer waits
            with self.lock:
                self.waiting -= 1

    def process(self, limits: MediaLimits, cancelled: Callable[[], bool]) -> DecodingProcess:
        """The decoding process of one request read under ``limits`` (stopped once ``cancelled()``)."""
        return DecodingProcess(self.context, limits, cancelled, self.limits.media_cpu_s, self.limits.media_memory_bytes)

    def saturated(self) -> str | None:
        """Why a new request's media would wait (every reader busy, requests waiting), or None."""
        with self.lock:
            if self.waiting > 0 and self.busy >= self.limits.media_readers:
                return f"all {self.busy} media readers are busy and {self.waiting} requests wait for one"
        return None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
