"""``aim-llava explain`` and the picture of what a reduction kept: the cells the picture shows
alive at a layer are those of the tokens the model's record kept (every kept mask of the layers
before it), and in mask mode those of the float64 reference of docs/algorithms.md §3
(tests/test_pruning_oracle.py); the report holds one panel per preset."""

import base64
import dataclasses
import io
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import random_frames
from PIL import Image
from test_pruning_oracle import (
    AIM_MARGIN,
    ProjectionTap,
    aim_importance,
    attention_logits,
    cut,
    published_retention,
)

from aim_llava.cli import main
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.explain import explain, write_report
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.pipeline import SamplingOptions, VideoLLM
from aim_llava.sample_media import write_sample_video
from aim_llava.video import VideoClip

CELL = 6  # pixels a cell takes in the pictures drawn here
QUESTION = "Describe the video in detail."


def uncached(checkpoint) -> VideoLLM:
    """A tiny model without the reuse cache (each prefill is one pass over the whole prompt)."""
    return VideoLLM.from_pretrained(checkpoint, device="cpu", dtype="float32", cache_mb=0,
                                    sampling=SamplingOptions(num_frames=2))


@pytest.fixture(scope="module")
def llm(tiny_qwen_dir):
    """The tiny LLaVA-OneVision."""
    return uncached(tiny_qwen_dir)


@pytest.fixture(scope="module", params=["tiny_qwen_dir", "tiny_qwen25_dir"], ids=["llava_onevision", "qwen2_5_vl"])
def family_llm(request):
    """The tiny model of each family."""
    return uncached(request.getfixturevalue(request.param))


def clip_of(frames: np.ndarray) -> VideoClip:
    count = len(frames)
    return VideoClip(frames, list(range(count)), [float(i) for i in range(count)], float(count), 1.0, "test")


