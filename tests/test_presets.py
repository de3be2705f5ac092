"""Reduction presets and YAML config files."""

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
