"""The aim_llava model driven by lmms-eval itself, on a local task built from generated videos.

The model is the scripted tiny checkpoint (tests/scripted_checkpoint.py), which answers with the
letter of the keyword in the question: lmms-eval's logged responses and accuracy are compared
with the script and with the local runner's, on answers that are partly right, partly wrong."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from scripted_checkpoint import SCRIPT

from aim_llava.cli import main
from aim_llava.sample_media import write_sample_video

TASK_YAML = """task: aim_local_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = '''from aim_llava.evaluation import Item, parse_choice


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return Item(str(doc["id"]), doc["video"], doc["question"], doc["options"], doc["answer"], "all").prompt()


def process_results(doc, results):
    return {"accuracy": float(parse_choice(results[0], len(doc["options"])) == doc["answer"])}
'''


ITEMS = [("dog", "A"), ("cat", "C"), ("car", "C"), ("ball", "A")]  # (keyword, answer): right, wrong, right, wrong


def logged_responses(output_dir: Path) -> dict[int, str]:
    """doc_id -> the response lmms-eval logged (--log_samples) for the task."""
    (samples,) = output_dir.rglob("*_samples_aim_local_mcq.jsonl")
    responses = {}
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        response = sample["filtered_resps"]
        while isinstance(response, list):
            (response,) = response
        responses[sample["doc_id"]] = response
    return responses


def test_lmms_eval_runs_the_plugin_and_agrees_with_the_local_runner(tmp_path, scripted_qwen_dir, capsys):
    lines = []
    for i, (keyword, answer) in enumerate(ITEMS):
        video = write_sample_video(tmp_path / f"v{i}.mp4", num_frames=10 + 4 * i)
        lines.append({"id": f"q{i}", "video": str(video), "question": f"Is there a {keyword} in clip {i}?",
                      "options": ["bars", "a square", "a circle", "nothing"], "answer": answer, "category": "all"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    task_dir = tmp_path / "tasks" / "aim_local_mcq"
    task_dir.mkdir(parents=True)
    (task_dir / "aim_local_mcq.yaml").write_text(TASK_YAML.format(data=data))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    command = [sys.executable, "-m", "lmms_eval", "--model", "aim_llava",
               "--model_args", f"pretrained={scripted_qwen_dir},config=aim_default,max_frames_num=4,max_new_tokens=4",
               "--tasks", "aim_local_mcq", "--include_path", str(tmp_path / "tasks"), "--batch_size", "3",
               "--output_path", str(tmp_path / "lmms_out"), "--log_samples"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # lmms-eval exits 0 after logging an error it caught (e.g. an import failing inside its evaluator)
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)  # loguru's colours
    assert not [line for line in output.splitlines() if "| ERROR" in line or "Traceback" in line], output[-3000:]
    table_row = next(line for line in result.stdout.splitlines() if line.startswith("|aim_local_mcq"))
    assert "accuracy" in table_row
    lmms_accuracy = float(table_row.split("|")[6])

    assert main(["eval", "--data", str(data), "--model", str(scripted_qwen_dir), "--config", "aim_default",
                 "--frames", "4", "--max-new-tokens", "4", "--output", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    local = json.loads((tmp_path / "local" / "summary.json").read_text())[0]
    local_texts = [json.loads(line)["text"] for line in (tmp_path / "local" / "aim_default.jsonl").read_text().splitlines()]
    scripted = [SCRIPT[keyword] for keyword, _ in ITEMS]
    assert local_texts == scripted
    assert logged_responses(tmp_path / "lmms_out") == dict(enumerate(scripted))
    expected_accuracy = sum(SCRIPT[keyword] == answer for keyword, answer in ITEMS) / len(ITEMS)
    assert 0 < expected_accuracy < 1
    assert local["accuracy"] == lmms_accuracy == expected_accuracy
