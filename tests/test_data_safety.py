"""Nothing already written is lost: output files under a lock, never an input, never a special
file or a foreign file; hostile data files and images give one line and exit 2."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from aim_llava.cli import caption_key, main
from aim_llava.errors import CheckpointError
from aim_llava.records import ResultsFile
from aim_llava.sample_media import write_sample_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("safety") / "clip.mp4", num_frames=20, fps=10)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("aim-llava:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def caption(capsys, tiny_qwen_dir, *args):
    return run_cli(capsys, "caption", *args, "--model", tiny_qwen_dir, "--frames", 3, "--max-new-tokens", 2)


def test_second_writer_of_the_same_output_is_refused(capsys, tiny_qwen_dir, clip, tmp_path):
    output = tmp_path / "out.jsonl"
    earlier = {"video": "x.mp4", "question": "q", "config": "baseline", "text": "kept", "error": None}
    output.write_text(json.dumps(earlier) + "\n")
    with ResultsFile(output, caption_key, resume=True) as running:  # another run holds the file
        code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", output, "--resume")
        assert code == 2 and "being written by another aim-llava process" in one_error_line(err)
        running.append({**earlier, "video": "y.mp4"})
    assert [json.loads(line)["video"] for line in output.read_text().splitlines()] == ["x.mp4", "y.mp4"]


def test_two_processes_on_one_output_lose_nothing(tiny_qwen_dir, clip, tmp_path):
    """A second process started while a first one writes the output is refused at once, and every
    record of the first stays."""
    output = tmp_path / "out.jsonl"
    holder = ("import sys; from aim_llava.cli import caption_key; from aim_llava.records import ResultsFile\n"
              f"f = ResultsFile({str(output)!r}, caption_key)\n"
              "f.append({'video': 'a.mp4', 'question': 'q', 'config': 'c', 'error': None}); print('ready', flush=True)\n"
              "sys.stdin.readline()\n"
              "f.append({'video': 'b.mp4', 'question': 'q', 'config': 'c', 'error': None}); f.close()\n")
    first = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "ready"
    second = subprocess.run([sys.executable, "-m", "aim_llava.cli", "caption", str(clip), "--model", str(tiny_qwen_dir),
                             "--frames", "2", "--max-new-tokens", "2", "--output", str(output)],
                            capture_output=True, text=True, timeout=300)
    first.communicate("go\n", timeout=60)
    assert second.returncode == 2 and "being written by another aim-llava process" in second.stderr
    assert [json.loads(line)["video"] for line in output.read_text().splitlines()] == ["a.mp4", "b.mp4"]


def test_output_that_is_an_input_is_refused(capsys, tiny_qwen_dir, clip, tmp_path):
    before = clip.read_bytes()
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", clip)
    assert code == 2 and "is one of the inputs" in one_error_line(err)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{clip}\n")
    code, _, err = caption(capsys, tiny_qwen_dir, listing, "--output", listing)
    assert code == 2 and "is one of the inputs" in one_error_line(err)
    assert clip.read_bytes() == before and listing.read_text() == f"{clip}\n"


@pytest.mark.parametrize("resume", [True, False])
def test_foreign_file_is_never_overwritten(capsys, tiny_qwen_dir, clip, tmp_path, resume):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my shopping list\neggs\n")
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", notes, *(["--resume"] if resume else []))
    line = one_error_line(err)
    assert code == 2 and str(notes) in line and "not an aim-llava results file" in line
    assert notes.read_text() == "my shopping list\neggs\n"


def test_symlinked_output_is_written_through(capsys, tiny_qwen_dir, clip, tmp_path):
    target = tmp_path / "real" / "out.jsonl"
    target.parent.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["video"] == str(clip)


def test_special_file_output_is_refused(capsys, tiny_qwen_dir, clip, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", fifo)
    assert code == 2 and "not a regular file" in one_error_line(err)
    assert Path(fifo).exists() and not Path(fifo).is_file()


def test_resume_keeps_records_and_drops_only_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    good = {"video": "a.mp4", "question": "q", "settings_id": "s", "text": "t", "error": None}
    failed = {"video": "b.mp4", "question": "q", "settings_id": "s", "text": None, "error": "boom"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(failed) + "\n" + '{"video": "c.mp4", "quest')
    with ResultsFile(path, caption_key, resume=True) as results:
        assert results.done() == {("a.mp4", "q", "s")}
        results.append({**failed, "text": "again", "error": None})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [good, {**failed, "text": "again", "error": None}]  # one record per item, in order


def test_records_are_appended_not_rewritten(tmp_path):
    """Each record is one append: the file's earlier bytes are never rewritten while a run goes on."""
    path = tmp_path / "r.jsonl"
    with ResultsFile(path, caption_key) as results:
        inode = path.stat().st_ino
        for i in range(50):
            results.append({"video": f"{i}.mp4", "question": "q", "config": "c", "error": None})
            assert path.stat().st_ino == inode
        assert len(path.read_text().splitlines()) == 50


