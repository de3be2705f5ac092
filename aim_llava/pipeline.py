"""High-level API: point it at a video (or image) and get a caption or an answer.

>>> llm = VideoLLM.from_pretrained("model/llava-onevision-qwen2-7b-ov", reduction="baseline")
>>> llm.caption("clip.mp4")
>>> llm.caption("clip.mp4", reduction="aim_default")   # another reduction for this call only
>>> llm.caption(["a.mp4", "b.mp4", "c.mp4"], batch_size=4)   # read ahead, encoded and generated together
>>> session = llm.chat("clip.mp4")          # the video is encoded once
>>> session.ask("Who is in it?"); session.ask("What do they do next?")

Frames are read on the host (in worker threads when several items are given), then travel once as
uint8 to the model's device, where they are resized and normalised, encoded and merged; the
prompts of a batch are generated together.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aim_llava.capabilities import device_failure, is_device_failure, out_of_memory
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.errors import DeviceFailure, InputError, NonFiniteOutputError
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.model.builder import load_pretrained_model
from aim_llava.model.families import family_of
from aim_llava.model.language_model.llava_qwen import GenerationOutput
from aim_llava.prefetch import batches, read_ahead
from aim_llava.prefix_cache import PrefixPrefill
from aim_llava.reduction.budget import check_reduction_spec, resolve_reduction
from aim_llava.reduction.config import ReductionConfig
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord
from aim_llava.reduction.provenance import TokenOrigins
from aim_llava.reuse_cache import DEFAULT_CACHE_MB, ReuseCache
from aim_llava.timing import stage
from aim_llava.video import (
    FRAME_RULES,
    MAX_FRAMES,
    MediaLimits,
    VideoClip,
    VideoError,
    is_image_file,
    load_video,
    qwen_even_count,
    uniform_frame_count,
    validate_sampling,
)
from aim_llava.visual_cache import keyed, source_key, visual_key, without_pixels

logger = logging.getLogger("aim_llava.cache")

DEFAULT_CAPTION_PROMPT = "Please describe this video in detail."
DEFAULT_IMAGE_CAPTION_PROMPT = "Please describe this image in detail."


@dataclass
class SamplingOptions:
    """How frames are taken from a video (see :func:`aim_llava.video.load_video`); the model's
    family sets ``frame_rule``."""

    num_frames: int = 32
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    backend: str = "auto"
    frame_rate: float = 1.0  # the frames per second of a directory of frame images
    frame_rule: str = "llava"

    def __post_init__(self) -> None:
        validate_sampling(self.num_frames, self.fps, self.max_frames, self.start, self.end, self.frame_rate)
        if self.frame_rule not in FRAME_RULES:
            raise VideoError(f"unknown frame rule {self.frame_rule!r}; use one of {', '.join(FRAME_RULES)}")

    def frame_count(self) -> int | None:
        """The frames every video gives (the frame rule applied to ``num_frames`` and
        ``max_frames``), or None when sampling by ``fps``, which gives each video its own."""
        if self.fps is not None:
            return None
        count = uniform_frame_count(self.num_frames, self.max_frames)
        return qwen_even_count(count) if self.frame_rule == "qwen" else count


@dataclass
class GenerationOptions:
    """How replies are generated; ``seed`` makes sampling reproducible; ``cuda_graph=False``
    decodes eagerly on a GPU too."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    cuda_graph: bool = True
    seed: int | None = None


@dataclass
class EncodedVisual:
    """A video or image after the vision tower and projector (and the reduction's merging),
    ready to be reused across prompts with the same reduction. ``key``: its key in the model's
    reuse cache (None without the cache); ``cached``: it came from there (``encode_seconds`` is
    then 0); ``origins``: where each token came from, when asked for (``with_origins``)."""

    clip: VideoClip
    features: torch.Tensor
    modality: str
    encode_seconds: float
    reduction: ReductionConfig
    key: tuple | None = None
    cached: bool = False
    origins: TokenOrigins | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Response:
    """A reply; ``first_token_s`` is the time from the call to the first new token (prefill);
    ``reduction`` is what token reduction did in this call."""

    text: str
    num_new_tokens: int
    visual_tokens: int
    seconds: float
    first_token_s: float
    reduction: ReductionRecord
    ended_by_eos: bool = False
    prompt_tokens: int = 0


