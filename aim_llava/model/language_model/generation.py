"""The decoding loop after a prefill, kept off the host's critical path.

* The next-token computation is a fixed-shape step (``LlavaQwenForCausalLM.step_logits``): on a
  GPU, after a few eager steps (a reply that ends sooner never pays for a capture), it is captured
  once per call as a CUDA graph, checked, and replayed, so a step costs one launch instead of one
  per kernel (:class:`GraphedStep`); elsewhere, or with ``cuda_graph=False``, it runs eagerly.
  Every capture of a model on one device records on the same side stream into the same graph
  memory pool (:class:`GraphMemory`), so a long-running server's reserved memory stays flat.
* Sampling runs on the device (greedy argmax, or an exponential race for sampling, which needs no
  value on the host); EOS and each sample's own token limit are tracked on the device, so a
  batch stops once every sample has ended, whatever their limits. A sample whose caller has gone
  (a server's client that disconnected) is ended from the host, the one time it happens.
* The new tokens and an "all finished" flag are copied to pinned host memory asynchronously
  (:class:`HostMirror`); the host looks at them a couple of steps late, so the GPU always has the
  next steps queued (the first token excepted: it is handed on as soon as the prefill is done).
  Streaming reads the same copies.
* Non-finite logits (a float16 overflow) never become an answer: each step flags, on the device,
  the samples whose logits hold a NaN or an infinity (or whose prefill's token importance did),
  ends them, and the flags travel with the host copies; the caller learns which samples failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aim_llava.capabilities import RUNTIME_FALLBACKS, is_device_failure
from aim_llava.devices import on_device
from aim_llava.tensors import page_locked
from aim_llava.timing import stage

logger = logging.getLogger(__name__)

HOST_LAG_STEPS = 2  # on CUDA, how many steps old the flags are that the host waits for
MIN_GRAPHED_TOKENS = 8  # shorter generations do not repay capturing a graph
# steps run eagerly before the capture: a reply that ends sooner (a short answer) never pays for it;
# on CUDA the host sees EOS HOST_LAG_STEPS late, so replies of up to 3 tokens (a letter, a period,
# EOS) end within 4 steps
EAGER_STEPS_BEFORE_CAPTURE = 4
STEPS_IN_GRAPH_CAPTURE = 2  # the decoding steps run inside the "graph_capture" stage: the captured one and the check's
GRAPH_FALLBACK = "CUDA-graph decoding"  # its name among the runtime fallbacks (aim_llava.capabilities)


def nonfinite_message(dtype: torch.dtype) -> str:
    """The one line that stops a sample whose logits or token importance became NaN or infinite
    in ``dtype``: the cause and what to do."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float16:
        cause = ("its activations overflow float16's range; load it in float32 (--dtype float32), or in bfloat16 "
                 "on a GPU that has it (sm_80 or later: A100, RTX 30xx/40xx, L4, H100)")
    elif dtype == torch.bfloat16:
        cause = "load it in float32 (--dtype float32)"
    else:
        cause = "the checkpoint's weights or the input hold NaN/inf values: check the checkpoint"
    return f"the model's logits or token importance became NaN/infinite in {name}, so no answer is given: {cause}"


@dataclass
class SamplingParams:
    """Greedy when ``do_sample`` is false or ``temperature`` is 0; otherwise softmax sampling at
    ``temperature``, restricted to the top-p nucleus when ``top_p`` < 1, drawn with ``generator``."""

    do_sample: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


