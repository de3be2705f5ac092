"""Every entry point on a Qwen2.5-VL checkpoint: the command line (caption, ask, eval, flops,
bench), VideoLLM with batching and the reuse cache, the server, the lmms-eval plugin and the tiny
checkpoint script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import in_process_service, png_data_url, random_frames

from aim_llava.cli import main
from aim_llava.pipeline import GenerationOptions, VideoLLM
from aim_llava.sample_media import write_sample_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_media")
    write_sample_video(root / "clip.mp4", num_frames=40, fps=20)  # 2 s
    write_sample_video(root / "other.mp4", num_frames=60, fps=20, height=120, width=96)
    from PIL import Image

    Image.fromarray(random_frames(1, 150, 230, seed=2)[0]).save(root / "photo.png")
    return root


@pytest.fixture(scope="module")
def llm(hf_qwen25_dir):
    return VideoLLM.from_pretrained(hf_qwen25_dir, device="cpu", dtype="float32", cache_mb=0,
                                    generation=GenerationOptions(max_new_tokens=6))


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("frames, expected", [(None, 4), ("5", 4), ("6", 6)])
def test_caption_samples_by_qwens_rule_unless_frames_are_given(capsys, hf_qwen25_dir, media, frames, expected):
    """Without --frames, 2 frames a second of the 2 s clip (qwen-vl-utils: 4); --frames N is N
    rounded to even."""
    args = ["caption", media / "clip.mp4", "--model", hf_qwen25_dir, "--max-new-tokens", 3, "--json", "--device",
            "cpu"] + (["--frames", frames] if frames else [])
    code, out, err = run_cli(capsys, *args)
    record = json.loads(out)
    assert code == 0 and record["error"] is None, err
    assert record["frames"] == expected
    assert record["frame_indices"] == torch.linspace(0, 39, expected).round().long().tolist()
    assert record["prefill_flops_fraction"] is None  # the formula's 448 x 448 frames are not these


def test_ask_about_an_image(capsys, hf_qwen25_dir, media):
    code, out, err = run_cli(capsys, "ask", media / "photo.png", "What is it?", "--model", hf_qwen25_dir,
                             "--max-new-tokens", 3, "--json", "--device", "cpu")
    record = json.loads(out)
    assert code == 0 and record["modality"] == "image" and record["visual_tokens"] == 40, err  # 140 x 224


def test_another_template_is_refused_in_one_line(capsys, hf_qwen25_dir, media):
    code, _, err = run_cli(capsys, "ask", media / "clip.mp4", "Why?", "--model", hf_qwen25_dir, "--template",
                           "chatml_direct", "--device", "cpu")
    assert code == 2 and "follow the checkpoint's own chat template" in err and len(err.strip().splitlines()) == 1


def test_eval_on_qwen(capsys, hf_qwen25_dir, media, tmp_path):
    data = tmp_path / "mcq.jsonl"
    items = [{"id": f"q{i}", "video": str(media / name), "question": "What is shown?", "options": ["a", "b"],
              "answer": "A", "category": "all"} for i, name in enumerate(("clip.mp4", "other.mp4"))]
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", hf_qwen25_dir, "--configs",
                             "baseline,aim_default", "--frames", 4, "--max-new-tokens", 2, "--output", tmp_path / "out",
                             "--device", "cpu")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["config"] for row in summary] == ["baseline", "aim_default"]
    assert summary[1]["mean_visual_tokens"] < summary[0]["mean_visual_tokens"]


def test_eval_records_qwens_frame_rule_and_resumes_them(capsys, hf_qwen25_dir, media, tmp_path):
    """--frames 5 on Qwen2.5-VL samples 4 frames (rounded to even): the records say so in their
    settings (frame rule "qwen") and in the frames they saw, and a second run with the same flags
    recognises them as done."""
    data = tmp_path / "mcq.jsonl"
    data.write_text(json.dumps({"id": "q0", "video": str(media / "clip.mp4"), "question": "What is shown?",
                                "options": ["a", "b"], "answer": "A", "category": "all"}) + "\n")
    args = ["eval", "--data", data, "--model", hf_qwen25_dir, "--config", "baseline", "--frames", 5,
            "--max-new-tokens", 2, "--output", tmp_path / "out", "--device", "cpu"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    records_file = tmp_path / "out" / "baseline.jsonl"
    [record] = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert record["settings"]["frame_rule"] == "qwen" and record["settings"]["num_frames"] == 5
    assert record["frames"] == 4 and record["prefill_flops_fraction"] is None
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0 and "other settings" not in err, err
    assert len(records_file.read_text().splitlines()) == 1


def test_budget_is_solved_for_the_frames_sampled(capsys, hf_qwen25_dir, media):
    """budget:X is solved for the frames the family's rule gives (--frames 7 -> 8 on Qwen2.5-VL),
    and refused in one line when sampling by rate leaves the count to each video."""
    from aim_llava.model.families import read_config_file
    from aim_llava.reduction.budget import solve_budget

    config = read_config_file(Path(hf_qwen25_dir) / "config.json")
    spec = "budget:0.4"
    assert solve_budget(spec, config, 8).name != solve_budget(spec, config, 32).name  # the count matters
    code, out, err = run_cli(capsys, "caption", media / "clip.mp4", "--model", hf_qwen25_dir, "--config", spec,
                             "--frames", 7, "--max-new-tokens", 2, "--json", "--device", "cpu")
    record = json.loads(out)
    assert code == 0 and record["frames"] == 8, err
    assert record["config"] == solve_budget(spec, config, 8).name
    code, out, err = run_cli(capsys, "caption", media / "clip.mp4", "--model", hf_qwen25_dir, "--config", spec,
                             "--device", "cpu")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "give --frames N" in err, err


def test_batched_answers_equal_single_answers(llm, media):
    videos = [media / "clip.mp4", media / "other.mp4", media / "photo.png"]
    for reduction in ("baseline", "aim_default"):
        batched = llm.ask(videos, "What happens?", batch_size=3, reduction=reduction)
        assert batched == [llm.ask(v, "What happens?", reduction=reduction) for v in videos]


@pytest.mark.parametrize("reduction", ["baseline", "aim_default", "fastv_default"])
def test_reuse_cache_reuses_the_prefix_with_its_positions(hf_qwen25_dir, llm, media, reduction):
    """A second question on a clip reuses its encoding and its KV prefix (positions (t, h, w) in
    the reused layers) and answers as without the cache."""
    cached = VideoLLM.from_pretrained(hf_qwen25_dir, device="cpu", dtype="float32",
                                      generation=GenerationOptions(max_new_tokens=6))
    questions = ["What happens?", "Who is there and what do they do?"]
    answers = [cached.ask(media / "clip.mp4", q, reduction=reduction) for q in questions]
    assert answers == [llm.ask(media / "clip.mp4", q, reduction=reduction) for q in questions]
    counts = cached.cache.snapshot()
    assert counts.hits["visual"] == 1 and counts.hits["prefix"] == 1


def test_server_answers_videos_and_images_as_frames(hf_qwen25_dir, media):
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with in_process_service(hf_qwen25_dir, media, frames=4, max_new_tokens=5) as (served, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                                              {"type": "text", "text": "What happens?"}]}]}
            reply = http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            expected = served.ask(media / "clip.mp4", "What happens?", max_new_tokens=5)
            assert reply.json()["choices"][0]["message"]["content"] == expected
            images = [{"type": "image_url", "image_url": {"url": png_data_url(w, h)}} for w, h in ((64, 48), (40, 90))]
            frames = {"messages": [{"role": "user", "content": [*images, {"type": "text", "text": "Same?"}]}]}
            assert http.post("/v1/chat/completions", json=frames).status_code == 200


def test_lmms_eval_plugin_answers_as_the_pipeline(hf_qwen25_dir, media):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from aim_llava.lmms_eval_plugin import AimLlava

    plugin = AimLlava(pretrained=str(hf_qwen25_dir), config="aim_default", max_frames_num=4, device="cpu",
                      dtype="float32", max_new_tokens=4, batch_size=2)
    photo = Image.open(media / "photo.png")
    docs = {0: str(media / "clip.mp4"), 1: photo}
    plugin.task_dict = {"task": {"test": docs}}
    requests = [Instance("generate_until", (f"Question {i}?", {"max_new_tokens": 4}, lambda doc: [doc], i, "task",
                                            "test"), idx=0, metadata={"task": "task", "doc_id": i, "repeats": 1})
                for i in docs]
    answers = plugin.generate_until(requests)
    from aim_llava.lmms_eval_plugin import image_clip

    expected = [plugin.llm.ask(docs[0], "Question 0?", reduction="aim_default"),
                plugin.llm.ask(image_clip(photo), "Question 1?", reduction="aim_default")]
    assert answers == expected


def test_flops_and_bench_commands(capsys, hf_qwen25_dir, tmp_path):
    code, out, _ = run_cli(capsys, "flops", "--arch", "qwen2.5-vl-3b", "--frames", 16, "--config", "aim_default",
                           "--json")
    report = json.loads(out)
    assert code == 0 and report["visual_tokens"] == 512 and len(report["tokens_per_layer"]) == 36
    code, out, err = run_cli(capsys, "bench", "--model", hf_qwen25_dir, "--frames", 4, "--repeats", 1,
                             "--decode-tokens", 2, "--configs", "baseline,aim_merge_only,aim_default", "--device", "cpu",
                             "--dtype", "float32", "--json", tmp_path / "b.json")
    assert code == 0, err
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["source"] == "synthetic 448x448 frames"
    assert [row["tokens_per_layer"][0] for row in bench["rows"]] == [612, 228, 228]  # 2 groups of 256 (64) + 100


def test_bench_builds_a_random_model_of_a_qwen_architecture(hf_qwen25_dir):
    """What ``bench --arch qwen2.5-vl-3b`` does, on the tiny shapes: random weights, one run."""
    from aim_llava.bench import random_model, run_bench
    from aim_llava.model.families import read_config_file

    config = read_config_file(hf_qwen25_dir / "config.json")
    model = random_model(config, torch.device("cpu"), torch.float32)
    report = run_bench(model, "tiny", ["baseline", "aim_default"], frames=2, text_tokens=20, decode_tokens=2,
                       repeats=1)
    assert [row.tokens_per_layer[0] for row in report.rows] == [256 + 20, 64 + 20]


def test_make_tiny_model_script_writes_a_qwen_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--family", "qwen2_5_vl",
                             "--out", str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    from aim_llava import load_pretrained_model

    _, model, _, _ = load_pretrained_model(tmp_path / "tiny", device_map="cpu", torch_dtype="float32")
    assert type(model).__name__ == "Qwen2_5_VLForCausalLM"
    refused = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--family", "qwen2_5_vl",
                              "--arch", "llava-onevision-qwen2-0.5b", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "is a LLaVA-OneVision / LLaVA-Video architecture" in refused.stderr


def test_random_full_size_writer_gives_a_loadable_bfloat16_checkpoint(tmp_path, tiny_qwen25_dir):
    """The writer behind ``make_tiny_model.py --arch qwen2.5-vl-3b`` (run here on the tiny shapes)."""
    from aim_llava import load_pretrained_model
    from aim_llava.model.families import read_config_file
    from aim_llava.tiny_qwen2_5_vl import write_random_qwen_checkpoint

    config = read_config_file(tiny_qwen25_dir / "config.json")
    written = write_random_qwen_checkpoint(tmp_path / "random", config)
    _, model, _, _ = load_pretrained_model(written, device_map="cpu", torch_dtype="auto")
    assert read_config_file(written / "config.json").text == config.text
    assert model.config.torch_dtype == "bfloat16"
