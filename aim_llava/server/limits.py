"""What one request may ask of the server: every bound in one place (docs/serving.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from aim_llava.video import MediaLimits

MESSAGE_OVERHEAD_CHARS = 32  # what the chat template adds around each message ("<|im_start|>user\n...<|im_end|>\n")
# the JSON punctuation ({, [ and ,) that one message or content part needs at most, and what the
# body's other fields need
PUNCTUATION_PER_ITEM = 8
PUNCTUATION_SLACK = 1024


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds. Memory: a body of ``max_body_bytes``; media hold at most
    ``max_request_pixels`` pixels (as RGB bytes, three times that) after they are brought to the
    model's input size, and one image or frame is decoded at most ``max_image_pixels`` at a time;
    a single image is kept at its own size for the model's tiling, bounded by
    ``max_image_pixels`` only. Work:
    ``max_text_chars`` characters of text, each message counted ``MESSAGE_OVERHEAD_CHARS`` more;
    at most ``max_messages`` messages and ``max_content_parts`` content parts; ``max_tokens`` up to
    ``max_tokens_limit``; ``request_timeout_s`` from admission to the last token. Media are
    decoded by ``media_readers`` worker processes at a time (:mod:`aim_llava.server.decoding`),
    each allowed ``media_cpu_s`` CPU-seconds per media item and ``media_memory_bytes`` of memory
    beyond what it starts with. Connections: the body must arrive within ``body_timeout_s``."""

    max_body_bytes: int = 64 * 2**20
    max_data_url_bytes: int = 32 * 2**20
    max_request_pixels: int = 2**27  # ~400 MB as RGB: 910 frames at 384 x 384
    max_image_pixels: int = 2**26  # one decoded image or frame: 8192 x 8192
    max_text_chars: int = 2**20  # far beyond a 32k-token context, a bound on the tokenizer's time
    max_messages: int = 1024
    max_content_parts: int = 1024
    max_stop_sequences: int = 4
    max_tokens_limit: int = 4096
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0
    media_readers: int = 8
    media_cpu_s: float = 120.0
    media_memory_bytes: int = 3 * 2**29  # 1.5 GiB: the request's frames (~400 MB), one decoded image, the index

    def media_limits(self, frame_size: int, deadline: float | None, keep_aspect: bool = False) -> MediaLimits:
        """How one request's media are read: frames at the model's input size ``frame_size``
        (``keep_aspect``: within it, for models that take frames at their native resolution),
        within the request's and one image's pixel budgets, until ``deadline``."""
        return MediaLimits(frame_size, self.max_request_pixels, self.max_image_pixels, deadline, keep_aspect=keep_aspect)

    @property
    def max_json_punctuation(self) -> int:
        """The most ``{``, ``[`` and ``,`` bytes a body may hold, counted before it is parsed: every
        JSON value but the outermost comes first in a container (after ``{`` or ``[``) or after a
        comma, so this bounds the Python objects that parsing builds. It is what the largest
        admissible request needs: each character of text may be one of them, each message and
        content part needs a few, the other fields some."""
        return (self.max_text_chars + PUNCTUATION_PER_ITEM * (self.max_messages + self.max_content_parts)
                + PUNCTUATION_SLACK)