def picture_states(run, layer: int) -> list[int]:
    """Per cell of the run's grids (all of one shape), what its picture at ``layer`` shows, read
    from the pixel at the cell's centre over white pictures: 1 a live token's colour, 0 dimmed
    (pruned), -1 dark."""
    rows, columns = run.origins.grids[0].rows, run.origins.grids[0].columns
    white = dataclasses.replace(run, pictures=[np.full((rows, columns, 3), 255, dtype=np.uint8) for _ in run.pictures])
    image = np.asarray(white.picture(layer, tile_width=columns * CELL, per_row=len(run.origins.grids))).astype(float)
    states = []
    for index, grid in enumerate(run.origins.grids):
        left = index * (columns * CELL + 4)
        for row in range(grid.rows):
            for column in range(grid.columns):
                level = image[row * CELL + CELL // 2, left + column * CELL + CELL // 2].mean()
                states.append(1 if level > 100 else 0 if level > 35 else -1)
    return states


def visual_rows(llm, run) -> torch.Tensor:
    """The prefill rows of the visual tokens, from the prompt's placeholder."""
    prompt = llm.family.prompt([(QUESTION, None)], "video", None, llm.conv_template, llm.tokenizer,
                               llm.image_processor)
    ids = tokenizer_image_token(prompt, llm.tokenizer)
    start = ids.index(IMAGE_TOKEN_INDEX)
    return torch.arange(start, start + run.visual_tokens)


def expected_states(run, alive_visual: torch.Tensor) -> list[int]:
    tokens = run.origins.token_of_cell
    return [-1 if token < 0 else int(alive_visual[token]) for token in tokens.tolist()]


@pytest.mark.parametrize("preset", ["aim_default", "fastv_default", "ficoco_l_25", "random_25"])
def test_picture_shows_the_tokens_the_record_kept(family_llm, preset):
    """Qwen2.5-VL: 4 frames of 84 x 84 are 2 groups of 4 x 4 tokens (resized to 112 x 112), the
    two frames of a group drawn with their group's tokens."""
    llm = family_llm
    run = explain(llm, clip_of(random_frames(4, 84, 84, seed=1)), QUESTION, llm.resolve(preset), max_new_tokens=2)
    rows = visual_rows(llm, run)
    kept = run.record.kept
    assert kept or preset == "random_25"
    for layer in range(run.num_layers + 1):
        alive = torch.ones(len(rows), dtype=torch.bool)
        for earlier, mask in kept.items():
            if earlier < layer:
                alive &= mask[0, rows].cpu()
        assert picture_states(run, layer) == expected_states(run, alive), f"layer {layer}"
        if layer < run.num_layers:
            assert int(alive.sum()) == run.record.visual_tokens_per_layer[layer][0]


def test_mask_mode_picture_shows_the_reference_kept_tokens(llm):
    """aim_default_mask: the float64 PageRank reference, computed from the prefill's own query and
    key projections, keeps the tokens the picture shows alive after each pruning layer."""
    model = llm.model
    layers = [3, 4, 5]
    with ProjectionTap(model, layers) as tap:
        run = explain(llm, clip_of(random_frames(4, 64, 80, seed=3)), QUESTION, llm.resolve("aim_default_mask"),
                      max_new_tokens=1)
    rows = visual_rows(llm, run)
    n = tap.q[layers[0]].shape[0]
    visual = torch.zeros(n, dtype=torch.bool)
    visual[rows] = True
    alive = torch.ones(n, dtype=torch.bool)
    positions = torch.arange(n)
    for layer in layers:  # mask mode: every row is a query; pruned rows are no longer keys
        scores = aim_importance(attention_logits(tap, model, layer, positions), alive)
        scores[~alive] = -1.0
        scores[~visual] = 1.0
        n_text = n - len(rows)
        alive = cut(scores, torch.ones(n, dtype=torch.bool), int(len(rows) * published_retention(layer)) + n_text,
                    AIM_MARGIN)
        assert picture_states(run, layer + 1) == expected_states(run, alive[rows]), f"after layer {layer}"
    assert 0 < int(alive[rows].sum()) < len(rows)


def decoded_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_report_has_one_panel_per_preset(llm, tmp_path):
    clip = clip_of(random_frames(2, 84, 84, seed=2))
    runs = [explain(llm, clip, QUESTION, llm.resolve(preset), max_new_tokens=2)
            for preset in ("baseline", "aim_default")]
    write_report(runs, "What <b>moves</b>?", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    panels = re.findall(r'<div class="panel" data-states="([^"]*)">', page)
    assert len(panels) == 2 and "What &lt;b&gt;moves&lt;/b&gt;?" in page
    for run, states in zip(runs, panels):
        states = json.loads(states.replace("&quot;", '"').replace("&#x27;", "'").replace("&amp;", "&"))
        assert len(states) == len(run.states())  # one picture per layer where the kept tokens change
        for state in states:
            picture = decoded_png(base64.b64decode(state["picture"].split(",", 1)[1]))
            assert picture.size == run.picture(0).size
    assert len(runs[1].states()) > 1 and len(runs[0].states()) == 1  # aim prunes inside the LLM, baseline not
    write_report(runs, QUESTION, tmp_path / "report.png")
    assert decoded_png((tmp_path / "report.png").read_bytes()).width > 1000


def test_explain_command_writes_the_report(capsys, tiny_qwen_dir, tmp_path):
    video = write_sample_video(tmp_path / "clip.mp4", num_frames=20, fps=10)
    out = tmp_path / "report.png"
    code = main(["explain", str(video), "What moves?", "--config", "baseline,aim_default", "--output", str(out),
                 "--model", str(tiny_qwen_dir), "--device", "cpu", "--frames", "2", "--max-new-tokens", "2"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert [line.split(":")[0] for line in printed.splitlines()] == ["baseline", "aim_default"]
    assert decoded_png(out.read_bytes()).height > 500


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/report.txt"], "must end in .png or .html"),
    (["--output", "{tmp}/r.png", "--config", "nonsense"], "nonsense"),
    (["--output", "{tmp}/r.png", "--config", " , "], "names no reduction"),
    (["--output", "{tmp}/r.png", "--layer", "99"], "beyond the model's 6 layers"),
    (["--output", "{video}/r.png"], "is a file"),
])
def test_explain_bad_input_exits_2_with_one_line(capsys, tiny_qwen_dir, tmp_path, args, message):
    video = tmp_path / "clip.png"
    Image.new("RGB", (32, 32)).save(video)
    args = [arg.format(tmp=tmp_path, video=video) for arg in args]
    code = main(["explain", str(video), "What?", "--model", str(tiny_qwen_dir), "--device", "cpu", *args])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("aim-llava: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_explain_without_matplotlib_exits_2_before_loading_the_model(capsys, monkeypatch, tiny_qwen_dir, tmp_path):
    video = write_sample_video(tmp_path / "clip.mp4", num_frames=20, fps=10)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    loads, load = [], VideoLLM.from_pretrained

    def counted_load(*args, **kwargs):
        loads.append(args)
        return load(*args, **kwargs)

    monkeypatch.setattr(VideoLLM, "from_pretrained", counted_load)
    code = main(["explain", str(video), "What moves?", "--output", str(tmp_path / "report.html"),
                 "--model", str(tiny_qwen_dir), "--device", "cpu", "--frames", "2"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines() == [
        "aim-llava: error: aim-llava explain draws its report with matplotlib: pip install 'aim-llava[plot]'"], err
    assert loads == [] and not (tmp_path / "report.html").exists()


def test_explain_refuses_to_overwrite_its_input(capsys, tiny_qwen_dir, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    code = main(["explain", str(image), "What?", "--model", str(tiny_qwen_dir), "--output", str(image)])
    _, err = capsys.readouterr()
    assert code == 2 and "is the input itself" in err and decoded_png(image.read_bytes()).size == (32, 32)