def bomb_png(path: Path, side: int = 40000) -> Path:
    """A tiny PNG whose header declares side x side pixels (PIL refuses it as a decompression bomb)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_one_items_error(capsys, tiny_qwen_dir, clip, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    lines = [{"id": "bomb", "video": str(bomb), "question": "?", "options": ["a", "b"], "answer": "A"},
             {"id": "fine", "video": str(clip), "question": "?", "options": ["a", "b"], "answer": "B"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", tiny_qwen_dir, "--frames", 2,
                           "--max-new-tokens", 2, "--output", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    records = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "baseline.jsonl").open()}
    assert "decompression bomb" in records["bomb"]["error"]
    assert records["fine"]["error"] is None and records["fine"]["text"] is not None


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_binary_list_or_data_file(capsys, tiny_qwen_dir, tmp_path, command):
    binary = tmp_path / ("videos.txt" if command == "caption" else "data.jsonl")
    binary.write_bytes(b"\xff\xfe\x00bad\x80\x81\n")
    args = [binary] if command == "caption" else ["--data", binary, "--output", tmp_path / "o"]
    code, _, err = run_cli(capsys, command, *args, "--model", tiny_qwen_dir)
    assert code == 2 and "is not UTF-8 text" in one_error_line(err)


HOSTILE_JSON_LINES = {"nested": "[" * 100_000, "long_integer": '{"id": ' + "1" * 5000 + "}"}


@pytest.mark.parametrize("line", HOSTILE_JSON_LINES.values(), ids=HOSTILE_JSON_LINES.keys())
@pytest.mark.parametrize("role", ["eval_data", "calibration_data", "results_file"])
def test_json_lines_the_standard_library_chokes_on(capsys, tiny_qwen_dir, clip, tmp_path, role, line):
    """json.loads raises RecursionError for deep nesting and a plain ValueError for integers of over
    4,300 digits, not JSONDecodeError: each data or results file holding such a line is one error
    line and exit 2, and a results file is left as it was."""
    hostile = tmp_path / "hostile.jsonl"
    good = json.dumps({"video": str(clip), "question": "q", "options": ["a", "b"], "answer": "A"})
    hostile.write_text(f"{good}\n{line}\n")
    if role == "eval_data":
        args = ["eval", "--data", hostile, "--output", tmp_path / "o", "--model", tiny_qwen_dir]
    elif role == "calibration_data":
        args = ["fitprune-calibrate", "--data", hostile, "--budget", 0.4, "--out", tmp_path / "r.json",
                "--model", tiny_qwen_dir]
    else:
        args = ["caption", clip, "--output", hostile, "--resume", "--model", tiny_qwen_dir]
    before = hostile.read_bytes()
    code, _, err = run_cli(capsys, *args)
    message = one_error_line(err)
    assert code == 2 and "line 2" in message and hostile.read_bytes() == before


def test_a_disk_that_fills_up_mid_run_is_one_line(capsys, tiny_qwen_dir, clip, tmp_path, monkeypatch):
    """What cannot be checked before the run (the disk filling up) ends it with one line and exit
    code 1; the records written before stay."""
    import errno

    output = tmp_path / "out.jsonl"
    original, calls = ResultsFile.append, []

    def append_until_full(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output))
        original(self, record)

    monkeypatch.setattr(ResultsFile, "append", append_until_full)
    second = write_sample_video(tmp_path / "second.mp4", num_frames=12, fps=10)
    code, _, err = caption(capsys, tiny_qwen_dir, clip, second, "--output", output, "--json")
    assert code == 1
    assert one_error_line(err) == (f"aim-llava: error: No space left on device: {output} (what was finished is "
                                   "saved; --resume goes on from there)")
    assert [json.loads(line)["video"] for line in output.read_text().splitlines()] == [str(clip)]


@pytest.mark.parametrize("name", ["output_file", "output_dir"])
def test_output_names_too_long_for_the_file_system(capsys, tiny_qwen_dir, clip, tmp_path, name):
    too_long = tmp_path / ("x" * 300)
    if name == "output_file":
        code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", too_long / "out.jsonl")
    else:
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps({"video": str(clip), "question": "q", "options": ["a", "b"], "answer": "A"}))
        code, _, err = run_cli(capsys, "eval", "--data", data, "--output", too_long, "--model", tiny_qwen_dir)
    assert code == 2 and "(File name too long)" in one_error_line(err)


@pytest.mark.parametrize("option", ["--config", "--data", "--model"])
def test_input_names_too_long_are_not_found(capsys, tiny_qwen_dir, clip, tmp_path, option):
    too_long = str(tmp_path / ("y" * 300))
    if option == "--data":
        code, _, err = run_cli(capsys, "eval", "--data", too_long, "--output", tmp_path / "o", "--model", tiny_qwen_dir)
    elif option == "--config":
        code, _, err = caption(capsys, tiny_qwen_dir, clip, "--config", too_long + ".yaml")
    else:
        code, _, err = run_cli(capsys, "caption", clip, "--model", too_long)
    assert code == 2 and too_long in one_error_line(err)


@pytest.mark.parametrize("kind", ["file", "parent_file", "read_only"])
def test_eval_output_checked_before_loading(capsys, tiny_qwen_dir, clip, tmp_path, monkeypatch, kind):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": 1, "video": str(clip), "question": "?", "options": ["a", "b"],
                                "answer": "A"}) + "\n")
    if kind == "file":
        output = tmp_path / "taken"
        output.write_text("a file")
        expected = "is a file"
    elif kind == "parent_file":
        (tmp_path / "plain").write_text("a file")
        output = tmp_path / "plain" / "sub"
        expected = "which is a file"
    else:
        # sysfs takes no new files, even from root (whom permission bits do not stop): only trying tells
        output = Path("/sys/aim-llava-eval")
        expected = "cannot be written (permission denied)"
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", tiny_qwen_dir, "--output", output)
    assert code == 2 and expected in one_error_line(err)


def test_bench_bad_outputs_and_configs(capsys, tiny_qwen_dir, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--model", tiny_qwen_dir, "--json", tmp_path)
    assert code == 2 and "is a directory" in one_error_line(err)
    code, _, err = run_cli(capsys, "bench", "--model", tiny_qwen_dir, "--configs", ",,")
    assert code == 2 and "names no config" in one_error_line(err)


def test_closed_stdout_pipe_keeps_the_record(tiny_qwen_dir, clip, tmp_path):
    output = tmp_path / "out.jsonl"
    command = (f"{sys.executable} -m aim_llava.cli caption {clip} --model {tiny_qwen_dir} --frames 2 "
               f"--max-new-tokens 2 --json --output {output} | head -c 0")
    result = subprocess.run(["bash", "-c", "set -o pipefail; " + command], capture_output=True, text=True,
                            timeout=300)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert json.loads(output.read_text())["video"] == str(clip)


def run_with_stdout(command: str, stdout) -> subprocess.CompletedProcess:
    """``aim-llava`` run in a child process whose stdout is ``stdout``, with the model's loading
    turned into a failure (so that a refusal is known to come before it)."""
    code = ("import sys, aim_llava.cli as cli, aim_llava.pipeline as pipeline\n"
            "def loading(*a, **k): raise SystemExit('the model was loaded')\n"
            "pipeline.VideoLLM.from_pretrained = loading\n"
            f"sys.exit(cli.main({command.split()!r}))\n")
    return subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


def test_output_that_is_the_commands_own_stdout_is_refused_before_loading(tiny_qwen_dir, clip, tmp_path):
    """--output /dev/stdout with stdout redirected to a file: the record was written at offset 0
    over the caption already printed there (a corrupt JSONL). With stdout a pipe, the command
    failed after inference with "No such file or directory: /proc/N/fd/pipe:[...]". Both are
    refused before the model is loaded, with exit code 2."""
    command = f"caption {clip} --model {tiny_qwen_dir} --frames 2 --max-new-tokens 2 --output "
    printed = tmp_path / "printed.txt"
    for output in ("/dev/stdout", "/proc/self/fd/1", str(printed)):
        with open(printed, "w") as stdout:
            result = run_with_stdout(command + output, stdout)
        assert result.returncode == 2, result.stderr
        assert "is this command's standard output" in one_error_line(result.stderr)
        assert printed.read_text() == ""
    piped = run_with_stdout(command + "/dev/stdout", subprocess.PIPE)
    assert piped.returncode == 2 and "is not a regular file (a device or pipe)" in one_error_line(piped.stderr)


@pytest.mark.parametrize("output", ["/sys/aim-llava.jsonl", "/proc/aim-llava/out.jsonl"])
def test_an_output_that_cannot_be_written_is_found_before_loading(capsys, tiny_qwen_dir, clip, monkeypatch, output):
    """Permission bits do not tell (root passes them everywhere, and so does a read-only mount):
    writing is tried before the model is loaded. Before, these failed at the first write with
    exit code 1 and "what was finished is saved"."""
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", output)
    assert code == 2 and "cannot be written" in one_error_line(err) and "what was finished" not in err


def test_missing_video_reported_without_loading_the_model(capsys, tiny_qwen_dir, tmp_path, monkeypatch):
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, err = caption(capsys, tiny_qwen_dir, tmp_path / "absent.mp4")
    assert code == 2 and "file not found" in one_error_line(err)


def test_interrupted_is_on_its_own_line(tiny_qwen_dir, clip, tmp_path):
    """Ctrl-C during a batch: the message starts a line of its own, after the progress bar."""
    code = ("import aim_llava.cli as cli, aim_llava.pipeline as pipeline, sys\n"
            "def stop(*a, **k): raise KeyboardInterrupt\n"
            "pipeline.VideoLLM.answer_batch = stop\n"
            f"sys.exit(cli.main(['caption', {str(clip)!r}, {str(clip)!r}, '--model', {str(tiny_qwen_dir)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130
    assert any(line.startswith("aim-llava: interrupted") for line in result.stderr.replace("\r", "\n").splitlines())


@pytest.mark.parametrize("kind, words", [("directory", "is a directory"), ("parent_file", "is a file, not a directory")])
def test_caption_output_checked_before_loading(capsys, tiny_qwen_dir, clip, tmp_path, monkeypatch, kind, words):
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    if kind == "directory":
        output = tmp_path
    else:
        (tmp_path / "plain").write_text("a file")
        output = tmp_path / "plain" / "out.jsonl"
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", output)
    assert code == 2 and words in one_error_line(err)


def eval_data(tmp_path: Path, clip: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "q1", "video": str(clip), "question": "?", "options": ["a", "b"],
                                "answer": "A"}) + "\n")
    return data


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_a_second_run_without_resume_never_truncates(capsys, tiny_qwen_dir, clip, tmp_path, monkeypatch, command):
    """Results written by a run are not wiped by the next run into the same output: without
    --resume or --overwrite it is refused in one line, before the model loads, the file as it was.
    (Before, the second run started the file afresh without a word.)"""
    second = write_sample_video(tmp_path / "second.mp4", num_frames=12, fps=10)
    if command == "caption":
        output = tmp_path / "caps.jsonl"
        code, _, err = caption(capsys, tiny_qwen_dir, clip, second, "--output", output)
    else:
        output = tmp_path / "out" / "baseline.jsonl"
        code, _, err = run_cli(capsys, "eval", "--data", eval_data(tmp_path, clip), "--model", tiny_qwen_dir,
                               "--frames", 2, "--max-new-tokens", 2, "--output", output.parent)
    assert code == 0, err
    before = output.read_bytes()
    import aim_llava.pipeline as pipeline

    monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    if command == "caption":
        code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", output)
    else:
        code, _, err = run_cli(capsys, "eval", "--data", eval_data(tmp_path, second), "--model", tiny_qwen_dir,
                               "--frames", 2, "--output", output.parent)
    line = one_error_line(err)
    assert code == 2 and str(output) in line and "--resume" in line and "--overwrite" in line
    assert output.read_bytes() == before


def test_overwrite_replaces_the_file_whole_at_the_end(capsys, tiny_qwen_dir, clip, tmp_path, monkeypatch):
    """--overwrite replaces the records, atomically: while the run goes on a reader sees the old
    file whole; at the end the new one, with the old one's permissions, and no temporary file."""
    import stat

    output = tmp_path / "caps.jsonl"
    old = "".join(json.dumps({"video": f"{i}.mp4", "question": "q", "text": "old", "error": None}) + "\n"
                  for i in range(3))
    output.write_text(old)
    output.chmod(0o640)
    seen, append = [], ResultsFile.append

    def append_and_look(self, record):
        append(self, record)
        seen.append(output.read_text())

    monkeypatch.setattr(ResultsFile, "append", append_and_look)
    second = write_sample_video(tmp_path / "second.mp4", num_frames=12, fps=10)
    code, _, err = caption(capsys, tiny_qwen_dir, clip, second, "--output", output, "--overwrite")
    assert code == 0, err
    assert seen == [old, old]
    assert [json.loads(line)["video"] for line in output.read_text().splitlines()] == [str(clip), str(second)]
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.jsonl", "second.mp4"]


