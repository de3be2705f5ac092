"""Media decoded in worker processes, so that no file or image, however it was made, takes more
than its share of the server.

A request's media are decoded by a process of its own, started when the request first needs a
decoder (one whose video the reuse cache holds starts none) by a small fork server
(``python -m aim_llava.server.decoding``, started with the service) that has only the decoders
loaded (NumPy, Pillow, PyAV; never torch, never the caller's script). The process

* may allocate ``media_memory_bytes`` beyond what it starts with (``RLIMIT_DATA``): past that the
  decoder's allocation fails and the request gets a 400;
* may spend ``media_cpu_s`` CPU-seconds on each media item, with or without a deadline: the
  server stops it there (and the kernel, a few seconds later, should the server not) and the
  request gets a 400;
* gives way once it has used :data:`GIVE_WAY_AFTER_S` CPU-seconds on an item: its threads get
  :data:`NICENESS` added, so that a costly file yields to the server's event loop and model
  thread, and to the decoding of ordinary files;
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
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import TypeVar

import numpy as np

from aim_llava.errors import AimLlavaError
from aim_llava.server.errors import ApiError, cut
from aim_llava.server.limits import ServerLimits
from aim_llava.server.media import InlineImage, MediaRoot, OpenedMedia, RequestMedia, decode_inline, read_media
from aim_llava.video import MediaLimits, ReadingTimeExceeded, VideoClip, VideoError, load_video, open_image_rgb

logger = logging.getLogger("aim_llava.serve")

GIVE_WAY_AFTER_S = 0.5  # CPU-seconds of one item after which a decoding process gives way
NICENESS = 10  # added to the nice value of a decoding process that gives way
CPU_BACKSTOP_S = 5  # the kernel stops a decoding process this long after its CPU budget
POLL_S = 0.05  # how often a reader thread looks at its decoder, its request's deadline and client
# a memfd of decoded pixels can no longer change once it is handed over
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
CLIP_FIELDS = ("indices", "timestamps", "duration", "fps", "source", "is_image")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
FORK_SERVER_STOPPED = "the server's media decoders have stopped (their fork server has ended): restart the server"
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


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (all its threads), from /proc; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime


def give_way(pid: int) -> None:
    """Adds :data:`NICENESS` to every thread of a process (threads it starts later inherit it)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for thread in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, int(thread), NICENESS)
        except OSError:  # the thread has ended
            pass


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


def decode_tasks(conn: Connection) -> None:
    """A decoding process: takes its limits, then decodes each task it is sent until it gets
    None (or the server has gone)."""
    cpu_s, memory_bytes = conn.recv()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ceiling = data_bytes() + memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (ceiling, ceiling))
    while (task := conn.recv()) is not None:
        handle = reduction.recv_handle(conn) if task["path"] is not None else None
        own_path = None if handle is None else f"/proc/self/fd/{handle}"
        allow_cpu(cpu_s + CPU_BACKSTOP_S)
        conn.send({"started": True})
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


