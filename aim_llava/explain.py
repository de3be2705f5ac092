"""What each reduction keeps of one clip for one question: the runs behind ``aim-llava explain``
and ``aim-llava demo``, and the report they are drawn into.

A run answers the question under one reduction with the model's own record of what it did: the
origins of the visual tokens (recorded while encoding, :mod:`aim_llava.reduction.provenance`),
which of them each LLM layer kept (the call's :class:`~aim_llava.reduction.plan.ReductionRecord`),
the stage times measured in the call, and the prefill FLOPs of the tokens it ran.

    aim-llava explain clip.mp4 "What happens?" --config baseline,aim_default --output report.png
"""

from __future__ import annotations

import base64
import html
import io
import json
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aim_llava.cost import prefill_flops
from aim_llava.flops import executed_tokens, video_token_counts
from aim_llava.kept_picture import kept_picture, thumbnail
from aim_llava.pipeline import VideoLLM
from aim_llava.reduction.config import ReductionConfig
from aim_llava.reduction.plan import ReductionPlan, ReductionRecord
from aim_llava.reduction.provenance import TokenOrigins
from aim_llava.timing import StageTimes
from aim_llava.tiny_checkpoint import has_tiny_architecture
from aim_llava.video import VideoClip

STAGES = (("read", "read"), ("preprocess", "preprocess"), ("vision", "vision tower"), ("pre_llm", "pre-LLM"),
          ("prefill", "prefill"), ("decode", "decode"))
PICTURE_SIDE = 384  # the longest side of the pictures a run keeps for drawing
RANDOM_WEIGHTS_NOTICE = ("This checkpoint has random weights (a tiny test model): its answers are random text. "
                         "The reductions, token counts and times are real.")
REPORT_SUFFIXES = (".png", ".html")


@dataclass
class PresetRun:
    """One question answered under one reduction. ``record``: the call's record of the reduction;
    ``alive[l]``: which visual tokens (in the order they enter the LLM) enter decoder layer l, as
    the record says; ``alive[-1]``: which leave the last one. ``seconds``: the stages measured in
    the call (``read`` shared by the runs of one clip)."""

    config: str
    answer: str
    pictures: list[np.ndarray]
    origins: TokenOrigins | None
    record: ReductionRecord
    alive: list[torch.Tensor]
    new_tokens: int
    seconds: dict[str, float]
    first_token_s: float
    prefill_tflops: float
    prefill_fraction: float | None
    prune_mode: str

    @property
    def num_layers(self) -> int:
        return len(self.alive) - 1

    @property
    def visual_tokens(self) -> int:
        return int(self.alive[0].numel())

    @property
    def tokens_per_layer(self) -> list[int]:
        """Visual tokens entering each decoder layer."""
        return [int(alive.sum()) for alive in self.alive[:-1]]

    def picture(self, layer: int, tile_width: int = 160, per_row: int = 4) -> Image.Image | None:
        """The pictures with each token's cells, tokens alive as they enter ``layer`` (None when
        the reduction does not say where its tokens came from)."""
        if self.origins is None:
            return None
        return kept_picture(self.pictures, self.origins, self.alive[layer], tile_width, per_row)

    def states(self) -> list[int]:
        """The layers whose kept tokens differ from the layer's before (0 first)."""
        return [0] + [layer for layer in range(1, len(self.alive)) if not torch.equal(self.alive[layer],
                                                                                        self.alive[layer - 1])]

    def default_layer(self) -> int:
        """The layer to show first: the first where at most half the visual tokens are left,
        else the last where some were pruned, else 0 (nothing pruned inside the LLM)."""
        counts = [int(alive.sum()) for alive in self.alive]
        half = next((layer for layer, count in enumerate(counts) if count <= counts[0] / 2), None)
        return half if half is not None else self.states()[-1]

    def figures(self) -> list[tuple[str, str]]:
        """(what, value) lines of the run's measured figures."""
        kept = self.tokens_per_layer
        lines = [("visual tokens into the LLM", f"{self.visual_tokens:,}"),
                 ("visual tokens in the last layer", f"{kept[-1]:,}")]
        flops = f"{self.prefill_tflops * 1e3:,.3f} GFLOPs"
        if self.prefill_fraction is not None:
            flops += f" ({100 * self.prefill_fraction:.0f}% of no reduction)"
        if self.prune_mode == "mask":
            flops += ", mask mode: every row computed"
        lines.append(("LLM prefill", flops))
        for key, name in STAGES:
            if key in self.seconds:
                lines.append((name, f"{self.seconds[key] * 1e3:,.0f} ms"))
        lines.append(("time to first token", f"{self.first_token_s * 1e3:,.0f} ms"))
        decode = self.seconds.get("decode")
        if decode and self.new_tokens:
            lines.append(("decoding", f"{self.new_tokens / decode:,.1f} tokens/s ({self.new_tokens} tokens)"))
        return lines