@pytest.mark.parametrize("failure", ["caption: model fails to load", "caption: Ctrl-C while loading",
                                     "eval: second config's file refused"])
def test_overwrite_that_stops_before_its_first_record_keeps_the_old_file(capsys, tiny_qwen_dir, clip, tmp_path,
                                                                         monkeypatch, failure):
    """An --overwrite run that ends before it wrote a record leaves the old file byte for byte (it
    was replaced by the new, empty one: a model that failed to load wiped the records)."""
    import aim_llava.pipeline as pipeline

    old = "".join(json.dumps({"id": f"q{i}", "video": f"{i}.mp4", "question": "q", "text": "old", "error": None})
                  + "\n" for i in range(3))
    if failure.startswith("caption"):
        output = tmp_path / "caps.jsonl"
        output.write_text(old)
        interrupted = "Ctrl-C" in failure

        def fail_to_load(*args, **kwargs):
            raise KeyboardInterrupt() if interrupted else CheckpointError("model.safetensors is truncated")

        monkeypatch.setattr(pipeline.VideoLLM, "from_pretrained", fail_to_load)
        code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", output, "--overwrite")
        assert code == (130 if interrupted else 2), err
    else:
        output = tmp_path / "out" / "baseline.jsonl"
        output.parent.mkdir()
        output.write_text(old)
        (output.parent / "fastv_default.jsonl").write_text("not a results file\n")
        code, _, err = run_cli(capsys, "eval", "--data", eval_data(tmp_path, clip), "--model", tiny_qwen_dir,
                               "--frames", 2, "--max-new-tokens", 2, "--output", output.parent,
                               "--configs", "baseline,fastv_default", "--overwrite")
        assert code == 2 and "fastv_default.jsonl" in one_error_line(err)
    assert output.read_text() == old
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []


def test_resume_and_overwrite_together_are_refused(capsys, tiny_qwen_dir, clip, tmp_path):
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--output", tmp_path / "o.jsonl", "--resume", "--overwrite")
    assert code == 2 and "give one of the two" in one_error_line(err)
    code, _, err = caption(capsys, tiny_qwen_dir, clip, "--overwrite")
    assert code == 2 and "--overwrite needs --output" in one_error_line(err)


def test_every_file_written_has_the_permissions_of_the_umask(capsys, tiny_qwen_dir, clip, tmp_path):
    """Under umask 022 every file a command writes is 0644: bench's --json, eval's summary.json
    and a results file rewritten by --resume. (They were 0600: an atomic write through mkstemp
    keeps its private mode.)"""
    import stat

    previous = os.umask(0o022)
    try:
        report = tmp_path / "bench.json"
        code, _, err = run_cli(capsys, "bench", "--model", tiny_qwen_dir, "--configs", "baseline", "--frames", 1,
                               "--text-tokens", 4, "--decode-tokens", 1, "--repeats", 1, "--device", "cpu",
                               "--json", report)
        assert code == 0, err
        data = eval_data(tmp_path, clip)
        common = ["eval", "--data", data, "--model", tiny_qwen_dir, "--frames", 2, "--max-new-tokens", 2,
                  "--output", tmp_path / "out"]
        assert run_cli(capsys, *common)[0] == 0
        records = tmp_path / "out" / "baseline.jsonl"
        failed = {**json.loads(records.read_text()), "error": "interrupted"}
        records.write_text(json.dumps(failed) + "\n")
        assert run_cli(capsys, *common, "--resume")[0] == 0  # the failed item done again: the file is rewritten
        assert len(records.read_text().splitlines()) == 1 and json.loads(records.read_text())["error"] is None
        written = [report, tmp_path / "out" / "summary.json", records]
        assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
            path.name: "0o644" for path in written}
    finally:
        os.umask(previous)