@dataclass
class Request:
    """One item of :meth:`VideoLLM.run`: a video (path, clip or encoded) and the conversation
    turns [(question, answer or None)]; None asks for a caption (the default request for the
    video's modality)."""

    source: str | Path | VideoClip | EncodedVisual
    turns: list[tuple[str, str | None]] | None = None
    stream: Callable[[str], None] | None = None
    max_new_tokens: int | None = None
    system: str | None = None
    cancelled: Callable[[], bool] | None = None  # asked once a decoding step: True ends this item's reply


@dataclass
class Result:
    """What became of a :class:`Request`: the encoded video and the response, or the error."""

    request: Request
    visual: EncodedVisual | None = None
    response: Response | None = None
    error: BaseException | None = None

    @property
    def question(self) -> str | None:
        """The first question asked (the caption request for requests without turns)."""
        if self.request.turns:
            return self.request.turns[0][0]
        if self.visual is not None:
            return default_caption_prompt(self.visual.modality == "image")
        source = self.request.source
        return default_caption_prompt(isinstance(source, (str, Path)) and is_image_file(source))


class RequestCancelled(InputError):
    """A request whose ``cancelled()`` said True before its prefill: it was not answered."""


class BatchError(InputError):
    """Some items of a list failed; ``results`` holds every item's :class:`Result`."""

    def __init__(self, results: list[Result]):
        failed = [r for r in results if r.error is not None]
        first = failed[0]
        source = first.request.source
        super().__init__(f"{len(failed)} of {len(results)} items failed; the first, "
                         f"{source if isinstance(source, (str, Path)) else 'an item'}: {first.error}")
        self.results = results


def default_caption_prompt(image: bool) -> str:
    return DEFAULT_IMAGE_CAPTION_PROMPT if image else DEFAULT_CAPTION_PROMPT


def time_instruction(clip: VideoClip) -> str:
    """LLaVA-Video's statement of the duration and frame times (its exact wording)."""
    times = ",".join(f"{t:.2f}s" for t in clip.timestamps)
    return (
        f"The video lasts for {clip.duration:.2f} seconds, and {len(clip.timestamps)} frames are uniformly "
        f"sampled from it. These frames are located at {times}.Please answer the following questions related "
        "to this video."
    )