def layer_name(layer: int, num_layers: int) -> str:
    return "after the last layer" if layer == num_layers else f"entering layer {layer}"


def random_weights_notice(llm: VideoLLM) -> str | None:
    return RANDOM_WEIGHTS_NOTICE if has_tiny_architecture(llm.model.config) else None


def strictest(llm: VideoLLM, configs: list[ReductionConfig]) -> ReductionConfig:
    """The config that fits the fewest frames in the model's context (a clip read for it fits all)."""
    return min(configs, key=llm.frame_limit)


def read_clip(llm: VideoLLM, source: str | Path, configs: list[ReductionConfig], **sampling
              ) -> tuple[VideoClip, float]:
    """The clip's sampled frames (within the context of every config), and the seconds it took."""
    started = time.perf_counter()
    clip = llm.load(source, strictest(llm, configs), **sampling)
    return clip, time.perf_counter() - started


def prefill_cost(llm: VideoLLM, config: ReductionConfig, run_tokens: list[int], text_tokens: int,
                 clip: VideoClip, modality: str) -> tuple[float, float | None]:
    """(TFLOPs, fraction of no reduction) of the LLM prefill with ``run_tokens`` visual tokens
    entering each layer (mask mode computes every row); the fraction for videos only, of families
    whose frames have one size (an image's tiling, and frames at their native resolution, do not
    follow the formula of docs/algorithms.md §4, which counts Qwen2.5-VL's frames at 448 x 448)."""
    arch = llm.model.config
    executed = executed_tokens(llm.plan(config), [text_tokens + count for count in run_tokens])
    flops = prefill_flops(arch.text, executed)
    if modality != "video" or llm.family.native_resolution:
        return flops / 1e12, None
    baseline = prefill_flops(arch.text, video_token_counts(arch, ReductionPlan(), len(clip.indices), text_tokens)[1])
    return flops / 1e12, flops / baseline


def explain(llm: VideoLLM, clip: VideoClip, question: str, config: ReductionConfig, read_seconds: float = 0.0,
            stream: Callable[[str], None] | None = None, **generation) -> PresetRun:
    """Answer ``question`` about ``clip`` under ``config``, recording where the visual tokens came
    from, which each layer kept and how long each stage took."""
    with StageTimes() as times:
        visual = llm.encode(clip, config, with_origins=True)
        response = llm.respond(visual, [(question, None)], stream, **generation)
    record = response.reduction
    num_layers = len(record.visual_tokens_per_layer)
    alive = [record.visual_alive(layer) for layer in range(num_layers + 1)]
    text_tokens = response.prompt_tokens - response.visual_tokens
    tflops, fraction = prefill_cost(llm, config, [int(mask.sum()) for mask in alive[:-1]], text_tokens, clip,
                                    visual.modality)
    longest = PICTURE_SIDE * (2 if visual.modality == "image" else 1)
    return PresetRun(config.name, response.text, [thumbnail(frame, longest) for frame in clip.frames],
                     visual.origins, record, alive, response.num_new_tokens,
                     {"read": read_seconds, **times.seconds()}, response.first_token_s, tflops, fraction,
                     llm.plan(config).prune_mode)


