"""Records carry the settings they were made with, and --resume compares them: a run with other
settings does the items again instead of counting another setting's records as done."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import tomllib

from aim_llava.cli import main
from aim_llava.pipeline import GenerationOptions, SamplingOptions
from aim_llava.reduction.config import load_reduction_config
from aim_llava.run_settings import run_settings, settings_id
from aim_llava.sample_media import write_sample_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("settings") / "clip.mp4", num_frames=20, fps=10)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_with_other_frames_does_the_items_again(capsys, tiny_qwen_dir, clip, tmp_path):
    """After a 4-frame run, ``--resume --frames 2`` captions again at 2 frames (before, the
    4-frame record counted as done and nothing ran); the note says what differs; a third run
    with the same settings skips the item."""
    output = tmp_path / "caps.jsonl"
    common = ["caption", clip, "--model", tiny_qwen_dir, "--max-new-tokens", 2, "--dtype", "float32",
              "--output", output]
    assert run_cli(capsys, *common, "--frames", 4)[0] == 0
    code, _, err = run_cli(capsys, *common, "--frames", 2, "--resume")
    assert code == 0, err
    four, two = read_jsonl(output)
    assert (four["frames"], two["frames"]) == (4, 2)  # the frames each caption was made from
    assert (four["settings"]["num_frames"], two["settings"]["num_frames"]) == (4, 2)
    assert four["settings_id"] != two["settings_id"]
    assert "1 item(s)" in err and "other settings" in err and "num_frames 4 (now 2)" in err
    code, _, err = run_cli(capsys, *common, "--frames", 2, "--resume")
    assert code == 0 and "resuming: 1 of 1 already" in err
    assert len(read_jsonl(output)) == 2


def test_records_carry_their_settings_and_the_package_version(capsys, tiny_qwen_dir, clip, tmp_path):
    code, out, err = run_cli(capsys, "caption", clip, "--model", tiny_qwen_dir, "--frames", 3, "--max-new-tokens", 2,
                             "--dtype", "float32", "--config", "aim_default", "--json")
    assert code == 0, err
    record = json.loads(out)
    settings = record["settings"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert record["version"] == version
    assert settings["model"] == os.path.realpath(tiny_qwen_dir)
    assert (settings["dtype"], settings["num_frames"], settings["max_new_tokens"]) == ("float32", 3, 2)
    assert settings["config"] == "aim_default"
    assert settings["config_sha256"] == load_reduction_config("aim_default").digest()
    assert record["settings_id"] == settings_id(settings)


def base_settings(**changes) -> dict:
    parts = {"model_dir": "/models/a", "dtype": "float32", "reduction": load_reduction_config("aim_default"),
             "sampling": SamplingOptions(), "generation": GenerationOptions(), "template": "qwen_1_5",
             "time_aware": False}
    return run_settings(**{**parts, **changes})


CHANGES = {
    "model": {"model_dir": "/models/b"},
    "dtype": {"dtype": "bfloat16"},
    "preset": {"reduction": load_reduction_config("baseline")},
    "preset_content": {"reduction": dataclasses.replace(
        load_reduction_config("aim_default"),
        options=dataclasses.replace(load_reduction_config("aim_default").options, merge_ratio=0.5))},
    "frames": {"sampling": SamplingOptions(num_frames=8)},
    "fps": {"sampling": SamplingOptions(fps=2.0, max_frames=32)},
    "start": {"sampling": SamplingOptions(start=1.0)},
    "end": {"sampling": SamplingOptions(end=3.0)},
    "backend": {"sampling": SamplingOptions(backend="pyav")},
    "max_new_tokens": {"generation": GenerationOptions(max_new_tokens=8)},
    "temperature": {"generation": GenerationOptions(do_sample=True, temperature=0.7)},
    "top_p": {"generation": GenerationOptions(top_p=0.9)},
    "seed": {"generation": GenerationOptions(seed=1)},
    "template": {"template": "qwen_2"},
    "time_aware": {"time_aware": True},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_setting_that_changes_a_record_changes_the_resume_key(change):
    assert settings_id(base_settings(**change)) != settings_id(base_settings())


def test_a_setting_that_changes_nothing_keeps_the_key():
    """Decoding with or without a CUDA graph gives the same tokens: resuming across it skips."""
    assert settings_id(base_settings(generation=GenerationOptions(cuda_graph=False))) == settings_id(base_settings())


def test_a_yaml_preset_is_keyed_by_its_content_not_its_name(tmp_path):
    """Editing a YAML between two runs changes the digest; renaming the file does not."""
    first = tmp_path / "mine.yaml"
    first.write_text("method: aim\nmerge_ratio: 0.25\n")
    renamed = tmp_path / "other.yaml"
    renamed.write_text("name: mine\nmethod: aim\nmerge_ratio: 0.25\n")
    edited = tmp_path / "edited.yaml"
    edited.write_text("name: mine\nmethod: aim\nmerge_ratio: 0.5\n")
    digests = [load_reduction_config(str(path)).digest() for path in (first, renamed, edited)]
    assert digests[0] == digests[1] != digests[2]


def test_a_fitprune_config_is_keyed_by_its_recipe_content(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"drop": [0, 1], "visual_tokens": 10, "alpha": 0.1}))
    before = load_reduction_config(f"fitprune:{recipe}").digest()
    recipe.write_text(json.dumps({"drop": [1, 1], "visual_tokens": 10, "alpha": 0.1}))
    assert load_reduction_config(f"fitprune:{recipe}").digest() != before


def test_eval_of_two_yamls_of_one_name(capsys, tiny_qwen_dir, clip, tmp_path):
    """The sweep layout exp1/config.yaml, exp2/config.yaml: each config has its own results file
    (keyed by content) and its own row; before, the second was refused as "being written by
    another aim-llava process". The same content twice is refused as what it is."""
    for folder, ratio in (("exp1", 0.25), ("exp2", 0.5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.yaml").write_text(f"method: aim\nmerge_ratio: {ratio}\nprune: null\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "q1", "video": str(clip), "question": "?", "options": ["a", "b"],
                                "answer": "A"}) + "\n")
    configs = f"{tmp_path}/exp1/config.yaml,{tmp_path}/exp2/config.yaml"
    common = ["eval", "--data", data, "--model", tiny_qwen_dir, "--frames", 2, "--max-new-tokens", 2,
              "--output", tmp_path / "out"]
    code, out, err = run_cli(capsys, *common, "--configs", configs)
    assert code == 0, err
    files = sorted((tmp_path / "out").glob("config-*.jsonl"))
    assert len(files) == 2
    tokens = {read_jsonl(path)[0]["settings"]["config_sha256"][:8]: read_jsonl(path)[0]["visual_tokens"]
              for path in files}
    digests = [load_reduction_config(f"{tmp_path}/{folder}/config.yaml").digest()[:8] for folder in ("exp1", "exp2")]
    assert tokens == {digests[0]: 2 * 49 + 1, digests[1]: 2 * 98 + 1}  # 196 tokens a frame merged to 25% / 50%
    assert f"| {tmp_path}/exp1/config.yaml |" in out and f"| {tmp_path}/exp2/config.yaml |" in out
    (tmp_path / "exp3").mkdir()
    (tmp_path / "exp3" / "config.yaml").write_text((tmp_path / "exp1" / "config.yaml").read_text())
    code, _, err = run_cli(capsys, *common, "--resume", "--configs", f"{configs},{tmp_path}/exp3/config.yaml")
    assert code == 2 and "the same reduction" in err and "exp3/config.yaml" in err


def test_eval_resume_with_other_frames_answers_again(capsys, tiny_qwen_dir, clip, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "q1", "video": str(clip), "question": "?", "options": ["a", "b"],
                                "answer": "A"}) + "\n")
    common = ["eval", "--data", data, "--model", tiny_qwen_dir, "--max-new-tokens", 2, "--output", tmp_path / "out"]
    assert run_cli(capsys, *common, "--frames", 3)[0] == 0
    code, _, err = run_cli(capsys, *common, "--frames", 2, "--resume")
    assert code == 0, err
    records = read_jsonl(tmp_path / "out" / "baseline.jsonl")
    assert [r["visual_tokens"] for r in records] == [3 * 196 + 1, 2 * 196 + 1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["items"] == 1 and summary[0]["mean_visual_tokens"] == 2 * 196 + 1
