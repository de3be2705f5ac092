"""What the server says about its work: one access-log line per HTTP request (logger
``aim_llava.access``, at INFO) and Prometheus metrics at ``GET /metrics``, written in
Prometheus' text format (version 0.0.4) without a client library.

A log line reads
``POST /v1/chat/completions 200 id=chatcmpl-... prompt_tokens=412 visual_tokens=392
completion_tokens=8 ttft_s=0.412 latency_s=0.950`` (token fields and ``ttft_s`` only for a reply
the model gave; ``-`` for an id the request never got).
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field

from aim_llava.errors import one_line
from aim_llava.reuse_cache import KINDS, CacheCounts
from aim_llava.server.errors import cut

access_log = logging.getLogger("aim_llava.access")
access_log.setLevel(logging.INFO)  # on wherever the server's log is shown; silence it with setLevel(WARNING)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Outcome:
    """What one request came to, filled in as it is answered: the completion's id, its token
    counts and the seconds from its arrival to its first new token."""

    id: str | None = None
    prompt_tokens: int | None = None
    visual_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None

    def fields(self) -> str:
        words = [f"id={self.id or '-'}"]
        if self.completion_tokens is not None:
            words += [f"prompt_tokens={self.prompt_tokens}", f"visual_tokens={self.visual_tokens}",
                      f"completion_tokens={self.completion_tokens}", f"ttft_s={self.first_token_s:.3f}"]
        return " ".join(words)


def log_access(method: str, path: str, status: int, latency_s: float, outcome: Outcome) -> None:
    """The request's access-log line (its path cut and escaped: a client chose it)."""
    access_log.info("%s %s %d %s latency_s=%.3f", one_line(cut(method)), one_line(cut(path)), status,
                    outcome.fields(), latency_s)


@dataclass
class Histogram:
    """Observations counted in cumulative buckets, as Prometheus has them."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}} {cumulative}')
        return lines + [f"{name}_sum {self.total:.6f}", f"{name}_count {cumulative}"]


def family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class ServerMetrics:
    """The counters and histograms of chat completions (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.tokens = {"prompt": 0, "visual": 0, "generation": 0}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(TTFT_BUCKETS)

    def observe(self, status: int, latency_s: float, outcome: Outcome) -> None:
        """Counts one chat completion request that got ``status`` after ``latency_s``."""
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(latency_s)
            if outcome.completion_tokens is not None:
                self.tokens["prompt"] += outcome.prompt_tokens
                self.tokens["visual"] += outcome.visual_tokens
                self.tokens["generation"] += outcome.completion_tokens
                self.first_token.observe(outcome.first_token_s)

    def render(self, gauges: dict[str, tuple[str, int]], cache: CacheCounts | None) -> str:
        """The metrics in Prometheus' text format; ``gauges``: name -> (help, value), read now."""
        with self.lock:
            lines = family("aim_llava_requests_total", "counter", "Chat completion requests, by HTTP status.",
                           [f'aim_llava_requests_total{{status="{status}"}} {count}'
                            for status, count in sorted(self.requests.items())])
            for kind, count in self.tokens.items():
                name = f"aim_llava_{kind}_tokens_total"
                lines += family(name, "counter", f"{kind.capitalize()} tokens of the replies given.",
                                [f"{name} {count}"])
            lines += family("aim_llava_request_latency_seconds", "histogram",
                            "Seconds from a chat completion's arrival to its last byte.",
                            self.latency.lines("aim_llava_request_latency_seconds"))
            lines += family("aim_llava_time_to_first_token_seconds", "histogram",
                            "Seconds from a chat completion's arrival to its first new token.",
                            self.first_token.lines("aim_llava_time_to_first_token_seconds"))
        for name, (help_text, value) in gauges.items():
            lines += family(name, "gauge", help_text, [f"{name} {value}"])
        if cache is not None:
            for what, counts, found in (("hits", cache.hits, "an entry"), ("misses", cache.misses, "none")):
                name = f"aim_llava_cache_{what}_total"
                lines += family(name, "counter", f"Reuse cache look-ups that found {found}, by kind.",
                                [f'{name}{{kind="{kind}"}} {counts[kind]}' for kind in KINDS])
        return "\n".join(lines) + "\n"