def tokens_chart(runs: list[PresetRun]):
    """A matplotlib figure: visual tokens entering each LLM layer, one line per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 2.6), layout="constrained")
    draw_tokens_chart(figure.add_subplot(), runs)
    return figure


def draw_tokens_chart(axes, runs: list[PresetRun]) -> None:
    for run in runs:
        axes.step(range(run.num_layers), run.tokens_per_layer, where="post", label=run.config, linewidth=2)
    axes.set_xlabel("LLM layer")
    axes.set_ylabel("visual tokens entering")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")


def figure_png(figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_report(runs: list[PresetRun], question: str, path: Path, layer: int | None = None,
                 notice: str | None = None) -> None:
    """One panel per run (the picture of its kept tokens at ``layer``, None: each run's
    :meth:`~PresetRun.default_layer`; its answer and figures) and the chart of tokens per layer,
    as a PNG or a self-contained HTML page (by ``path``'s suffix)."""
    if path.suffix.lower() == ".html":
        path.write_text(report_html(runs, question, layer, notice), encoding="utf-8")
    else:
        path.write_bytes(figure_png(report_figure(runs, question, layer, notice)))


def report_figure(runs: list[PresetRun], question: str, layer: int | None, notice: str | None):
    """The report as one matplotlib figure: a column per run, the chart under them."""
    from matplotlib.figure import Figure

    pictures = [run.picture(layer if layer is not None else run.default_layer()) for run in runs]
    aspect = max((picture.height / picture.width for picture in pictures if picture is not None), default=0.5)
    figure = Figure(figsize=(6.4 * len(runs), 6.4 * aspect + 6.5), layout="constrained")
    grid = figure.add_gridspec(3, len(runs), height_ratios=[6.4 * aspect, 3.6, 2.6])
    figure.suptitle(question if not notice else f"{question}\n{notice}", fontsize="medium")
    for column, (run, picture) in enumerate(zip(runs, pictures)):
        shown = layer if layer is not None else run.default_layer()
        axes = figure.add_subplot(grid[0, column])
        axes.set_axis_off()
        if picture is not None:
            axes.imshow(np.asarray(picture))
        axes.set_title(f"{run.config}: visual tokens {layer_name(shown, run.num_layers)}", fontsize="medium")
        text = figure.add_subplot(grid[1, column])
        text.set_axis_off()
        answer = textwrap.fill(f"Answer: {run.answer}", 64, max_lines=4, placeholder=" ...")
        lines = "\n".join(f"{what}: {value}" for what, value in run.figures())
        text.text(0, 1, f"{answer}\n\n{lines}", va="top", family="monospace", fontsize="small")
    draw_tokens_chart(figure.add_subplot(grid[2, :]), runs)
    return figure


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>aim-llava explain</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
.panels {{ display: flex; gap: 2em; flex-wrap: wrap; }}
.panel {{ flex: 1 1 30em; }}
.panel img {{ max-width: 100%; }}
table {{ border-collapse: collapse; }} td {{ padding: 0.1em 0.8em 0.1em 0; }}
.notice {{ background: #fff3cd; padding: 0.5em; }}
</style></head><body>
<h1>What the reductions kept</h1>
<p><b>Question:</b> {question}</p>
{notice}
<div class="panels">{panels}</div>
<h2>Visual tokens entering each LLM layer</h2>
<img src="{chart}" alt="visual tokens per layer">
<p>Each colour is one visual token and the patches it stands for (pooling and merging fold several
together); dimmed patches belong to tokens pruned inside the LLM by the chosen layer; dark ones to no
token (dropped or cropped before the LLM).</p>
<script>
for (const panel of document.querySelectorAll(".panel")) {{
  const states = JSON.parse(panel.dataset.states), slider = panel.querySelector("input");
  if (!slider) continue;
  slider.addEventListener("input", () => {{
    const state = states[slider.value];
    panel.querySelector("img").src = state.picture;
    panel.querySelector(".layer").textContent = state.name;
  }});
}}
</script>
</body></html>
"""


def report_html(runs: list[PresetRun], question: str, layer: int | None, notice: str | None) -> str:
    """A self-contained page: per run, its picture at each layer where its kept tokens change
    (a slider picks one), its answer and figures; the chart of tokens per layer."""
    panels = []
    for run in runs:
        rows = "".join(f"<tr><td>{html.escape(what)}</td><td>{html.escape(value)}</td></tr>"
                       for what, value in run.figures())
        body = f"<h2>{html.escape(run.config)}</h2><p><b>Answer:</b> {html.escape(run.answer)}</p>"
        if run.origins is None:
            panels.append(f'<div class="panel" data-states="[]">{body}<p>This reduction does not say where its '
                          f"tokens came from.</p><table>{rows}</table></div>")
            continue
        shown_first = layer if layer is not None else run.default_layer()
        layers = sorted(set(run.states()) | {shown_first})
        first = layers.index(shown_first)
        states = [{"name": layer_name(shown, run.num_layers), "picture": data_url(image_png(run.picture(shown)))}
                  for shown in layers]
        slider = (f'<input type="range" min="0" max="{len(states) - 1}" value="{first}">'
                  if len(states) > 1 else "")
        panels.append(f'<div class="panel" data-states="{html.escape(json.dumps(states))}">{body}'
                      f'<p>Visual tokens <span class="layer">{html.escape(states[first]["name"])}</span> {slider}</p>'
                      f'<img src="{states[first]["picture"]}" alt="kept tokens"><table>{rows}</table></div>')
    return HTML_PAGE.format(question=html.escape(question), panels="".join(panels),
                            notice=f'<p class="notice">{html.escape(notice)}</p>' if notice else "",
                            chart=data_url(figure_png(tokens_chart(runs))))
