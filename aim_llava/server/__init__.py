"""The OpenAI-compatible HTTP server (``aim-llava serve``), a thin layer over :class:`VideoLLM`,
in one module per seam:

* :mod:`~aim_llava.server.http`: routes, API keys, Host/Origin and framing checks, bodies, the
  access log, uvicorn's limits;
* :mod:`~aim_llava.server.body`: a body parsed into JSON values within a small multiple of its size;
* :mod:`~aim_llava.server.requests`: a request body checked field by field into a typed request;
* :mod:`~aim_llava.server.media`: files opened once under the media root, inline images, frames
  at the model's input size within the request's pixel budget;
* :mod:`~aim_llava.server.decoding`: media decoded in worker processes bounded in memory and CPU,
  killed at the deadline or when the client goes, and the pool of media readers;
* :mod:`~aim_llava.server.batching`: the model thread (batches, cancellation, token counts);
* :mod:`~aim_llava.server.service`: admission, deadlines, replies and streamed events;
* :mod:`~aim_llava.server.metrics`: the access log and the Prometheus metrics;
* :mod:`~aim_llava.server.limits`: every per-request bound.

``aim_llava.serve`` gathers the public names (and runs the server with ``python -m``).
"""