class IncrementalText:
    """Decodes a growing token list and hands each new piece of text to a callback."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        if len(text) > self.printed:
            self.callback(text[self.printed :])
            self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.callback(text[self.printed :])
        self.printed = len(text)


class TextStreamer:
    """Transformers' streamer protocol over a batch: row b's new tokens become text for
    ``callbacks[b]`` (None: not streamed), up to its EOS or its token limit."""

    def __init__(self, tokenizer, callbacks: list[Callable[[str], None] | None], eos: set[int],
                 limits: list[int | None]):
        self.rows = [IncrementalText(tokenizer, callback) if callback else None for callback in callbacks]
        self.eos, self.limits = eos, limits
        self.counts = [0] * len(callbacks)
        self.open = [callback is not None for callback in callbacks]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.flatten().tolist()):
            if not self.open[row]:
                continue
            self.counts[row] += 1
            self.rows[row].add([token])
            if token in self.eos or self.counts[row] == self.limits[row]:
                self.open[row] = False

    def end(self) -> None:
        for row in self.rows:
            if row is not None:
                row.finish()


class StreamOnce:
    """A request's stream across attempts (a batch that fails is answered again one by one): an
    attempt's text is passed on only beyond what earlier attempts already passed on, so no text is
    streamed twice."""

    def __init__(self, callback: Callable[[str], None]):
        self.callback, self.given, self.attempt = callback, 0, ""

    def restart(self) -> None:
        self.attempt = ""

    def __call__(self, text: str) -> None:
        self.attempt += text
        if len(self.attempt) > self.given:
            self.callback(self.attempt[self.given:])
            self.given = len(self.attempt)


def cancellation_watch(checks: list[Callable[[], bool] | None]) -> Callable[[], list[int]] | None:
    """The rows whose check has newly said True, each named once (None when nothing is watched)."""
    watched = {row: check for row, check in enumerate(checks) if check is not None}
    if not watched:
        return None

    def cancelled_rows() -> list[int]:
        rows = [row for row, check in watched.items() if check()]
        for row in rows:
            del watched[row]
        return rows

    return cancelled_rows


class TokenClock:
    """A streamer that notes when each new token arrives and passes everything on."""

    def __init__(self, inner=None):
        self.inner = inner
        self.times: list[float] = []
        self.prompt_seen = False

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def family_sampling(family, processor, sampling: SamplingOptions | dict | None) -> SamplingOptions:
    """Sampling options for a model of ``family`` with ``processor``: the options given, with the
    family's frame rule; a mapping of fields changes the family's default (given ``num_frames`` or
    ``fps``, the default's own counts do not apply)."""
    if isinstance(sampling, SamplingOptions):
        fields = dataclasses.asdict(sampling)
    else:
        sampling = dict(sampling or {})
        counts = "num_frames" in sampling or "fps" in sampling
        fields = {**({} if counts else family.default_sampling(processor)), **sampling}
    return SamplingOptions(**family.sampling(fields))


class VideoLLM:
    """A loaded model plus the choices of how to sample, prompt and reduce.

    ``reduction`` is the default of every call; each method also takes ``reduction=`` (a preset
    name, YAML path, ``budget:X``, mapping or config) for that call alone. The model holds no
    per-call state, so calls with different reductions may run at the same time.

    ``cache_mb`` bounds the reuse cache (device memory; 0 turns it off): encoded videos are kept
    there by what determines them (the file's identity or the frames' digest, sampling,
    preprocessing, dtype, device, the reduction's merging), so another question about the same
    clip skips reading, decoding and the vision tower; with ``prefix_reuse`` the keys and values
    of the prompt's prefix (system text and video) are kept too, in the decoder layers before the
    first one whose reduction reads the question, and only the question is prefilled there.
    """

    def __init__(
        self,
        tokenizer,
        model,
        image_processor,
        reduction: str | dict | ReductionConfig | None = None,
        sampling: SamplingOptions | dict | None = None,
        generation: GenerationOptions | None = None,
        conv_template: str = "qwen_1_5",
        time_aware: bool = False,
        cache_mb: float = DEFAULT_CACHE_MB,
        prefix_reuse: bool = True,
    ):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.family = family_of(model.config)
        if cache_mb < 0:
            raise InputError(f"the cache size must be at least 0 MB (0 turns the cache off), got {cache_mb}")
        self.cache = ReuseCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self.prefix_reuse = prefix_reuse
        self.sampling = self.sampling_options(sampling)
        self._plans: dict[ReductionConfig, ReductionPlan] = {}
        self.reduction = self.resolve(reduction if reduction is not None else "baseline")
        self.generation = generation or GenerationOptions()
        self.conv_template = conv_template
        self.family.check_template(conv_template)
        self.time_aware = time_aware

    def sampling_options(self, sampling: SamplingOptions | dict | None) -> SamplingOptions:
        """The options given, with the family's frame rule (:func:`family_sampling`)."""
        return family_sampling(self.family, self.image_processor, sampling)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        reduction: str | ReductionConfig | None = "baseline",
        device="auto",
        dtype="auto",
        attn_implementation: str = "sdpa",
        conv_template: str = "qwen_1_5",
        time_aware: bool = False,
        sampling: SamplingOptions | dict | None = None,
        generation: GenerationOptions | None = None,
        cache_mb: float = DEFAULT_CACHE_MB,
        prefix_reuse: bool = True,
    ) -> VideoLLM:
        """Load a local checkpoint directory (either layout) with a reduction preset or config.

        ``reduction="budget:0.15"`` picks the AIM setting that fits 15% of the baseline's prefill
        FLOPs for this model at the sampling's frame count (``max_frames`` when sampling by fps).
        ``cache_mb`` and ``prefix_reuse``: the reuse cache (see the class). ``sampling``: options, a
        mapping of the fields to change in the model's own rule (32 frames for LLaVA-OneVision, 2 a
        second for Qwen2.5-VL), or None for that rule.
        """
        check_reduction_spec(reduction)
        tokenizer, model, processor, _ = load_pretrained_model(
            path, device_map=device, torch_dtype=dtype, attn_implementation=attn_implementation
        )
        return cls(tokenizer, model, processor, reduction, sampling, generation, conv_template, time_aware, cache_mb,
                   prefix_reuse)

    def resolve(self, reduction: str | dict | ReductionConfig | None) -> ReductionConfig:
        """A call's reduction config (None: the default); ``budget:X`` is solved for this model at
        the sampling's frame count (``max_frames`` when sampling by fps)."""
        if reduction is None:
            return self.reduction
        frames = self.sampling.max_frames or self.sampling.num_frames
        return resolve_reduction(reduction, self.model.config, frames)

    def plan(self, config: ReductionConfig) -> ReductionPlan:
        """The built plan of a config (built once per config; one the model's family cannot run is
        refused)."""
        if config not in self._plans:
            plan = config.build(self.model.config.text.num_hidden_layers)
            self.family.check_reduction(plan)
            self._plans[config] = plan
        return self._plans[config]

    def frame_limit(self, config: ReductionConfig) -> int:
        """The most frames whose visual tokens (after this reduction's merging) fit the context."""
        return self.family.frame_limit(self.model.config, self.plan(config))

    def load(self, source: str | Path | VideoClip, reduction=None, limits: MediaLimits | None = None,
             reader: Callable[..., VideoClip] = load_video, **sampling) -> VideoClip:
        """Read the sampled frames (on the host; safe in worker threads). A sampling that cannot
        fit the model's context is refused before any frame is decoded; ``limits``: the source is
        untrusted (see :class:`aim_llava.video.MediaLimits`); ``reader``: what reads it, called as
        :func:`~aim_llava.video.load_video` (the server's reads it in a worker process)."""
        if isinstance(source, VideoClip):
            return source
        options = dataclasses.replace(self.sampling, **sampling)
        return reader(source, options.num_frames, options.fps, options.max_frames, options.start, options.end,
                      options.backend, frame_limit=self.frame_limit(self.resolve(reduction)), limits=limits,
                      frame_rate=options.frame_rate, frame_rule=options.frame_rule)

    def read(self, source: str | Path | VideoClip | EncodedVisual, reduction=None, limits: MediaLimits | None = None,
             reader: Callable[..., VideoClip] = load_video, **sampling) -> VideoClip | EncodedVisual:
        """What encoding ``source`` needs: its encoded visual when the reuse cache holds it (a file
        is recognised by its identity, before any frame is decoded), otherwise its frames, read
        as :meth:`load` does (safe in worker threads). Frames read under ``limits`` are resized as
        they are decoded, so the limits (but their deadline) are part of the key, and a directory
        of more than :data:`~aim_llava.video.MAX_FRAMES` entries is refused before its key is built."""
        config = self.resolve(reduction)
        if isinstance(source, EncodedVisual):
            return self.check_encoded(source, config)
        if self.cache is None or isinstance(source, VideoClip):
            return self.load(source, config, limits, reader, **sampling)
        options = dataclasses.replace(self.sampling, **sampling)
        reading = dataclasses.astuple(options), dataclasses.replace(limits, deadline=None) if limits else None
        try:
            key = source_key(source, reading, MAX_FRAMES if limits is not None else None)
        except OSError:
            return self.load(source, config, limits, reader, **sampling)  # missing or unreadable: load says so
        visual = self.cached_visual(self.visual_cache_key(key, config), config, count_miss=False)
        return visual if visual is not None else keyed(self.load(source, config, limits, reader, **sampling), key)

    def preprocessing_key(self) -> tuple:
        """What of the processor and the model's config decides how frames become visual tokens
        (read at each look-up: a processor or config changed in place is a miss, never a stale hit)."""
        return self.family.preprocessing_key(self.image_processor, self.model.config)

    def visual_cache_key(self, source: tuple, config: ReductionConfig) -> tuple:
        """The reuse cache's key of the visual of ``source`` (a :func:`source_key`) under ``config``."""
        return visual_key(source, self.preprocessing_key(), self.model.dtype, self.model.device,
                          self.plan(config).visual_key())

    def cached_visual(self, key: tuple, config: ReductionConfig, count_miss: bool = True) -> EncodedVisual | None:
        """The cached visual under ``key`` (a :meth:`visual_cache_key`), made ``config``'s, if any."""
        visual = self.cache.get(key, count_miss)
        if visual is None:
            return None
        return dataclasses.replace(visual, reduction=config, encode_seconds=0.0, cached=True)

    @torch.no_grad()
    def encode(self, source: str | Path | VideoClip | EncodedVisual, reduction=None, with_origins: bool = False,
               **sampling) -> EncodedVisual:
        """Read and encode a video (or image) once; the result can be passed to :meth:`ask` (with
        the same reduction). With the reuse cache, a clip encoded before comes from there.
        ``with_origins``: also say where each visual token came from (``EncodedVisual.origins``;
        None where the reduction does not say)."""
        config = self.resolve(reduction)
        item = self.read(source, config, **sampling)
        if isinstance(item, EncodedVisual):
            if not with_origins or item.origins is not None:
                return item
            if isinstance(source, EncodedVisual):
                raise InputError("this video was encoded without the origins of its tokens: encode it again with "
                                 "with_origins=True")
            item = self.load(source, config, **sampling)  # cached without its origins: encoded again
        return self.encode_clips([item], config, with_origins)[0]

    @staticmethod
    def check_encoded(visual: EncodedVisual, config: ReductionConfig) -> EncodedVisual:
        if visual.reduction != config:
            raise InputError(
                f"this video was encoded for reduction {visual.reduction.name!r}, not {config.name!r}: "
                "encode it again with the reduction you want"
            )
        return visual

    @torch.no_grad()
    def encode_clips(self, clips: list[VideoClip], config: ReductionConfig, with_origins: bool = False
                     ) -> list[EncodedVisual]:
        """Encode read clips together: video frames are resized and normalised on the model's
        device, and every view of every clip goes through the vision tower in one pass. With the
        reuse cache, clips it holds (or that appear twice) are encoded once, and new ones stored;
        ``with_origins`` (see :meth:`encode`) encodes again a clip cached without them."""
        if self.cache is None:
            return self.encode_uncached(clips, config, with_origins)
        sources = [source_key(clip) for clip in clips]
        first_clips = dict(zip(reversed(sources), reversed(clips)))  # each source's first clip
        keys = {source: self.visual_cache_key(source, config) for source in first_clips}
        visuals: dict[tuple, EncodedVisual | None] = {}
        for source in sources:
            if source in visuals:
                self.cache.count_hit("visual")
            else:
                visual = self.cached_visual(keys[source], config)
                visuals[source] = None if with_origins and visual is not None and visual.origins is None else visual
        missing = [source for source, visual in visuals.items() if visual is None]
        encoded = self.encode_uncached([first_clips[source] for source in missing], config,
                                       with_origins) if missing else []
        for source, visual in zip(missing, encoded):
            visual.key = keys[source]
            stored = dataclasses.replace(visual, clip=without_pixels(visual.clip))
            self.cache.put(visual.key, stored, visual.features.nbytes)
            visuals[source] = visual
        return [visuals[source] for source in sources]

    def encode_uncached(self, clips: list[VideoClip], config: ReductionConfig, with_origins: bool = False
                        ) -> list[EncodedVisual]:
        plan = self.plan(config)
        started = time.perf_counter()
        pixels, sizes, modalities = [], [], []
        with stage("preprocess", self.model.device):
            for clip in clips:
                clip_pixels, size, modality = self.family.preprocess(clip, self.image_processor, self.model)
                pixels.append(clip_pixels)
                sizes.append(size)
                modalities.append(modality)
        if with_origins:
            features, origins = self.model.visual_features_with_origins(pixels, sizes, modalities, plan)
        else:
            features, origins = self.model.visual_features(pixels, sizes, modalities, plan), [None] * len(clips)
        seconds = time.perf_counter() - started
        return [EncodedVisual(clip, feature, modality, seconds, config, origins=origin)
                for clip, feature, modality, origin in zip(clips, features, modalities, origins)]

    def prompt(self, visual: EncodedVisual | None, turns: list[tuple[str, str | None]],
               system: str | None = None) -> str:
        """The chat prompt for ``turns`` [(question, answer or None)], visual marker in the first
        (none for a text-only conversation, ``visual`` None); ``system`` replaces the template's
        system message. The model's family builds it."""
        if visual is not None and self.time_aware and visual.modality == "video":
            turns = [(f"{time_instruction(visual.clip)}\n{turns[0][0]}", turns[0][1]), *turns[1:]]
        return self.family.prompt(turns, None if visual is None else visual.modality, system, self.conv_template,
                                  self.tokenizer, self.image_processor)

    def respond(self, visual: EncodedVisual, turns: list[tuple[str, str | None]],
                stream: Callable[[str], None] | None = None, **generation) -> Response:
        """Generate the reply to ``turns`` about an encoded video; ``stream`` gets the text as it
        is generated."""
        return self.respond_many([visual], [turns], stream, **generation)[0]

    @torch.no_grad()
    def respond_many(self, visuals: list[EncodedVisual], turns: list[list[tuple[str, str | None]]],
                     stream: Callable[[str], None] | list[Callable[[str], None] | None] | None = None,
                     limits: list[int | None] | None = None, systems: list[str | None] | None = None,
                     cancelled: list[Callable[[], bool] | None] | None = None, **generation) -> list[Response]:
        """Generate the replies of several conversations together (one left-padded batch; the
        visuals must share one reduction; a visual of None is a text-only conversation, and a
        batch of them only is generated without reduction). ``stream``: one callback, or one per
        conversation (None: not streamed), that gets the text as it is generated. ``limits``: per-conversation
        token limits below the batch's ``max_new_tokens`` (a conversation that reaches its own
        stops taking part); ``systems``: per-conversation system messages; ``cancelled``:
        per-conversation checks, asked once a step, whose True ends that reply where it is.
        Conversations whose logits became NaN or infinite get no reply: a
        :class:`~aim_llava.errors.NonFiniteOutputError` names them, with the others' replies as
        its ``partial`` (None in their place)."""
        options = dataclasses.replace(self.generation, **generation)
        configs = {visual.reduction for visual in visuals if visual is not None} or {ReductionConfig()}
        if len(configs) != 1:
            raise InputError("the items of one batch must be encoded with the same reduction")
        callbacks = stream if isinstance(stream, list) else [stream] * len(visuals)
        if len(callbacks) != len(visuals) or (callable(stream) and len(visuals) != 1):
            raise InputError("give one stream callback per conversation (a single one streams a single conversation)")
        limits = [min(limit or options.max_new_tokens, options.max_new_tokens) for limit in limits or [None] * len(visuals)]
        systems = systems or [None] * len(visuals)
        prompts = [tokenizer_image_token(self.prompt(v, t, system), self.tokenizer)
                   for v, t, system in zip(visuals, turns, systems)]
        ids, mask = left_padded(prompts, self.model.generation_defaults.pad_token_id)
        eos = set(self.model.generation_defaults.eos_token_ids)
        streamer = TextStreamer(self.tokenizer, callbacks, eos, limits) if any(callbacks) else None
        clock = TokenClock(streamer)
        generator = None
        if options.do_sample and options.seed is not None:
            generator = torch.Generator(self.model.device).manual_seed(options.seed)
        reduction = self.plan(configs.pop())
        started = time.perf_counter()

        def generate():  # run again, with a fresh prefill, after memory was freed
            return self.model.generate(
                ids,
                attention_mask=mask,
                visual_features=[visual.features for visual in visuals if visual is not None],
                max_new_tokens=limits,
                do_sample=options.do_sample,
                temperature=options.temperature,
                top_p=options.top_p,
                generator=generator,
                streamer=clock,
                cuda_graph=options.cuda_graph,
                reduction=reduction,
                return_dict_in_generate=True,
                cancelled_rows=cancellation_watch(cancelled or []),
                prefill=self.prefix_prefill(visuals, prompts),
            )

        try:
            output, broken = self.within_memory(generate, clock), None
        except NonFiniteOutputError as error:
            output, broken = error.partial, error
        elapsed = time.perf_counter() - started
        first = (clock.first or started + elapsed) - started
        responses = []
        for row, (visual, tokens) in enumerate(zip(visuals, output.sequences.tolist())):
            if broken is not None and row in broken.rows:
                responses.append(None)
                continue
            tokens = tokens[: limits[row]]
            ended = next((i + 1 for i, token in enumerate(tokens) if token in eos), None)
            kept = tokens[:ended] if ended else tokens
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            visual_tokens = visual.num_tokens if visual is not None else 0
            responses.append(Response(text, len(kept), visual_tokens, elapsed, first, output.reduction.sample(row),
                                      ended is not None, len(prompts[row]) - (visual is not None) + visual_tokens))
        if broken is not None:
            raise NonFiniteOutputError(str(broken), broken.rows, responses)
        return responses

    def within_memory(self, generate: Callable[[], GenerationOutput], clock: TokenClock) -> GenerationOutput:
        """``generate()``; if it runs out of device memory before its first token while the reuse
        cache holds entries, once more after emptying the cache (its device memory given back);
        otherwise a one-line error that says how much memory was needed."""
        try:
            return generate()
        except torch.OutOfMemoryError as error:
            freed = self.cache.used if self.cache is not None else 0
            if not freed or clock.first is not None:
                raise out_of_memory(error, 0) from None
            logger.warning("out of device memory: the reuse cache gives its %.0f MiB back and the request is tried "
                           "once more", freed / 2**20)
            self.cache.clear()
        try:
            return generate()
        except torch.OutOfMemoryError as error:
            raise out_of_memory(error, freed) from None

    def prefix_prefill(self, visuals: list[EncodedVisual], prompts: list[list[int]]) -> PrefixPrefill | None:
        """The prefill that reuses the prompts' video prefixes, when the cache and the visuals
        allow it (every visual known to the cache, one placeholder per prompt)."""
        if self.cache is None or not self.prefix_reuse:
            return None
        if any(visual is None or visual.key is None for visual in visuals):
            return None
        if any(prompt.count(IMAGE_TOKEN_INDEX) != 1 for prompt in prompts):
            return None
        before = [prompt[: prompt.index(IMAGE_TOKEN_INDEX)] for prompt in prompts]
        return PrefixPrefill(self.model, self.cache, [(visual.key, text) for visual, text in zip(visuals, before)],
                             [len(text) + visual.num_tokens for visual, text in zip(visuals, before)])

    def run(self, requests: Iterable[Request], batch_size: int = 1, workers: int = 2, reduction=None,
            stream: Callable[[str], None] | None = None, **generation) -> Iterator[Result]:
        """Answer every request, in order: ``workers`` threads read the next items' frames while
        the model works on a batch of ``batch_size``. A failing item (unreadable video, prompt too
        long...) becomes its result's ``error``; the other items of its batch are still answered.
        ``stream`` (with ``batch_size=1``) gets each reply's text as it is generated."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        if stream is not None and batch_size != 1:
            raise InputError("one stream callback shows one reply as it is generated: use it with a batch size of 1 "
                             "(or give each Request its own stream)")
        if stream is not None:
            requests = (dataclasses.replace(request, stream=stream) for request in requests)
        config = self.resolve(reduction)

        loaded = read_ahead(requests, lambda request: self.read(request.source, config), workers,
                            depth=max(2 * workers, 2 * batch_size))
        for batch in batches(loaded, batch_size):
            yield from self.answer_batch(batch, config, generation)

    def answer_batch(self, batch: list[tuple[Request, object]], config: ReductionConfig,
                     generation: dict) -> list[Result]:
        """Encode and answer one batch of read items (from :meth:`read`); an item's failure stays
        its own."""
        results = [Result(request, error=item if isinstance(item, BaseException) else None) for request, item in batch]
        pending = [(result, item) for result, (_, item) in zip(results, batch) if result.error is None]
        clips = [(result, item) for result, item in pending if isinstance(item, VideoClip)]
        for result, item in pending:
            if isinstance(item, EncodedVisual):
                result.visual = item
        self.each_or_one_by_one(clips, lambda group: self.encode_clips([item for _, item in group], config),
                                lambda result, visual: setattr(result, "visual", visual))
        for result, _ in pending:
            if result.error is None and result.request.cancelled is not None and result.request.cancelled():
                result.error = RequestCancelled("the request was cancelled before its prefill")
        ready = [(result, None) for result, _ in pending if result.error is None]
        streams = {id(result): StreamOnce(result.request.stream) if result.request.stream else None
                   for result, _ in ready}

        def respond(group: list[tuple[Result, None]]) -> list[Response]:
            for result, _ in group:
                if streams[id(result)] is not None:
                    streams[id(result)].restart()
            return self.respond_many([r.visual for r, _ in group],
                                     [r.request.turns or [(r.question, None)] for r, _ in group],
                                     [streams[id(r)] for r, _ in group],
                                     [r.request.max_new_tokens for r, _ in group],
                                     [r.request.system for r, _ in group],
                                     [r.request.cancelled for r, _ in group], **generation)

        self.each_or_one_by_one(ready, respond, lambda result, response: setattr(result, "response", response))
        if self.cache is not None:
            logger.info("reuse cache so far: %s", self.cache.summary())
        return results

    @staticmethod
    def each_or_one_by_one(group: list[tuple[Result, object]], work: Callable[[list], list],
                           store: Callable[[Result, object], None]) -> None:
        """Run ``work`` on the whole group; if it fails, on each member alone, so that only the
        members that fail by themselves get an error (members that the failure names, with the
        others' outputs, get it at once). A failure of the device ends everything: it is raised,
        as :class:`~aim_llava.errors.DeviceFailure`."""
        if not group:
            return
        try:
            outputs = work(group)
        except DeviceFailure:
            raise
        except Exception as error:
            if is_device_failure(error):
                raise device_failure(error) from error
            if isinstance(error, NonFiniteOutputError) and isinstance(error.partial, list):
                outputs = [error if output is None else output for output in error.partial]
            elif len(group) == 1:
                group[0][0].error = sys.exc_info()[1]
                return
            else:
                for member in group:
                    VideoLLM.each_or_one_by_one([member], work, store)
                return
        for (result, _), output in zip(group, outputs):
            if isinstance(output, NonFiniteOutputError):
                result.error = output
            else:
                store(result, output)

    def answer_list(self, requests: list[Request], batch_size: int, reduction, generation: dict) -> list[str]:
        results = list(self.run(requests, batch_size, reduction=reduction, **generation))
        if any(result.error is not None for result in results):
            raise BatchError(results)
        return [result.response.text for result in results]

    def ask(self, video, question: str | list[str], stream: Callable[[str], None] | None = None, reduction=None,
            batch_size: int = 8, **generation) -> str | list[str]:
        """Answer a question about a video, image, frame directory or :class:`EncodedVisual`; or,
        given a list of videos (and one question or a list of them), answer them in batches of
        ``batch_size`` (a :class:`BatchError` carries every result if some item failed)."""
        if isinstance(video, (list, tuple)):
            questions = question if isinstance(question, (list, tuple)) else [question] * len(video)
            if len(questions) != len(video):
                raise InputError(f"{len(video)} videos but {len(questions)} questions")
            requests = [Request(v, [(q, None)]) for v, q in zip(video, questions)]
            return self.answer_list(requests, batch_size, reduction, generation)
        return self.respond(self.encode(video, reduction), [(question, None)], stream, **generation).text

    def caption(self, video, prompt: str | None = None, stream: Callable[[str], None] | None = None,
                reduction=None, batch_size: int = 8, **generation) -> str | list[str]:
        """Describe a video (or image); or a list of them in batches of ``batch_size``."""
        if isinstance(video, (list, tuple)):
            requests = [Request(v, [(prompt, None)] if prompt else None) for v in video]
            return self.answer_list(requests, batch_size, reduction, generation)
        visual = self.encode(video, reduction)
        request = prompt or default_caption_prompt(visual.modality == "image")
        return self.respond(visual, [(request, None)], stream, **generation).text

    def chat(self, video, reduction=None) -> ChatSession:
        """A multi-turn conversation about one video; the video is encoded once."""
        return ChatSession(self, self.encode(video, reduction))


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists right-aligned in one [B, L] tensor, with the attention mask."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = 1
    return ids, mask


@dataclass
class ChatSession:
    llm: VideoLLM
    visual: EncodedVisual
    history: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str, stream: Callable[[str], None] | None = None, **generation) -> str:
        response = self.llm.respond(self.visual, self.history + [(question, None)], stream, **generation)
        self.history.append((question, response.text))
        return response.text
