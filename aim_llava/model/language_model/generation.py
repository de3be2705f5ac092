"""The decoding loop after a prefill, kept off the host's critical path.

* The next-token computation is a fixed-shape step (``LlavaQwenForCausalLM.step_logits``): on a
  GPU, after a few eager steps (a reply that ends sooner never pays for a capture), it is captured
  once per call as a CUDA graph, checked, and replayed, so a step costs one launch instead of one
  per kernel (:class:`GraphedStep`); elsewhere, or with ``cuda_graph=False``, it runs eagerly.
* Sampling runs on the device (greedy argmax, or an exponential race for sampling, which needs no
  value on the host); EOS and each sample's own token limit are tracked on the device, so a
  batch stops once every sample has ended, whatever their limits. A sample whose caller has gone
  (a server's client that disconnected) is ended from the host, the one time it happens.
* The new tokens and an "all finished" flag are copied to pinned host memory asynchronously
  (:class:`HostMirror`); the host looks at them a couple of steps late, so the GPU always has the
  next steps queued (the first token excepted: it is handed on as soon as the prefill is done).
  Streaming reads the same copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aim_llava.tensors import page_locked
from aim_llava.timing import stage

logger = logging.getLogger(__name__)

HOST_LAG_STEPS = 2  # on CUDA, how many steps old the flags are that the host waits for
MIN_GRAPHED_TOKENS = 8  # shorter generations do not repay capturing a graph
# steps run eagerly before the capture: a reply that ends sooner (a short answer) never pays for it;
# on CUDA the host sees EOS HOST_LAG_STEPS late, so replies of up to 3 tokens (a letter, a period,
# EOS) end within 4 steps
EAGER_STEPS_BEFORE_CAPTURE = 4
REPLAY_TOLERANCE = 1e-2  # a checked replay's logits within this fraction of the largest eager logit


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
    """Host copies of each step's tokens [B] and "all finished" flag, made without waiting.

    On CUDA the copies go to pinned memory with ``non_blocking=True`` and an event marks each
    step; elsewhere they are plain copies. :meth:`deliver` hands finished steps, in order, to the
    streamer and reports the first step after which every sample had finished.
    """

    def __init__(self, batch: int, steps: int, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.tokens = torch.empty(steps, batch, dtype=torch.long)
        self.finished = torch.zeros(steps, dtype=torch.bool)
        if self.cuda:
            self.tokens, self.finished = page_locked(self.tokens), page_locked(self.finished)
        self.events: list[torch.cuda.Event] = []
        self.delivered = 0

    def push(self, step: int, tokens: torch.Tensor, all_finished: torch.Tensor) -> None:
        self.tokens[step].copy_(tokens, non_blocking=True)
        self.finished[step].copy_(all_finished, non_blocking=True)
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


class GraphCaptureError(RuntimeError):
    """The decoding step could not be captured as a CUDA graph, or its replay disagreed with the
    eager step (raised in strict mode; otherwise decoding goes on eagerly)."""


class GraphedStep:
    """A decoding step function replayed as a CUDA graph.

    The first ``eager_steps`` calls run the step eagerly. The next runs it for real on a side
    stream of ``device`` (which also warms up cuBLAS and the allocator), captures it, and checks
    the capture: one replay with the same inputs must give the same logits (:meth:`check_replay`).
    Later calls copy their inputs into the captured static tensors and replay. The graph belongs
    to one generation (its KV buffers), so concurrent calls never share one. If the capture fails
    or its check does, the generation goes on eagerly with a warning, or, with ``strict``, raises
    :class:`GraphCaptureError` (the GPU tests use it, so that "graph equals eager" never compares
    eager with eager).
    """

    def __init__(self, function: Callable[..., torch.Tensor], device: torch.device, strict: bool = False,
                 eager_steps: int = EAGER_STEPS_BEFORE_CAPTURE):
        self.function = function
        self.device = device
        self.strict = strict
        self.eager_steps = eager_steps
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            for static, value in zip(self.inputs, inputs):
                static.copy_(value)
            self.graph.replay()
            return self.output
        self.calls += 1
        if self.eager or self.calls <= self.eager_steps:
            return self.function(*inputs)
        with stage("graph_capture", self.device):  # the warm-up step, the capture and its check, reported apart
            return self.capture_checked(inputs)

    def capture_checked(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the step, capture it and check the capture; returns the step's logits."""
        self.inputs = [value.clone() for value in inputs]
        side = torch.cuda.Stream(device=self.device)
        current = torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            expected = self.function(*self.inputs).clone()
        current.wait_stream(side)
        try:
            self.graph = self.capture(side)
            self.check_replay(expected)
        except RuntimeError as error:
            self.graph = None
            if self.strict:
                raise GraphCaptureError(f"the decoding step could not be used as a CUDA graph: {error}") from error
            logger.warning("the decoding step could not be used as a CUDA graph, decoding eagerly: %s", error)
            self.eager = True
            return self.function(*inputs)  # writes this step's KV slot again, in case a bad replay spoiled it
        return expected

    def capture(self, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        """Record the step on ``stream`` (the warm-up's side stream). ``torch.cuda.graph`` would
        first synchronise the device and empty the allocator's cache, so every generate call would
        hand the cached blocks back to the driver and the next prefill would allocate them again."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.output = self.function(*self.inputs)
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        return graph

    def check_replay(self, expected: torch.Tensor) -> None:
        """Replay once with the warm-up's inputs (the step's KV slot is written again with the same
        values) into a NaN-filled output and require the warm-up's logits: a capture that recorded
        nothing (a stream of another GPU) or the wrong thing fails here, instead of repeating one
        token or decoding garbage. Reads one flag on the host, once per generation."""
        self.output.fill_(float("nan"))
        self.graph.replay()
        gap = (self.output - expected).abs().max()
        if not bool(gap <= REPLAY_TOLERANCE * expected.abs().max()):  # NaN compares False
            raise GraphCaptureError(f"its replay gave logits up to {float(gap):.3g} away from the eager step's")


def step_runner(function: Callable[..., torch.Tensor], device: torch.device, use_graph: bool | str,
                max_new_tokens: int) -> Callable[..., torch.Tensor]:
    """``function`` as a CUDA graph where that pays (a GPU, enough steps), eagerly otherwise;
    ``use_graph="strict"``: a graph that fails raises instead of falling back to eager."""
    if use_graph and device.type == "cuda" and max_new_tokens > MIN_GRAPHED_TOKENS:
        return GraphedStep(function, device, strict=use_graph == "strict")
    return function


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
) -> tuple[torch.Tensor, int]:
    """Sample up to ``max_new_tokens`` tokens per sample, starting from the prefill's logits [B, V];
    ``next_logits(tokens, step)`` feeds step ``step``'s tokens back. A sample ends at an EOS id,
    after ``row_limits[b]`` tokens (a device tensor [B], when samples have limits of their own) or
    once ``cancelled_rows()`` (asked every step) has named it; ended samples get ``pad_token_id``.
    Stops after the step at which every sample has ended.

    Returns the tokens [B, T] and how many times ``next_logits`` ran.
    """
    device = first_logits.device
    batch = first_logits.shape[0]
    mirror = HostMirror(batch, max_new_tokens, device)
    lag = HOST_LAG_STEPS if mirror.cuda else 0
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits, calls, stop, step = first_logits, 0, None, 0
    for step in range(max_new_tokens):
        tokens = torch.where(finished, torch.full_like(finished, pad_token_id, dtype=torch.long),
                             pick_tokens(logits, params))
        out[:, step] = tokens
        finished |= (tokens[:, None] == eos).any(dim=1)  # a broadcast compare: no host sync, empty eos fine
        if row_limits is not None:
            finished |= row_limits <= step + 1
        if cancelled_rows is not None and (rows := cancelled_rows()):
            finished[rows] = True  # copies the row numbers to the device: once per cancelled sample
        mirror.push(step, tokens, finished.all())
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
    return out[:, : last + 1], calls