def pick_tokens(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (float32), on the device, without host values."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i
    noise = torch.empty_like(probs).exponential_(1.0, generator=params.generator)
    return (probs / noise).argmax(dim=-1)


class HostMirror:
    """Host copies of each step's tokens [B], "all finished" flag and non-finite flags [B], made
    without waiting.

    On CUDA the copies go to pinned memory with ``non_blocking=True`` and an event marks each
    step; elsewhere they are plain copies. :meth:`deliver` hands finished steps, in order, to the
    streamer and reports the first step after which every sample had finished;
    :meth:`broken_rows` reads a delivered step's non-finite flags.
    """

    def __init__(self, batch: int, steps: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.tokens = torch.empty(steps, batch, dtype=torch.long)
        self.finished = torch.zeros(steps, dtype=torch.bool)
        self.broken = torch.zeros(steps, batch, dtype=torch.bool)
        if self.cuda:
            self.tokens, self.finished, self.broken = (page_locked(t) for t in (self.tokens, self.finished, self.broken))
        self.events: list[torch.cuda.Event] = []
        self.delivered = 0

    def push(self, step: int, tokens: torch.Tensor, all_finished: torch.Tensor, broken: torch.Tensor | None = None
             ) -> None:
        self.tokens[step].copy_(tokens, non_blocking=True)
        self.finished[step].copy_(all_finished, non_blocking=True)
        if broken is not None:
            self.broken[step].copy_(broken, non_blocking=True)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the copies' stream, not the current device's
            self.events.append(event)

    def deliver(self, until: int, streamer=None) -> int | None:
        """Wait for the copies of steps up to ``until`` and hand them on; returns the first step
        whose flag says everything had finished, if one was seen (nothing after it is handed on)."""
        if until < self.delivered:
            return None
        if self.cuda:
            self.events[until].synchronize()
        for step in range(self.delivered, until + 1):
            self.delivered = step + 1
            if streamer is not None:
                streamer.put(self.tokens[step].clone())
            if bool(self.finished[step]):
                return step
        return None

    def broken_rows(self, step: int) -> list[int]:
        """The samples flagged non-finite by ``step`` (a delivered step: its copy has arrived)."""
        return [row for row, broken in enumerate(self.broken[step].tolist()) if broken]


class GraphCaptureError(RuntimeError):
    """The decoding step could not be captured as a CUDA graph, or its replay disagreed with the
    eager step (raised in strict mode; otherwise decoding goes on eagerly)."""


class GraphMemory:
    """The side stream and the CUDA-graph memory pool that a model's decoding graphs on one device
    share, made on first use and kept for the model's life: every capture records on the same
    stream (one cuBLAS workspace) into the same pool, whose blocks the next capture reuses once the
    last graph is gone, so that a server's reserved memory does not grow with each request.

    One generation at a time captures and replays through them (:meth:`claim`); another one that
    runs meanwhile on the same device decodes eagerly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lock = threading.Lock()
        self.stream: torch.cuda.Stream | None = None
        self.pool = None  # torch.cuda.MemPool

    def claim(self) -> bool:
        """Take the stream and pool for one generation (made now if this is the first); False
        while another generation holds them."""
        if not self.lock.acquire(blocking=False):
            return False
        if self.stream is None:
            try:
                with on_device(self.device):  # a pool belongs to the current device
                    self.pool = torch.cuda.MemPool()
                    self.stream = torch.cuda.Stream(device=self.device)
            except BaseException:
                self.pool = None
                self.lock.release()
                raise
        return True

    def release(self) -> None:
        self.lock.release()


@dataclass
class DecodingGraphs:
    """A model's :class:`GraphMemory` per device (one device in practice; another after ``.to``)."""

    memories: dict[torch.device, GraphMemory] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, device: torch.device) -> GraphMemory:
        with self.lock:
            if device not in self.memories:
                self.memories[device] = GraphMemory(device)
            return self.memories[device]


def capture_graph(function: Callable[[], torch.Tensor], stream: torch.cuda.Stream, device: torch.device,
                  pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record ``function()`` as a CUDA graph on ``stream`` (a side stream of ``device``), its memory
    taken from ``pool`` (a ``torch.cuda.MemPool``; None: a pool of its own); returns the graph and
    the function's output tensor, which holds the result once the graph is replayed.
    ``torch.cuda.graph`` would first synchronise the device and empty the allocator's cache, so
    every generate call would hand the cached blocks back to the driver and the next prefill would
    allocate them again."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=None if pool is None else pool.id, capture_error_mode="thread_local")
        try:
            output = function()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, output


def same_values(replayed: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit the same values, NaN matching NaN (reads one flag on the host)."""
    return bool(((replayed == expected) | (replayed.isnan() & expected.isnan())).all())


class GraphedStep:
    """A decoding step function replayed as a CUDA graph.

    The first ``eager_steps`` calls run the step eagerly. The next runs it for real on the side
    stream of ``memory`` (which also warms up cuBLAS and the allocator) and captures it, with the
    inputs of that step. The one after checks the capture with that later step's fresh inputs: the
    step run eagerly on the same stream, and one replay into a NaN-filled output, must give the
    same logits bit for bit, so a capture that recorded nothing (a stream of another GPU) or baked
    in a value of the captured step fails here instead of repeating one token. Later calls copy
    their inputs into the captured static tensors and replay. The graph belongs to one generation
    (its KV buffers): :meth:`close` ends it and gives the stream and pool back.

    If the capture fails or its check does, the generation goes on eagerly and CUDA-graph decoding
    is written off for the rest of the process (one warning, :data:`GRAPH_FALLBACK` among the
    runtime fallbacks); with ``strict`` it raises :class:`GraphCaptureError` instead (the GPU tests
    use it, so that "graph equals eager" never compares eager with eager). A failure of the device
    itself propagates; running out of memory during the capture decodes this generation eagerly.
    """

    def __init__(self, function: Callable[..., torch.Tensor], device: torch.device, strict: bool = False,
                 eager_steps: int = EAGER_STEPS_BEFORE_CAPTURE, memory: GraphMemory | None = None):
        self.function = function
        self.device = device
        self.strict = strict
        self.eager_steps = eager_steps
        self.memory = memory if memory is not None else GraphMemory(device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.checked = False
        self.claimed = False
        self.eager = False
        self.inputs: list[torch.Tensor] = []  # the captured graph's static inputs
        self.captured_inputs: list[torch.Tensor] = []  # the captured step's own, until the check
        self.output: torch.Tensor | None = None

    @property
    def replaying(self) -> bool:
        """Whether calls now replay the checked graph (nothing more is read on the host)."""
        return self.graph is not None and self.checked

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.replaying:
            for static, value in zip(self.inputs, inputs):
                static.copy_(value)
            self.graph.replay()
            return self.output
        self.calls += 1
        if self.eager or self.calls <= self.eager_steps or (self.graph is None and not self.claim()):
            return self.function(*inputs)
        with stage("graph_capture", self.device):  # the captured step and the checked one, reported apart
            return self.capture_step(inputs) if self.graph is None else self.check_step(inputs)

    def claim(self) -> bool:
        """Take the device's graph memory for this generation; while another generation holds it,
        decode eagerly (or raise, with ``strict``)."""
        try:
            self.claimed = self.memory.claim()
        except RuntimeError as error:  # a torch that cannot make the stream or the pool
            self.give_up(error)
            return False
        if not self.claimed:
            if self.strict:
                raise GraphCaptureError("another generation is using this device's decoding graphs")
            logger.debug("another generation is using the decoding graphs of %s: decoding eagerly", self.device)
            self.eager = True
        return self.claimed

    def eager_on_side_stream(self, inputs) -> torch.Tensor:
        """The step run eagerly on the capture's stream (the same kernels and cuBLAS workspace as the
        graph); a copy of its logits."""
        side, current = self.memory.stream, torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self.function(*inputs).clone()
        current.wait_stream(side)
        return logits

    def capture_step(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run this step eagerly and capture it; returns its logits."""
        self.inputs = [value.clone() for value in inputs]
        self.captured_inputs = [value.clone() for value in inputs]
        expected = self.eager_on_side_stream(self.inputs)
        try:
            self.graph, self.output = capture_graph(lambda: self.function(*self.inputs), self.memory.stream,
                                                    self.device, self.memory.pool)
        except RuntimeError as error:
            self.give_up(error)
            return self.function(*inputs)  # writes this step's KV slot again, in case the capture spoiled it
        return expected

    def check_step(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Check the capture with this later step's inputs; returns its logits."""
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        expected = self.eager_on_side_stream(inputs)
        self.output.fill_(float("nan"))
        self.graph.replay()
        if not same_values(self.output, expected):
            gap = (self.output - expected).abs().nan_to_num(float("inf")).max()
            captured = self.captured_inputs
            self.give_up(GraphCaptureError(f"its replay with a later step's inputs gave logits up to {float(gap):.3g} "
                                           "away from the eager step's"))
            self.function(*captured)  # both steps' KV slots written again, in case the replay spoiled them
            return self.function(*inputs)
        self.checked, self.captured_inputs = True, []
        return expected

    def give_up(self, error: RuntimeError) -> None:
        """Decode eagerly from here on, or raise (see the class)."""
        self.close()
        if is_device_failure(error):
            raise error
        if self.strict:
            raise GraphCaptureError(f"the decoding step could not be used as a CUDA graph: {error}") from error
        self.eager = True
        if isinstance(error, torch.OutOfMemoryError):
            logger.warning("capturing the decoding step ran out of device memory: this reply is decoded eagerly")
        else:
            RUNTIME_FALLBACKS.record(GRAPH_FALLBACK, error, "eager decoding")

    def close(self) -> None:
        """End the graph (its memory goes back to the pool) and give the stream and pool back."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.output, self.inputs, self.captured_inputs = None, None, [], []
        if self.claimed:
            self.claimed = False
            self.memory.release()


def step_runner(function: Callable[..., torch.Tensor], device: torch.device, use_graph: bool | str,
                max_new_tokens: int, graphs: DecodingGraphs | None = None) -> Callable[..., torch.Tensor]:
    """``function`` as a CUDA graph where that pays (a GPU, enough steps, CUDA-graph decoding not
    written off in this process), eagerly otherwise; the graph records through ``graphs``' memory
    for the device (None: memory of its own). ``use_graph="strict"``: a graph that fails raises
    instead of falling back to eager."""
    if not use_graph or device.type != "cuda" or max_new_tokens <= MIN_GRAPHED_TOKENS:
        return function
    if use_graph != "strict" and GRAPH_FALLBACK in RUNTIME_FALLBACKS.failed:
        return function
    memory = graphs.on(device) if graphs is not None else None
    return GraphedStep(function, device, strict=use_graph == "strict", memory=memory)


@dataclass
class Decoded:
    """What :func:`run_decoding` produced: the tokens [B, T], how many times ``next_logits`` ran,
    and the samples ended because their logits (or their prefill's importance) were not finite."""

    tokens: torch.Tensor
    steps: int
    broken_rows: list[int]


def run_decoding(
    first_logits: torch.Tensor,
    next_logits: Callable[[torch.Tensor, int], torch.Tensor],
    max_new_tokens: int,
    eos: torch.Tensor,
    pad_token_id: int,
    params: SamplingParams,
    streamer=None,
    row_limits: torch.Tensor | None = None,
    cancelled_rows: Callable[[], list[int]] | None = None,
    broken: torch.Tensor | None = None,
) -> Decoded:
    """Sample up to ``max_new_tokens`` tokens per sample, starting from the prefill's logits [B, V];
    ``next_logits(tokens, step)`` feeds step ``step``'s tokens back. A sample ends at an EOS id,
    after ``row_limits[b]`` tokens (a device tensor [B], when samples have limits of their own),
    once ``cancelled_rows()`` (asked every step) has named it, or as soon as its logits hold a NaN
    or an infinity (or ``broken[b]``, a device flag [B], says its prefill went wrong: such a
    sample is ended before its first token); ended samples get ``pad_token_id``. Stops after the
    step at which every sample has ended. The non-finite flags are checked on the device and read
    with the host copies: no synchronisation is added.
    """
    device = first_logits.device
    batch = first_logits.shape[0]
    mirror = HostMirror(batch, max_new_tokens, device)
    lag = HOST_LAG_STEPS if mirror.cuda else 0
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    broken = torch.zeros_like(finished) if broken is None else broken.clone()
    logits, calls, stop, step = first_logits, 0, None, 0
    for step in range(max_new_tokens):
        broken |= ~finished & ~torch.isfinite(logits).all(dim=-1)
        finished |= broken
        tokens = torch.where(finished, torch.full_like(finished, pad_token_id, dtype=torch.long),
                             pick_tokens(logits, params))
        out[:, step] = tokens
        finished |= (tokens[:, None] == eos).any(dim=1)  # a broadcast compare: no host sync, empty eos fine
        if row_limits is not None:
            finished |= row_limits <= step + 1
        if cancelled_rows is not None and (rows := cancelled_rows()):
            finished[rows] = True  # copies the row numbers to the device: once per cancelled sample
        mirror.push(step, tokens, finished.all(), broken)
        # the first token is handed on at once (it waits only for the prefill, and a streaming
        # client's time to first token would otherwise include the graph capture); later ones late
        stop = mirror.deliver(step - lag if step else 0, streamer)
        if stop is not None or step + 1 == max_new_tokens:
            break
        logits = next_logits(tokens, step)
        calls += 1
    if stop is None:
        stop = mirror.deliver(step, streamer)
    last = step if stop is None else stop
    return Decoded(out[:, : last + 1], calls, mirror.broken_rows(last))