def serve_forks(control: socket.socket) -> None:
    """The fork server: for each socket the server sends, forks a decoding process that serves
    it, and sends back the process's pid and a pidfd (an exited process is reaped by the kernel,
    and a pidfd never names another process). Ends when the server has gone."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message, handles, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message or not handles:
            return
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                decode_tasks(Connection(handles[0]))
            except (EOFError, OSError):  # the server has gone
                pass
            finally:
                os._exit(0)
        os.close(handles[0])
        try:
            pidfd = [os.pidfd_open(pid)]
        except ProcessLookupError:  # it has ended already
            pidfd = []
        socket.send_fds(control, [pid.to_bytes(4, "big")], pidfd)
        for handle in pidfd:
            os.close(handle)


class ForkServer:
    """The process that forks decoding processes (see :func:`serve_forks`), started here."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.control, self.lock = ours, threading.Lock()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self) -> tuple[Connection, int, int | None]:
        """A new decoding process: (its connection, its pid, its pidfd or None if it has ended)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.lock:
                socket.send_fds(self.control, [b"F"], [theirs.fileno()])
                message, handles, _, _ = socket.recv_fds(self.control, 4, 1)
        except OSError:
            message = b""
        finally:
            theirs.close()
        if len(message) != 4:
            ours.close()
            raise ApiError(503, FORK_SERVER_STOPPED, code="server_error")
        return Connection(ours.detach()), int.from_bytes(message, "big"), handles[0] if handles else None

    def close(self) -> None:
        self.control.close()  # it ends when it sees the server gone
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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

    def __init__(self, forks: ForkServer, limits: MediaLimits, cancelled: Callable[[], bool], cpu_s: float,
                 memory_bytes: int):
        self.forks, self.limits, self.cancelled = forks, limits, cancelled
        self.cpu_s, self.memory_bytes = cpu_s, memory_bytes
        self.conn: Connection | None = None
        self.pid, self.pidfd = 0, None

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
        """Sends one task (with the descriptor ``handle``) and waits for its pixels, watching the
        request and the process's CPU time meanwhile."""
        self.check(name)
        if self.conn is None:
            self.start()
        try:
            self.conn.send(task)
            if handle is not None:
                reduction.send_handle(self.conn, handle, self.pid)
        except OSError:
            raise self.stopped(name) from None
        self.receive(name)  # the task has started: its CPU time counts from here
        started = cpu_seconds(self.pid)
        header = self.receive(name, started)
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
        self.conn, self.pid, self.pidfd = self.forks.fork()
        try:
            self.conn.send((self.cpu_s, self.memory_bytes))
        except OSError:
            raise self.stopped("the media") from None

    def check(self, name: str) -> None:
        """Stops the process once the request is cancelled: 504 at its deadline, 499 when its
        client has gone."""
        if not self.cancelled():
            return
        self.stop()
        self.limits.check_deadline(name)
        raise ApiError(499, "the client closed the request", code="client_closed")

    def receive(self, name: str, started: float | None = None) -> dict:
        """The process's next message; meanwhile, every :data:`POLL_S`, the request is checked
        and (``started``: the CPU time when the task began) the task's CPU time: past
        :data:`GIVE_WAY_AFTER_S` the process gives way, past the budget it is stopped."""
        gave_way = False
        while not self.conn.poll(POLL_S):
            self.check(name)
            if started is None:
                continue
            used = cpu_seconds(self.pid) - started
            if used > self.cpu_s:
                self.stop()
                raise VideoError(f"decoding {name} took more than the {self.cpu_s:g} CPU-seconds one media item "
                                 "may take: send shorter or smaller media")
            if used > GIVE_WAY_AFTER_S and not gave_way:
                give_way(self.pid)
                gave_way = True
        try:
            return self.conn.recv()
        except (OSError, EOFError):
            raise self.stopped(name) from None

    def stopped(self, name: str) -> VideoError:
        """What became of a process that stopped in the middle of a task."""
        self.stop()
        logger.warning("a decoding process stopped while reading %s", name)
        return VideoError(f"the decoder stopped while reading {name} (it crashed or was killed)")

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
        if self.conn is None:
            return
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it has ended
                pass
            os.close(self.pidfd)
        self.conn.close()
        self.conn, self.pidfd = None, None


class MediaReaders:
    """The bounded pool of threads that read requests' media, each waiting on one decoding
    process; apart from the threads that parse requests, so that hostile media never delay them."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.forks = ForkServer()
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
        return DecodingProcess(self.forks, limits, cancelled, self.limits.media_cpu_s, self.limits.media_memory_bytes)

    def read_media(self, media: RequestMedia, root: MediaRoot, limits: MediaLimits, cancelled: Callable[[], bool],
                   load: Callable[[str, Callable[..., VideoClip]], T]) -> T | VideoClip:
        """A request's media (:func:`~aim_llava.server.media.read_media`), each file decoded under
        ``limits`` in the request's own decoding process, stopped once ``cancelled()``: a video or
        frame directory is what ``load(path, reader)`` makes of it (``reader``, called as
        :func:`~aim_llava.video.load_video`, decodes it in that process)."""
        with self.process(limits, cancelled) as decoder:
            return read_media(media, root, lambda opened: load(opened.path, decoder.video(opened)), decoder)

    def counts(self) -> tuple[int, int]:
        """(readers at work, reads waiting for one)."""
        with self.lock:
            return self.busy, self.waiting

    def trouble(self) -> dict | None:
        """What /health says when media cannot be read now: the fork server has ended (an error),
        or every reader is busy and requests wait for one (busy); None otherwise."""
        if not self.forks.alive:
            return {"status": "error", "reason": FORK_SERVER_STOPPED}
        with self.lock:
            if self.waiting > 0 and self.busy >= self.limits.media_readers:
                return {"status": "busy", "reason": f"all {self.busy} media readers are busy and {self.waiting} "
                                                    "requests wait for one: new requests wait"}
        return None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.forks.close()


if __name__ == "__main__":
    serve_forks(socket.socket(fileno=int(sys.argv[1])))
