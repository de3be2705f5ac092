"""The options of the aim-llava command: help and defaults everywhere, --version, sampling on the
command line, serve's positional model, bench's --json/--output and progress."""

import argparse
import json
from pathlib import Path

import pytest
import tomllib

from aim_llava.cli import CliError, build_parser, main, serve_model, server_limits
from aim_llava.sample_media import write_sample_video
from aim_llava.server.limits import ServerLimits

REPO = Path(__file__).resolve().parent.parent


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_and_shows_its_default(command, monkeypatch):
    """Before, --help hid defaults (--max-new-tokens 256, but 8 in eval; bench's --frames 16
    --repeats 3; flops' --frames 32) and --dtype, --attn, --model had no help in eval and serve."""
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: a default is never wrapped
    parser = subcommands()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and action.default is not None and action.default != []:
            start = text.index(f"\n  {action.option_strings[0]} ")
            entry = text[start: text.find("\n  -", start + 1)]  # the option's lines, up to the next option
            assert f"(default: {action.default})" in entry, entry


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"aim-llava {version}"


def test_sampling_options_reach_the_model(capsys, tiny_qwen_dir, tmp_path):
    """--temperature, --top-p and --seed give the reply the Python API gives with the same
    options, and are recorded in the record's settings."""
    from aim_llava.pipeline import SamplingOptions, VideoLLM

    clip = write_sample_video(tmp_path / "clip.mp4", num_frames=10)
    options = ["--temperature", "1.5", "--top-p", "0.95", "--seed", "7"]
    code = main(["caption", str(clip), "--model", str(tiny_qwen_dir), "--frames", "2", "--max-new-tokens", "12",
                 "--dtype", "float32", "--device", "cpu", "--json", *options])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    llm = VideoLLM.from_pretrained(tiny_qwen_dir, device="cpu", dtype="float32", sampling=SamplingOptions(num_frames=2))
    sampled = llm.caption(str(clip), max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    greedy = llm.caption(str(clip), max_new_tokens=12)
    assert record["text"] == sampled != greedy
    assert {k: record["settings"][k] for k in ("do_sample", "temperature", "top_p", "seed")} == {
        "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7}


@pytest.mark.parametrize("args, message", [
    (["--seed", "3"], "--seed shapes sampling"),
    (["--top-p", "1.5", "--temperature", "1"], "--top-p: must lie in (0, 1]"),
    (["--stream", "--json"], "give one of the two"),
])
def test_sampling_and_output_options_that_cannot_work(capsys, tiny_qwen_dir, tmp_path, args, message):
    assert main(["caption", str(tmp_path / "clip.mp4"), "--model", str(tiny_qwen_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_takes_the_model_as_its_argument(monkeypatch):
    """``aim-llava serve MODEL`` as ``vllm serve MODEL``; --model still works; two models are refused."""
    monkeypatch.delenv("AIM_LLAVA_MODEL", raising=False)
    parse = build_parser().parse_args
    assert serve_model(parse(["serve", "org/model", "--media-root", "."])) == "org/model"
    assert serve_model(parse(["serve", "--model", "dir", "--media-root", "."])) == "dir"
    monkeypatch.setenv("AIM_LLAVA_MODEL", "from/env")
    assert serve_model(parse(["serve", "--media-root", "."])) == "from/env"
    with pytest.raises(CliError, match="two models given"):
        serve_model(parse(["serve", "a", "--model", "b", "--media-root", "."]))


def test_bench_json_on_stdout_report_file_and_progress(capsys, tiny_qwen_dir, tmp_path):
    """``--json`` prints the report as JSON (as the other commands' --json does), ``--output FILE``
    writes it, and progress goes to stderr (before, bench printed nothing for minutes)."""
    report = tmp_path / "report.json"
    code = main(["bench", "--model", str(tiny_qwen_dir), "--configs", "baseline,aim_default", "--frames", "1",
                 "--text-tokens", "4", "--decode-tokens", "1", "--repeats", "1", "--device", "cpu", "--json",
                 "--output", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    printed = json.loads(out)
    assert printed == json.loads(report.read_text())
    assert [row["config"] for row in printed["rows"]] == ["baseline", "aim_default"]
    assert "4/4" in err and "round 1/1: aim_default" in err


def test_serve_flags_set_the_media_decoding_budgets(capsys):
    """--media-readers, --media-cpu-seconds and --media-memory-mb reach the server's limits (in
    bytes); left out, the documented defaults hold; a value that is not positive is one line, exit 2."""
    parse = build_parser().parse_args
    limits = server_limits(parse(["serve", "m", "--media-root", ".", "--media-readers", "2",
                                  "--media-cpu-seconds", "7.5", "--media-memory-mb", "512"]))
    assert (limits.media_readers, limits.media_cpu_s, limits.media_memory_bytes) == (2, 7.5, 512 * 1024 * 1024)
    defaults = ServerLimits()
    limits = server_limits(parse(["serve", "m", "--media-root", "."]))
    assert (limits.media_readers, limits.media_cpu_s, limits.media_memory_bytes) == (
        defaults.media_readers, defaults.media_cpu_s, defaults.media_memory_bytes)
    assert main(["serve", "m", "--media-root", ".", "--media-memory-mb", "0"]) == 2
    assert "--media-memory-mb: must be at least 1, got 0" in capsys.readouterr().err
