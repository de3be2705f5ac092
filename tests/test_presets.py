"""Reduction presets and YAML config files."""

import json
from pathlib import Path

import pytest

from aim_llava.reduction.config import (
    ConfigError,
    ReductionConfig,
    available_presets,
    load_reduction_config,
)


def test_baseline_preset():
    assert "baseline" in available_presets()
    config = load_reduction_config("baseline")
    assert config == ReductionConfig(name="baseline", method="none")
    assert load_reduction_config(None) == config


def test_every_preset_loads_and_fits_28_and_24_layers():
    for name in available_presets():
        config = load_reduction_config(name)
        assert config.name == name
        for depth in (28, 24):
            config.build(depth)


def test_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: none\n")
    assert load_reduction_config(path).name == "mine"


@pytest.mark.parametrize(
    "text, message",
    [("methd: none\n", "unknown key 'methd'"), ("method: magic\n", "unknown reduction method"),
     ("method: [unclosed\n", "not valid YAML"), ("- a list\n", "mapping")],
)
def test_bad_yaml(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_reduction_config(path)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_reduction_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'aim_fastest'"):
        load_reduction_config("aim_fastest")


def test_budget_spec_needs_a_model_and_frames():
    with pytest.raises(ConfigError, match="solved for a model and a frame count"):
        load_reduction_config("budget:0.15")


def test_wheel_and_sdist_ship_every_preset(tmp_path):
    """A non-editable install (from the wheel) finds every preset by name; the sdist holds them."""
    import subprocess
    import sys
    import tarfile
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    expected = available_presets()
    build = (f"import os; os.chdir({str(repo)!r}); from setuptools import build_meta as b; "
             f"b.build_wheel({str(tmp_path)!r}); b.build_sdist({str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(n).stem for n in archive.namelist() if n.startswith("aim_llava/configs/") and n.endswith(".yaml")}
        archive.extractall(tmp_path / "site")
    assert shipped == set(expected)
    with tarfile.open(sdist) as archive:
        assert {Path(n).stem for n in archive.getnames() if "/configs/" in n and n.endswith(".yaml")} == set(expected)
    site = str(tmp_path / "site")
    check = (f"import sys; sys.path.insert(0, {site!r}); import aim_llava.configs, aim_llava.reduction.config as c; "
             f"assert aim_llava.configs.__file__.startswith({site!r}), aim_llava.configs.__file__; "
             "print(','.join(c.available_presets())); c.load_reduction_config('aim_default')")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1].split(",") == expected


REPO = Path(__file__).resolve().parent.parent


def presets_command(capsys, *args) -> str:
    from aim_llava.cli import main

    assert main(["presets", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_the_list_names_every_preset_file_with_its_description(capsys):
    out = presets_command(capsys)
    files = sorted(REPO.glob("configs/*.yaml"))
    assert len(files) >= 19
    for path in files:
        first_comment = path.read_text().splitlines()[0].lstrip("# ")
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [path.stem]]
        assert first_comment in line
    assert [line.split()[1] for line in out.splitlines() if line.startswith("baseline ")] == ["100%"]


def test_one_preset_shows_its_yaml_schedule_and_flops(capsys):
    """aim_default on the 7B architecture, 32 frames, 100 text tokens: the published schedule
    (SPEC: 1569 visual tokens; after layer 14 keep int(1569 * (1 - (l - 14 + 1) * 0.125))) and the
    published prefill figures (99.63 and 14.76 TFLOPs; ours 99.47 in the same accounting)."""
    out = presets_command(capsys, "aim_default")
    assert out.startswith((REPO / "configs" / "aim_default.yaml").read_text().rstrip())
    report = json.loads(presets_command(capsys, "aim_default", "--json"))
    visual = 32 * 49 + 1
    expected = [visual if layer <= 14 else int(visual * max(0.0, 1 - (layer - 14) * 0.125)) for layer in range(28)]
    assert report["visual_tokens_per_layer"] == expected
    assert report["baseline_visual_tokens"] == 32 * 196 + 1
    assert report["prefill_tflops"] == pytest.approx(14.76, abs=0.01)
    assert report["prefill_flops_fraction"] == pytest.approx(14.76 / 99.47, abs=1e-3)
    assert "layers 0-14: 1569, layer 15: 1372" in out and "14.8% of the baseline's 99.47" in out


def test_fastv_schedule_on_another_architecture_and_frame_count(capsys):
    """FastV keeps every visual token up to its layer 2, then half of them (SPEC §5)."""
    report = json.loads(presets_command(capsys, "fastv_default", "--arch", "llava-onevision-qwen2-0.5b",
                                        "--frames", 8, "--json"))
    visual = 8 * 196 + 1
    assert report["visual_tokens_per_layer"] == [visual] * 2 + [int(visual * (1 - 0.5))] * 22


def test_unknown_preset_is_one_line(capsys):
    from aim_llava.cli import main

    assert main(["presets", "aim_fastest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preset 'aim_fastest'" in err


def test_readme_preset_table_is_the_commands(capsys):
    """The README's table is `aim-llava presets --markdown`, so it lists every preset (it missed
    fastv_budget15, pool_12 and random_12)."""
    table = presets_command(capsys, "--markdown").strip()
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- presets table: aim-llava presets --markdown -->") + len(
        "<!-- presets table: aim-llava presets --markdown -->")
    assert readme[start:readme.index("<!-- end of presets table -->")].strip() == table
    for name in available_presets():
        assert f"| `{name}` |" in table
