"""An OpenAI-compatible HTTP server (``aim-llava serve``): a thin layer over :class:`VideoLLM`.

    aim-llava serve --model DIR --media-root /data/videos [--config aim_default] [--port 8000]
    python -m aim_llava.serve --model DIR --media-root /data/videos      (the same)

``POST /v1/chat/completions`` takes OpenAI chat messages whose content parts are ``text``,
``image_url`` and ``video_url``. Media are files (or frame directories) under ``--media-root``
(``file://`` URLs or paths, relative to the root or absolute inside it; nothing outside the root
is ever opened), or images as ``data:`` URLs; http(s) URLs are refused (the server is offline).
Several images in one request are taken as the frames of one video (what OpenAI-style clients
send for videos). Options: ``max_tokens`` (or ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop``, ``stream`` (server-sent events in OpenAI's chunk format, with
``stream_options.include_usage``), and the extras ``frames``, ``fps``, ``max_frames`` and
``config`` (a preset name or ``budget:X``); a chat without media is answered as text.
``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus) complete the API, and each
request gets an access-log line.

Every request field is treated as hostile, and memory and time per request are bounded by
design: media are decoded in worker processes stopped at the request's deadline, when its client
goes, or past their budgets (see :class:`ServerLimits` and docs/serving.md); the code lives in
:mod:`aim_llava.server`, one module per seam.
"""

import sys

from aim_llava.server.batching import warm_up
from aim_llava.server.errors import ApiError
from aim_llava.server.http import AccessPolicy, create_app, server_config
from aim_llava.server.limits import ServerLimits
from aim_llava.server.service import Service

__all__ = ["AccessPolicy", "ApiError", "ServerLimits", "Service", "create_app", "server_config", "warm_up"]

if __name__ == "__main__":
    from aim_llava.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
