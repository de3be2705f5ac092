"""A request body checked field by field into a typed :class:`ChatRequest`, before anything is
read or computed: every field is hostile, every count and size is bounded (see
:class:`~aim_llava.server.limits.ServerLimits`), and a refusal is a 4xx in OpenAI's shape that
quotes at most a few dozen characters of what the client sent."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from aim_llava.conversation import check_text
from aim_llava.errors import AimLlavaError, InputError
from aim_llava.reduction.budget import parse_budget
from aim_llava.reduction.config import ReductionConfig, available_presets
from aim_llava.server.errors import ApiError, bad, shown
from aim_llava.server.limits import MESSAGE_OVERHEAD_CHARS, ServerLimits
from aim_llava.server.media import RequestMedia, file_media, inline_image
from aim_llava.video import MAX_FRAMES

MAX_CACHED_CONFIGS = 256
MAX_CONFIG_CHARS = 1024  # far beyond any preset name or budget spelling
MAX_STOP_CHARS = 256  # of one stop sequence (each is searched in the reply and held back while streaming)
ROLES = ("system", "user", "assistant")
# OpenAI fields this server does not implement, with the values that leave a reply as it would be
# without them: any other value is refused rather than silently ignored (other unknown fields,
# such as user or metadata, change nothing and are ignored)
NEUTRAL_VALUES = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request whose every field has been checked (nothing read yet)."""

    turns: list[tuple[str, str | None]]
    system: str | None
    media: RequestMedia
    config: ReductionConfig
    sampling: dict
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation(self) -> dict:
        if self.greedy:
            return {}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param, "too_large")


def integer(body: dict, name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be a whole number", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must lie in [{low}, {high}], got {shown(value)}", name)
    return value


def number(body: dict, name: str, low: float, high: float, default: float | None = None,
           low_open: bool = False) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad(f"'{name}' must lie in {interval}, got {shown(value)}", name)
    return float(value)


def flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"'{param or name}' must be true or false", param or name)
    return value


def stop_sequences(body: dict, limit: int) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or len(values) > limit or not all(isinstance(v, str) and v for v in values):
        raise bad(f"'stop' must be a non-empty string or a list of at most {limit} of them", "stop")
    if any(len(v) > MAX_STOP_CHARS for v in values):
        raise bad(f"a stop sequence may hold at most {MAX_STOP_CHARS} characters", "stop")
    return values


def check_n(body: dict) -> None:
    """``n`` (choices per request): only its default 1, refused in OpenAI's words otherwise."""
    value = body.get("n")
    if value is None or (value == 1 and not isinstance(value, bool)):
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad("'n' must be a whole number", "n")
    raise bad(f"Unsupported value: 'n' does not support {shown(value)} with this model. Only the default (1) value "
              "is supported.", "n", "unsupported_value")


def unicode_text(text: str, param: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogate, which a JSON ``\\ud800`` escape
    gives): the tokenizer takes nothing else."""
    try:
        return check_text(text, f"the text of {param}")
    except InputError as err:
        raise bad(str(err), param) from None


def part_url(part: dict, kind: str, param: str) -> str:
    value = part.get(kind)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"a {kind} part needs a url", param)
    return url


ONE_VISUAL = "a request may show one video (or one image, or the frames of one video)"


def message_parts(message, param: str) -> tuple[str, list]:
    """(role, content parts) of one message."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise bad(f"{param} must be an object with a role in {', '.join(ROLES)}", param)
    content = message.get("content")
    if isinstance(content, str):
        return message["role"], [{"type": "text", "text": content}]
    if isinstance(content, list):
        return message["role"], content
    raise bad(f"{param}.content must be a string or a list of content parts", param)


