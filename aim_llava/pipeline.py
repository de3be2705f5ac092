"""High-level API: point it at a video (or image) and get a caption or an answer.

>>> llm = VideoLLM.from_pretrained("model/llava-onevision-qwen2-7b-ov", reduction="baseline")
>>> llm.caption("clip.mp4")
>>> llm.caption("clip.mp4", reduction="aim_default")   # another reduction for this call only
>>> session = llm.chat("clip.mp4")          # the video is encoded once
>>> session.ask("Who is in it?"); session.ask("What do they do next?")
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aim_llava.constants import DEFAULT_IMAGE_TOKEN
from aim_llava.conversation import get_conversation
from aim_llava.errors import InputError
from aim_llava.mm_utils import process_images, tokenizer_image_token
from aim_llava.model.builder import load_pretrained_model
from aim_llava.reduction.budget import check_reduction_spec, resolve_reduction
from aim_llava.reduction.config import ReductionConfig
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord
from aim_llava.video import VideoClip, load_video, validate_sampling

DEFAULT_CAPTION_PROMPT = "Please describe this video in detail."
DEFAULT_IMAGE_CAPTION_PROMPT = "Please describe this image in detail."


@dataclass
class SamplingOptions:
    """How frames are taken from a video (see :func:`aim_llava.video.load_video`)."""

    num_frames: int = 32
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        validate_sampling(self.num_frames, self.fps, self.max_frames, self.start, self.end)


@dataclass
class GenerationOptions:
    """How replies are generated; ``cuda_graph=False`` decodes eagerly on a GPU too."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    cuda_graph: bool = True


@dataclass
class EncodedVisual:
    """A video or image after the vision tower and projector (and the reduction's merging),
    ready to be reused across prompts with the same reduction."""

    clip: VideoClip
    features: torch.Tensor
    modality: str
    encode_seconds: float
    reduction: ReductionConfig

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


def time_instruction(clip: VideoClip) -> str:
    """LLaVA-Video's statement of the duration and frame times (its exact wording)."""
    times = ",".join(f"{t:.2f}s" for t in clip.timestamps)
    return (
        f"The video lasts for {clip.duration:.2f} seconds, and {len(clip.timestamps)} frames are uniformly "
        f"sampled from it. These frames are located at {times}.Please answer the following questions related "
        "to this video."
    )


