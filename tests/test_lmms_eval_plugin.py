"""The aim_llava model driven by lmms-eval itself, on a local task built from generated videos.

The model is the scripted tiny checkpoint (tests/scripted_checkpoint.py), which answers with the
letter of the keyword in the question: lmms-eval's logged responses and accuracy are compared
with the script and with the local runner's, on answers that are partly right, partly wrong."""

import json
import sys

from conftest import lmms_eval_logged_replies, run_lmms_eval, write_mcq_task
from scripted_checkpoint import SCRIPT

from aim_llava.cli import main
from aim_llava.sample_media import write_sample_video

ITEMS = [("dog", "A"), ("cat", "C"), ("car", "C"), ("ball", "A")]  # (keyword, answer): right, wrong, right, wrong


def test_lmms_eval_runs_the_plugin_and_agrees_with_the_local_runner(tmp_path, scripted_qwen_dir, capsys):
    lines = []
    for i, (keyword, answer) in enumerate(ITEMS):
        video = write_sample_video(tmp_path / f"v{i}.mp4", num_frames=10 + 4 * i)
        lines.append({"id": f"q{i}", "video": str(video), "question": f"Is there a {keyword} in clip {i}?",
                      "options": ["bars", "a square", "a circle", "nothing"], "answer": answer, "category": "all"})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks = write_mcq_task(tmp_path, data)
    output = run_lmms_eval([sys.executable, "-m", "lmms_eval", "--model", "aim_llava", "--model_args",
                            f"pretrained={scripted_qwen_dir},config=aim_default,max_frames_num=4,max_new_tokens=4",
                            "--tasks", "aim_local_mcq", "--include_path", str(tasks), "--batch_size", "3",
                            "--output_path", str(tmp_path / "lmms_out"), "--log_samples"], cwd=tmp_path)
    table_row = next(line for line in output.splitlines() if line.startswith("|aim_local_mcq"))
    assert "accuracy" in table_row
    lmms_accuracy = float(table_row.split("|")[6])

    assert main(["eval", "--data", str(data), "--model", str(scripted_qwen_dir), "--config", "aim_default",
                 "--frames", "4", "--max-new-tokens", "4", "--output", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    local = json.loads((tmp_path / "local" / "summary.json").read_text())[0]
    local_texts = [json.loads(line)["text"] for line in (tmp_path / "local" / "aim_default.jsonl").read_text().splitlines()]
    scripted = [SCRIPT[keyword] for keyword, _ in ITEMS]
    assert local_texts == scripted
    assert lmms_eval_logged_replies(tmp_path / "lmms_out") == scripted
    expected_accuracy = sum(SCRIPT[keyword] == answer for keyword, answer in ITEMS) / len(ITEMS)
    assert 0 < expected_accuracy < 1
    assert local["accuracy"] == lmms_accuracy == expected_accuracy