def parse_messages(messages, limits: ServerLimits) -> tuple[list[tuple[str, str | None]], RequestMedia, str | None]:
    """(turns [(user text, assistant text or None)], media (none for a text-only chat), system
    prompt) of the messages; the counts are bounded before the parts are looked at, the text is
    counted with the chat template's overhead for each message, and must be valid Unicode."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise too_large(f"the request holds {len(messages):,} messages; the server takes at most "
                        f"{limits.max_messages:,}", "messages")
    media, system, texts, parts_seen = RequestMedia(), None, [], 0
    for position, message in enumerate(messages):
        param = f"messages[{position}]"
        role, parts = message_parts(message, param)
        parts_seen += len(parts)
        if parts_seen > limits.max_content_parts:
            raise too_large(f"the messages hold more than {limits.max_content_parts:,} content parts", "messages")
        text = []
        for index, part in enumerate(parts):
            where = f"{param}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.text must be a string", where)
                text.append(unicode_text(part["text"], where))
            elif kind in ("image_url", "video_url"):
                add_media(media, kind, part, role, where, limits)
            else:
                raise bad(f"{where}: unknown content type {shown(kind)} (use text, image_url or video_url)", where,
                          "unknown_content_type")
        if role == "system":
            if position != 0:
                raise bad("a system message may only come first", param)
            system = "\n".join(text)
        else:
            texts.append((role, "\n".join(text)))
    characters = sum(len(text) for _, text in texts) + len(system or "") + MESSAGE_OVERHEAD_CHARS * len(messages)
    if characters > limits.max_text_chars:
        raise too_large(f"the messages hold {characters:,} characters of text (with {MESSAGE_OVERHEAD_CHARS} for "
                        f"each message's template); the server takes at most {limits.max_text_chars:,}", "messages")
    return alternating_turns(texts), media, system


def add_media(media: RequestMedia, kind: str, part: dict, role: str, where: str, limits: ServerLimits) -> None:
    if role != "user":
        raise bad(f"{where}: images and videos belong in user messages", where)
    if media.video is not None or (kind == "video_url" and media.images):
        raise bad(ONE_VISUAL, where)
    url = part_url(part, kind, where)
    if kind == "video_url":
        media.video = file_media(url, where)
    else:
        media.images.append(inline_image(url, where, limits.max_data_url_bytes) if url.startswith("data:")
                            else file_media(url, where))


def alternating_turns(texts: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    turns = []
    for position, (role, text) in enumerate(texts):
        if role != ("user" if position % 2 == 0 else "assistant"):
            raise bad("after an optional system message, user and assistant messages must alternate, starting and "
                      "ending with a user message", "messages")
        if role == "user":
            turns.append((text, None))
        else:
            turns[-1] = (turns[-1][0], text)
    if not texts or texts[-1][0] != "user":
        raise bad("the last message must come from the user", "messages")
    return turns


class RequestParser:
    """Checks request bodies for one loaded model (its context, presets, frame limits)."""

    def __init__(self, llm, model_name: str, limits: ServerLimits):
        self.llm, self.model_name, self.limits = llm, model_name, limits
        self.presets = set(available_presets())
        # every spelling of a budget is a new key: the cache of resolved configs stays bounded
        self.resolve_config = functools.lru_cache(maxsize=MAX_CACHED_CONFIGS)(self._resolve_config)

    def reduction(self, spec) -> ReductionConfig:
        """The reduction config a request's ``config`` names (the server's default when absent)."""
        if spec is None:
            return self.llm.reduction
        if not isinstance(spec, str) or not spec or len(spec) > MAX_CONFIG_CHARS:
            raise bad(f"'config' must be a preset name or budget:FRACTION (at most {MAX_CONFIG_CHARS} characters)",
                      "config")
        return self.resolve_config(spec)

    def _resolve_config(self, spec: str) -> ReductionConfig:
        if spec.strip().lower().startswith("budget:"):
            try:
                parse_budget(spec)
            except AimLlavaError as err:
                raise bad(str(err), "config") from None
        elif spec not in self.presets:
            raise bad(f"unknown config {shown(spec)}: use one of {', '.join(sorted(self.presets))} or budget:FRACTION",
                      "config")
        try:
            return self.llm.resolve(spec)
        except AimLlavaError as err:
            raise bad(str(err), "config") from None

    def parse(self, body) -> ChatRequest:
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(404, f"model {shown(model)} is not served here (this server serves {self.model_name!r})",
                           "model", "model_not_found")
        check_n(body)
        for name, neutral in NEUTRAL_VALUES.items():
            value = body.get(name)
            if not any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral):
                raise bad(f"'{name}' is not supported by this server (leave it out)", name, "unsupported_parameter")
        turns, media, system = parse_messages(body.get("messages"), self.limits)
        most = min(self.llm.model.config.max_length, self.limits.max_tokens_limit)
        max_tokens = integer(body, "max_completion_tokens", 1, most)
        max_tokens = integer(body, "max_tokens", 1, most, max_tokens or self.llm.generation.max_new_tokens)
        config = self.reduction(body.get("config"))
        self.check_frames_as_images(len(media.images), config)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        return ChatRequest(
            turns=turns, system=system, media=media, config=config, sampling=self.sampling(body),
            max_tokens=max_tokens, temperature=number(body, "temperature", 0.0, 2.0, 0.0),
            top_p=number(body, "top_p", 0.0, 1.0, None, True), seed=integer(body, "seed", -(2**63), 2**63 - 1),
            stop=stop_sequences(body, self.limits.max_stop_sequences), stream=flag(body, "stream"),
            include_usage=flag(options, "include_usage", "stream_options.include_usage"),
        )

    @staticmethod
    def sampling(body: dict) -> dict:
        """The request's frame sampling (``frames``, ``fps``, ``max_frames``) as SamplingOptions fields."""
        sampling = {"num_frames": integer(body, "frames", 1, MAX_FRAMES),
                    "fps": number(body, "fps", 0.0, 1000.0, low_open=True),
                    "max_frames": integer(body, "max_frames", 1, MAX_FRAMES)}
        return {name: value for name, value in sampling.items() if value is not None}

    def check_frames_as_images(self, count: int, config: ReductionConfig) -> None:
        """Several images are the frames of a video: they must fit the context, and the pixel
        budget at the model's input size (checked before any is decoded)."""
        if count < 2:
            return
        if count > (limit := self.llm.frame_limit(config)):
            raise bad(f"{count} images as frames but at most {limit} fit in the model's context", "messages")
        size = self.llm.image_processor.image_size
        if count * size**2 > self.limits.max_request_pixels:
            raise bad(f"{count} images as frames hold {count * size**2:,} pixels at the model's input size "
                      f"{size}x{size}, more than the {self.limits.max_request_pixels:,} a request may hold", "messages")