class TextStreamer:
    """Streams decoded text to a callback (transformers' streamer protocol, batch size 1)."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        if len(text) > self.printed:
            self.callback(text[self.printed :])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.printed:
            self.callback(text[self.printed :])
        self.printed = len(text)


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


class VideoLLM:
    """A loaded model plus the choices of how to sample, prompt and reduce.

    ``reduction`` is the default of every call; each method also takes ``reduction=`` (a preset
    name, YAML path, ``budget:X``, mapping or config) for that call alone. The model holds no
    per-call state, so calls with different reductions may run at the same time.
    """

    def __init__(
        self,
        tokenizer,
        model,
        image_processor,
        reduction: str | dict | ReductionConfig | None = None,
        sampling: SamplingOptions | None = None,
        generation: GenerationOptions | None = None,
        conv_template: str = "qwen_1_5",
        time_aware: bool = False,
    ):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.sampling = sampling or SamplingOptions()
        self._plans: dict[ReductionConfig, ReductionPlan] = {}
        self.reduction = self.resolve(reduction if reduction is not None else "baseline")
        self.generation = generation or GenerationOptions()
        self.conv_template = conv_template
        get_conversation(conv_template)
        self.time_aware = time_aware

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
        sampling: SamplingOptions | None = None,
        generation: GenerationOptions | None = None,
    ) -> VideoLLM:
        """Load a local checkpoint directory (either layout) with a reduction preset or config.

        ``reduction="budget:0.15"`` picks the AIM setting that fits 15% of the baseline's prefill
        FLOPs for this model at the sampling's frame count (``max_frames`` when sampling by fps).
        """
        check_reduction_spec(reduction)
        sampling = sampling or SamplingOptions()
        tokenizer, model, processor, _ = load_pretrained_model(
            path, device_map=device, torch_dtype=dtype, attn_implementation=attn_implementation
        )
        return cls(tokenizer, model, processor, reduction, sampling, generation, conv_template, time_aware)

    def resolve(self, reduction: str | dict | ReductionConfig | None) -> ReductionConfig:
        """A call's reduction config (None: the default); ``budget:X`` is solved for this model at
        the sampling's frame count (``max_frames`` when sampling by fps)."""
        if reduction is None:
            return self.reduction
        frames = self.sampling.max_frames or self.sampling.num_frames
        return resolve_reduction(reduction, self.model.config, frames)

    def plan(self, config: ReductionConfig) -> ReductionPlan:
        """The built plan of a config (built once per config)."""
        if config not in self._plans:
            self._plans[config] = config.build(self.model.config.text.num_hidden_layers)
        return self._plans[config]

    def load(self, source: str | Path | VideoClip, **sampling) -> VideoClip:
        if isinstance(source, VideoClip):
            return source
        options = dataclasses.replace(self.sampling, **sampling)
        return load_video(source, options.num_frames, options.fps, options.max_frames, options.start,
                          options.end, options.backend)

    @torch.no_grad()
    def encode(self, source: str | Path | VideoClip | EncodedVisual, reduction=None, **sampling) -> EncodedVisual:
        """Read and encode a video (or image) once; the result can be passed to :meth:`ask` (with
        the same reduction)."""
        config = self.resolve(reduction)
        if isinstance(source, EncodedVisual):
            if source.reduction != config:
                raise InputError(
                    f"this video was encoded for reduction {source.reduction.name!r}, not {config.name!r}: "
                    "encode it again with the reduction you want"
                )
            return source
        plan = self.plan(config)
        clip = self.load(source, **sampling)
        started = time.perf_counter()
        if clip.is_image:
            pixels = process_images(list(clip.frames), self.image_processor, self.model.config)
            height, width = clip.frames.shape[1:3]
            features = self.model.visual_features(pixels, [(width, height)], ["image"], plan)[0]
            modality = "image"
        else:
            pixels = self.image_processor.preprocess(clip.frames)["pixel_values"]
            features = self.model.visual_features([pixels], None, ["video"], plan)[0]
            modality = "video"
        return EncodedVisual(clip, features, modality, time.perf_counter() - started, config)

    def prompt(self, visual: EncodedVisual, turns: list[tuple[str, str | None]]) -> str:
        """The chat prompt for ``turns`` [(question, answer or None)], visual marker in the first."""
        conv = get_conversation(self.conv_template)
        for i, (question, answer) in enumerate(turns):
            if i == 0:
                if self.time_aware and visual.modality == "video":
                    question = f"{time_instruction(visual.clip)}\n{question}"
                question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
            conv.append_message(conv.roles[0], question)
            conv.append_message(conv.roles[1], answer)
        return conv.get_prompt()

    @torch.no_grad()
    def respond(
        self,
        visual: EncodedVisual,
        turns: list[tuple[str, str | None]],
        stream: Callable[[str], None] | None = None,
        **generation,
    ) -> Response:
        options = dataclasses.replace(self.generation, **generation)
        ids = tokenizer_image_token(self.prompt(visual, turns), self.tokenizer, return_tensors="pt")[None]
        clock = TokenClock(TextStreamer(self.tokenizer, stream) if stream else None)
        started = time.perf_counter()
        output = self.model.generate(
            ids,
            visual_features=[visual.features],
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            temperature=options.temperature,
            top_p=options.top_p,
            streamer=clock,
            cuda_graph=options.cuda_graph,
            reduction=self.plan(visual.reduction),
            return_dict_in_generate=True,
        )
        tokens = output.sequences
        text = self.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
        elapsed = time.perf_counter() - started
        first = (clock.first or started + elapsed) - started
        return Response(text, int(tokens.shape[1]), visual.num_tokens, elapsed, first, output.reduction)

    def ask(self, video, question: str, stream: Callable[[str], None] | None = None, reduction=None,
            **generation) -> str:
        """Answer one question about a video, image, frame directory or :class:`EncodedVisual`."""
        return self.respond(self.encode(video, reduction), [(question, None)], stream, **generation).text

    def caption(self, video, prompt: str | None = None, stream: Callable[[str], None] | None = None,
                reduction=None, **generation) -> str:
        visual = self.encode(video, reduction)
        default = DEFAULT_IMAGE_CAPTION_PROMPT if visual.modality == "image" else DEFAULT_CAPTION_PROMPT
        return self.respond(visual, [(prompt or default, None)], stream, **generation).text

    def chat(self, video, reduction=None) -> ChatSession:
        """A multi-turn conversation about one video; the video is encoded once."""
        return ChatSession(self, self.encode(video, reduction))


@dataclass
class ChatSession:
    llm: VideoLLM
    visual: EncodedVisual
    history: list[tuple[str, str]] = field(default_factory=list)

    def ask(self, question: str, stream: Callable[[str], None] | None = None, **generation) -> str:
        response = self.llm.respond(self.visual, self.history + [(question, None)], stream, **generation)
        self.history.append((question, response.text))
        return response.text
