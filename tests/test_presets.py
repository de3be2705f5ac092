"""Reduction presets and YAML config files."""

import pytest

from aim_llava.reduction.config import ConfigError, ReductionConfig, available_presets, load_reduction_config


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
