"""aim-llava eval: prompt format, accuracy of scripted answers, resume, sharding.

The model is the scripted tiny checkpoint (tests/scripted_checkpoint.py): it answers with the
letter of the keyword in the question, so the expected predictions are known, some right and some
wrong."""

import json
import os
import subprocess
import sys

import pytest
from scripted_checkpoint import SCRIPT

import aim_llava.evaluation as evaluation
from aim_llava.cli import main
from aim_llava.evaluation import Item, parse_choice
from aim_llava.sample_media import write_sample_video

OPTIONS = ["left", "middle", "right", "none"]
# (keyword of the question, answer, category): the model says SCRIPT[keyword]
ITEMS = [("dog", "A", "even"), ("cat", "C", "odd"), ("car", "C", "even"), ("ball", "D", "odd"),
         ("dog", "B", "even"), ("cat", "middle", "odd")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    lines = []
    for i, (keyword, answer, category) in enumerate(ITEMS):
        video = write_sample_video(root / f"v{i}.mp4", num_frames=12 + 3 * i)
        lines.append({"id": f"q{i}", "video": str(video), "question": f"Is there a {keyword} in clip {i}?",
                      "options": OPTIONS, "answer": answer, "category": category})
    lines.append({"id": "broken", "video": str(root / "missing.mp4"), "question": "?", "options": ["x", "y"],
                  "answer": "y", "category": "odd"})
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def expected_records():
    """id -> (text, correct) of every item, from the script (the broken item: no text, wrong)."""
    expected = {}
    for i, (keyword, answer, _) in enumerate(ITEMS):
        letter = answer if len(answer) == 1 else "ABCD"[OPTIONS.index(answer)]
        expected[f"q{i}"] = (SCRIPT[keyword], SCRIPT[keyword] == letter)
    return expected | {"broken": (None, False)}


def run_eval(dataset, out, *extra):
    return main(["eval", "--data", str(dataset / "data.jsonl"), "--model", os.environ["TINY_MODEL"], "--frames", "3",
                 "--max-new-tokens", "4", "--output", str(out), *extra])


@pytest.fixture(autouse=True)
def tiny_model_env(scripted_qwen_dir, monkeypatch):
    monkeypatch.setenv("TINY_MODEL", str(scripted_qwen_dir))


def test_prompt_and_answer_parsing():
    item = Item("1", "v.mp4", "What is shown?", ["a cat", "a dog"], "B", "all")
    assert item.prompt() == "What is shown?\nA. a cat\nB. a dog\nAnswer with the option's letter from the given choices directly."
    assert [parse_choice(t, 4) for t in ["B", "B.", "(C) a dog", "The answer is D", "a cat", "E"]] == ["B", "B", "C", "D", None, None]


def test_accuracy_of_scripted_answers(dataset, tmp_path, capsys):
    # the data set holds one item whose video is missing: it is reported and the exit code says so
    assert run_eval(dataset, tmp_path, "--configs", "baseline,aim_default") == 2
    out, err = capsys.readouterr()
    assert "| aim_default |" in out
    assert err.count("aim-llava: error: item broken") == 2 and "2 item(s) could not be answered" in err
    summary = {row["config"]: row for row in json.loads((tmp_path / "summary.json").read_text())}
    expected = expected_records()
    correct = {item: right for item, (_, right) in expected.items()}
    assert 0 < sum(correct.values()) < len(correct)  # right and wrong answers
    categories = {"even": ["q0", "q2", "q4"], "odd": ["q1", "q3", "q5", "broken"]}
    for config in ("baseline", "aim_default"):
        records = [json.loads(line) for line in (tmp_path / f"{config}.jsonl").read_text().splitlines()]
        assert {r["id"]: (r["text"], r["correct"]) for r in records} == expected
        assert [r["id"] for r in records] == list(expected)
        broken = next(r for r in records if r["id"] == "broken")
        assert "file not found" in broken["error"]
        assert summary[config]["accuracy"] == pytest.approx(sum(correct.values()) / len(correct))
        for category, members in categories.items():
            assert summary[config]["per_category"][category] == pytest.approx(
                sum(correct[i] for i in members) / len(members))
        assert summary[config]["errors"] == 1
    assert summary["aim_default"]["mean_visual_tokens"] < summary["baseline"]["mean_visual_tokens"]


def test_resume_after_interruption_loses_and_repeats_nothing(dataset, tmp_path, monkeypatch):
    original, calls = evaluation.item_record, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(evaluation, "item_record", interrupted)
    assert run_eval(dataset, tmp_path) == 130
    first = [json.loads(line) for line in (tmp_path / "baseline.jsonl").read_text().splitlines()]
    assert [r["id"] for r in first] == ["q0", "q1"]
    monkeypatch.setattr(evaluation, "item_record", original)
    assert run_eval(dataset, tmp_path, "--resume") == 2  # the missing video of item "broken"
    final = [json.loads(line) for line in (tmp_path / "baseline.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in final) == sorted(["q0", "q1", "q2", "q3", "q4", "q5", "broken"])
    assert final[:2] == first


def test_two_processes_give_the_same_results_as_one(dataset, tmp_path, scripted_qwen_dir):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert run_eval(dataset, single) == 2  # the missing video of item "broken"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "aim_llava.cli", "eval", "--data", str(dataset / "data.jsonl"), "--model", str(scripted_qwen_dir),
               "--frames", "3", "--max-new-tokens", "4", "--output", str(sharded)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    # rank 0 exits 2 for the missing video; torchrun reports a child's failure as its own exit 1
    assert result.returncode == 1 and "1 item(s) could not be answered" in result.stderr, result.stderr[-2000:]
    one = [json.loads(line) for line in (single / "baseline.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (sharded / "baseline.jsonl").read_text().splitlines()]
    keep = ("id", "prediction", "correct", "text", "error", "visual_tokens")
    assert [{k: r[k] for k in keep if k in r} for r in one] == [{k: r[k] for k in keep if k in r} for r in two]
    assert (sharded / "baseline.rank0.jsonl").exists() and (sharded / "baseline.rank1.jsonl").exists()


def test_the_example_data_file_runs(tmp_path, tiny_qwen_dir, monkeypatch, capsys):
    """examples/mcq.jsonl, as the README runs it (its videos are outputs/sample.mp4, which
    scripts/make_sample_video.py writes): every item is read and answered, none fails."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "mcq.jsonl"
    monkeypatch.chdir(tmp_path)
    write_sample_video(tmp_path / "outputs" / "sample.mp4")
    code = main(["eval", "--data", str(example), "--model", str(tiny_qwen_dir), "--frames", "2",
                 "--max-new-tokens", "2", "--configs", "baseline,aim_default", "--output", "outputs/eval"])
    assert code == 0, capsys.readouterr().err
    ids = [json.loads(line)["id"] for line in example.read_text().splitlines()]
    for config in ("baseline", "aim_default"):
        records = [json.loads(line) for line in (tmp_path / "outputs/eval" / f"{config}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == ids and all(r["error"] is None for r in records)
