"""``aim-llava demo``: a web page (Gradio) to ask about a clip under one or two reductions side by
side, and see what each kept.

    aim-llava demo --model model/llava-onevision-qwen2-0.5b-ov --media-root ~/videos

Input: a video or image (uploaded, or a file under ``--media-root``), a question, one or two
presets (or ``budget:FRACTION``), frames or fps. Output for each preset: its answer as it is
generated, its measured figures (visual tokens, LLM prefill FLOPs, stage times, decoding speed),
a picture of the tokens it kept at the LLM layer a slider picks, and a chart of the visual tokens
entering each layer. All of it is read from the model's own record of the call
(:mod:`aim_llava.explain`).

Requests are taken as the server takes them: media are opened under a root (the media root, or
the folder an upload was stored in) without leaving it, decoded only by Pillow's and FFmpeg's
restricted decoders, frames brought to the model's input size as they are decoded within the
server's pixel and frame budgets (:mod:`aim_llava.server.media`, :mod:`aim_llava.server.limits`);
presets, frame counts and text are checked by the server's rules. A refused or failed request is a
message in the page, and the page stays up. The one model answers one request at a time; the
others wait in Gradio's queue. The page binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from aim_llava.conversation import check_text
from aim_llava.errors import AimLlavaError, one_line
from aim_llava.explain import (
    PresetRun,
    explain,
    layer_name,
    random_weights_notice,
    strictest,
    tokens_chart,
)
from aim_llava.pipeline import VideoLLM
from aim_llava.reduction.config import available_presets
from aim_llava.server.decoding import MediaReaders
from aim_llava.server.errors import ApiError, bad
from aim_llava.server.limits import MESSAGE_OVERHEAD_CHARS, ServerLimits
from aim_llava.server.media import FileMedia, MediaRoot, RequestMedia, file_media
from aim_llava.server.requests import RequestParser
from aim_llava.video import IMAGE_EXTENSIONS, VideoClip

logger = logging.getLogger("aim_llava.demo")

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
MAX_LISTED_FILES = 1000  # of the media root, offered in the page
NO_PRESET = "(none)"
PANELS = ("a", "b")


class DemoError(AimLlavaError):
    """A request the page refuses, with the message it shows."""


def listed_media(root: Path, limit: int = MAX_LISTED_FILES) -> list[str]:
    """Videos and images under ``root`` (relative paths, sorted; symbolic links not followed)."""
    found = []
    for folder, folders, files in os.walk(root):
        folders.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(folder, name), root))
                if len(found) >= limit:
                    return found
    return found


def figures_markdown(run: PresetRun) -> str:
    return "\n".join(f"- {what}: **{value}**" for what, value in run.figures())


class DemoApp:
    """What the page asks of the model: requests checked as the server checks them, read under
    its limits, answered under one or two presets (one request at a time)."""

    def __init__(self, llm: VideoLLM, media_root: Path | None = None, limits: ServerLimits | None = None):
        self.llm = llm
        self.limits = limits or ServerLimits()
        self.media_root = media_root
        self.root = MediaRoot(media_root) if media_root is not None else None
        self.parser = RequestParser(llm, "demo", self.limits)
        self.notice = random_weights_notice(llm)
        self.model_lock = threading.Lock()
        self.readers = MediaReaders(self.limits)

    @property
    def num_layers(self) -> int:
        return self.llm.model.config.text.num_hidden_layers

    def close(self) -> None:
        self.readers.close()
        if self.root is not None:
            self.root.close()

    def check_question(self, question: str | None) -> str:
        question = (question or "").strip()
        if not question:
            raise DemoError("Ask a question about the video or image.")
        if len(question) + MESSAGE_OVERHEAD_CHARS > self.limits.max_text_chars:
            raise DemoError(f"The question holds {len(question):,} characters; at most "
                            f"{self.limits.max_text_chars - MESSAGE_OVERHEAD_CHARS:,} are taken.")
        return check_text(question, "the question")

    def configs(self, presets: list[str | None]):
        """The reduction configs of the chosen presets (the server's rules: presets or budget:X)."""
        specs = [spec.strip() for spec in presets if spec and spec.strip() and spec.strip() != NO_PRESET]
        if not specs:
            raise DemoError("Choose a preset.")
        return [self.parser.reduction(spec) for spec in specs]

    def sampling(self, frames, fps) -> dict:
        body = {"frames": whole(frames, "frames"), "fps": fps or None}
        if body["fps"] is not None:
            body["max_frames"] = body.pop("frames")  # the frame count bounds a sampling by rate
        return self.parser.sampling({name: value for name, value in body.items() if value is not None})

    @contextlib.contextmanager
    def media_source(self, upload: str | None, media_path: str | None) -> Iterator[tuple[RequestMedia, MediaRoot]]:
        """The request's media and the root it is read under: the upload's own folder (closed
        afterwards), or the page's --media-root for a path under it."""
        if upload:
            upload_path = Path(upload)
            root = MediaRoot(upload_path.parent)
            try:
                yield RequestMedia(video=FileMedia(upload_path.name, upload_path.name, "upload")), root
            finally:
                root.close()
        elif media_path and media_path.strip():
            if self.root is None:
                raise DemoError("This page was started without --media-root: upload the file instead.")
            yield RequestMedia(video=file_media(media_path.strip(), "media")), self.root
        else:
            raise DemoError("Upload a video or image first" + (", or pick one under the media root." if self.root
                                                                 else "."))

    def read(self, upload: str | None, media_path: str | None, configs, sampling: dict) -> tuple[VideoClip, float]:
        """The sampled frames of the upload (or of the file under the media root), read as the
        server reads a request's media (in a decoding process held to its time, CPU and memory
        budgets), and the seconds it took."""
        limits = self.limits.media_limits(self.llm.image_processor.image_size,
                                          time.monotonic() + self.limits.request_timeout_s,
                                          self.llm.family.native_resolution)
        config = strictest(self.llm, configs)

        def load(path: str, reader: Callable[..., VideoClip]) -> VideoClip:
            return self.llm.load(path, config, limits, reader, backend="pyav", **sampling)

        started = time.perf_counter()
        with self.media_source(upload, media_path) as (media, root):
            clip = self.readers.read_media(media, root, limits, lambda: False, load)
        return clip, time.perf_counter() - started

    def answer(self, clip: VideoClip, question: str, config, read_seconds: float
               ) -> Iterator[tuple[str, PresetRun | None]]:
        """The answer under ``config`` as it grows ((text, None) pieces), then (text, the run)."""
        pieces: queue.Queue[str | None] = queue.Queue()
        outcome: dict[str, object] = {}

        def work() -> None:
            try:
                with self.model_lock:  # a page closed mid-answer does not let the next request share the model
                    outcome["run"] = explain(self.llm, clip, question, config, read_seconds, stream=pieces.put)
            except BaseException as err:  # noqa: BLE001 (handed to the page's thread)
                outcome["error"] = err
            finally:
                pieces.put(None)

        threading.Thread(target=work, name="aim-llava-demo-model", daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not None:
            text += piece
            yield text, None
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["run"].answer, outcome["run"]

    def run(self, upload, media_path, question, preset_a, preset_b, frames, fps) -> Iterator[dict]:
        """The page's updates for one request: a message, and per panel its answer, figures and
        picture; at the end the chart, the layer slider and the runs (for redrawing)."""
        runs: list[PresetRun] = []
        try:
            question = self.check_question(question)
            configs = self.configs([preset_a, preset_b])
            sampling = self.sampling(frames, fps)
            yield {"message": "Reading the media..."}
            clip, read_seconds = self.read(upload, media_path, configs, sampling)
            for panel, config in zip(PANELS, configs):
                yield {"message": f"Answering with {config.name}..."}
                for text, run in self.answer(clip, question, config, read_seconds):
                    yield {f"answer_{panel}": text}
                runs.append(run)
                yield {f"figures_{panel}": figures_markdown(run)}
            layer = max(run.default_layer() for run in runs)
            update = {"message": f"Done: {', '.join(run.config for run in runs)}.", "chart": tokens_chart(runs),
                      "layer": layer, "runs": runs}
            yield {**update, **self.pictures(runs, layer)}
        except (ApiError, AimLlavaError) as err:
            yield {"message": f"**Not answered:** {one_line(getattr(err, 'message', str(err)))}"}
        except Exception as err:  # the page must stay up whatever the model or a decoder raises
            logger.exception("a demo request failed")
            yield {"message": f"**The model failed on this request** ({type(err).__name__}); see the log."}

    def pictures(self, runs: list[PresetRun] | None, layer) -> dict:
        """Each panel's picture of the tokens kept at ``layer``, and its caption."""
        by_panel, layer = dict(zip(PANELS, runs or [])), int(layer or 0)
        update = {}
        for panel in PANELS:
            run = by_panel.get(panel)
            update[f"picture_{panel}"] = run.picture(min(layer, run.num_layers)) if run is not None else None
            update[f"caption_{panel}"] = caption(run, layer) if run is not None else ""
        return update


def caption(run: PresetRun, layer: int) -> str:
    if run.origins is None:
        return f"**{run.config}** does not say where its tokens came from."
    shown = min(layer, run.num_layers)
    alive = int(run.alive[shown].sum())
    return (f"**{run.config}**: {alive:,} of {run.visual_tokens:,} visual tokens {layer_name(shown, run.num_layers)}. "
            "One colour per token (the patches it stands for); dimmed: pruned in the LLM; dark: dropped before it.")


def whole(value, name: str):
    """A whole number from the page's number box (which may give 8.0), else as it was (refused later)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None:
        raise bad(f"give the number of {name}", name)
    return value


CSS = """
#message { min-height: 1.5em; }
"""


def build_page(app: DemoApp, default_frames: int, max_upload_bytes: int):
    """The Gradio page of ``app``."""
    import gradio as gr

    presets = sorted(available_presets())
    with gr.Blocks(title="aim-llava: what token reduction keeps", analytics_enabled=False) as page:
        gr.Markdown("# aim-llava: what token reduction keeps\nAsk about a video or image under one or two "
                    "reductions, and see the tokens each one kept.")
        if app.notice:
            gr.Markdown(f"**Note:** {app.notice}", elem_id="notice")
        runs = gr.State()
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label=f"Video or image (at most {max_upload_bytes / 2**20:.3g} MiB)",
                                 file_types=list(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS), elem_id="upload")
                media = gr.Dropdown(listed_media(app.media_root) if app.media_root else [], value=None,
                                    label="or a file under the media root", allow_custom_value=True,
                                    visible=app.media_root is not None, elem_id="media")
                question = gr.Textbox(label="Question", value="What happens in this video?", lines=2,
                                      elem_id="question")
                with gr.Row():
                    preset_a = gr.Dropdown(presets, value="baseline", label="Preset A", allow_custom_value=True,
                                           elem_id="preset-a")
                    preset_b = gr.Dropdown([NO_PRESET, *presets], value="aim_default", label="Preset B",
                                           allow_custom_value=True, elem_id="preset-b")
                with gr.Row():
                    frames = gr.Number(value=default_frames, label="Frames", precision=0, minimum=1, elem_id="frames")
                    fps = gr.Number(value=0, label="or frames per second (0: the frames above, evenly)",
                                    minimum=0, elem_id="fps")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                message = gr.Markdown(elem_id="message")
            with gr.Column(scale=2):
                layer = gr.Slider(0, app.num_layers, value=0, step=1, label="LLM layer (the tokens entering it)",
                                  elem_id="layer")
                outputs = {}
                with gr.Row():
                    for panel in PANELS:
                        with gr.Column():
                            outputs[f"caption_{panel}"] = gr.Markdown(elem_id=f"caption-{panel}")
                            outputs[f"picture_{panel}"] = gr.Image(label=f"Kept tokens ({panel.upper()})",
                                                                   format="png", interactive=False,
                                                                   elem_id=f"picture-{panel}")
                            outputs[f"answer_{panel}"] = gr.Textbox(label=f"Answer ({panel.upper()})", lines=3,
                                                                    interactive=False, elem_id=f"answer-{panel}")
                            outputs[f"figures_{panel}"] = gr.Markdown(elem_id=f"figures-{panel}")
                chart = gr.Plot(label="Visual tokens entering each LLM layer", elem_id="chart")
        components = {"message": message, "chart": chart, "layer": layer, "runs": runs, **outputs}
        names = list(components)

        def run(*values):
            cleared = {name: None for name in names if name not in ("runs", "layer")}
            yield as_update(names, {**cleared, "message": "Waiting for the model..."})
            for update in app.run(*values):
                yield as_update(names, update)

        def redraw(saved, chosen):
            return as_update(names, app.pictures(saved, chosen))

        ask.click(run, [upload, media, question, preset_a, preset_b, frames, fps], list(components.values()),
                  concurrency_limit=1)
        layer.input(redraw, [runs, layer], list(components.values()), concurrency_limit=None, queue=False)
    return page


def as_update(names: list[str], update: dict) -> list:
    """The outputs in ``names`` order: the values ``update`` gives, the others left as they are."""
    import gradio as gr

    return [update[name] if name in update else gr.skip() for name in names]


def serve_demo(args) -> int:
    """``aim-llava demo`` with its checked options: load the model and serve the page until
    interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from aim_llava.pipeline import GenerationOptions, SamplingOptions

    llm = VideoLLM.from_pretrained(args.model, "baseline", device=args.device, dtype=args.dtype,
                                   attn_implementation=args.attn, sampling=SamplingOptions(num_frames=args.frames),
                                   generation=GenerationOptions(max_new_tokens=args.max_new_tokens,
                                                                cuda_graph=args.cuda_graph),
                                   cache_mb=args.cache_mb, prefix_reuse=args.prefix_reuse)
    app = DemoApp(llm, args.media_root.absolute() if args.media_root is not None else None)
    max_upload = int(args.max_upload_mb * 2**20)
    page = build_page(app, args.frames, max_upload)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"aim-llava: warning: {args.host} is reachable from other machines: anyone who can reach the port can "
              "use the model and upload files", file=sys.stderr, flush=True)
    print(f"aim-llava: the demo is on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: the page works offline
    restored = args.native_stderr.restored() if args.native_stderr is not None else contextlib.nullcontext()
    try:
        with restored:
            page.queue(max_size=args.max_queue, default_concurrency_limit=1).launch(
                server_name=args.host, server_port=args.port, max_file_size=max_upload, ssr_mode=False,
                mcp_server=False, show_error=False, quiet=True, footer_links=[], theme=theme, css=CSS)
    finally:
        app.close()
    return 0
