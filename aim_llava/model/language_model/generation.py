"""The decoding loop after a prefill, kept off the host's critical path.

* The next-token computation is a fixed-shape step (``LlavaQwenForCausalLM.step_logits``): on a
  GPU it is captured once per call as a CUDA graph and replayed, so a step costs one launch
  instead of one per kernel (:class:`GraphedStep`); elsewhere, or with ``cuda_graph=False``, it
  runs eagerly.
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

from aim_llava.timing import stage

logger = logging.getLogger(__name__)

HOST_LAG_STEPS = 2  # on CUDA, how many steps old the flags are that the host waits for
MIN_GRAPHED_TOKENS = 8  # shorter generations do not repay capturing a graph


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
        self.cuda = device.type == "cuda"
        self.tokens = torch.empty(steps, batch, dtype=torch.long, pin_memory=self.cuda)
        self.finished = torch.zeros(steps, dtype=torch.bool, pin_memory=self.cuda)
        self.events: list[torch.cuda.Event] = []
        self.delivered = 0

    def push(self, step: int, tokens: torch.Tensor, all_finished: torch.Tensor) -> None:
        self.tokens[step].copy_(tokens, non_blocking=self.cuda)
        self.finished[step].copy_(all_finished, non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
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


class GraphedStep:
    """A decoding step function replayed as a CUDA graph.

    The first call runs the step for real on a side stream (which also warms up cuBLAS and the
    allocator) and then captures it; later calls copy their inputs into the captured static
    tensors and replay. The graph belongs to one generation (its KV buffers), so concurrent
    calls never share one. If the capture fails, the generation goes on eagerly (logged).
    """

    def __init__(self, function: Callable[..., torch.Tensor]):
        self.function = function
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
        if self.eager:
            return self.function(*inputs)
        with stage("graph_capture", inputs[0].device):  # the warm-up step and the capture, reported apart
            self.inputs = [value.clone() for value in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = self.function(*self.inputs).clone()
            torch.cuda.current_stream().wait_stream(side)
            try:
                self.graph = self.capture(side)
            except RuntimeError as error:
                logger.warning("the decoding step could not be captured as a CUDA graph, decoding eagerly: %s", error)
                self.eager = True
        return result

    def capture(self, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        """Record the step on ``stream`` (the warm-up's side stream). ``torch.cuda.graph`` would
        first synchronise the device and empty the allocator's cache, so every generate call would
        hand the cached blocks back to the driver and the next prefill would allocate them again."""
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.output = self.function(*self.inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return graph


def step_runner(function: Callable[..., torch.Tensor], device: torch.device, use_graph: bool,
                max_new_tokens: int) -> Callable[..., torch.Tensor]:
    """``function`` as a CUDA graph where that pays (a GPU, enough steps), eagerly otherwise."""
    if use_graph and device.type == "cuda" and max_new_tokens > MIN_GRAPHED_TOKENS:
        return GraphedStep(function)
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
