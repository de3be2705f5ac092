"""Model families as a layout: the registry, what the families share (multimodal RoPE in our
decoder, token state with positions of any rank), and how a family we do not run is refused."""

import json

import pytest
import torch

from aim_llava.errors import CheckpointError
from aim_llava.model.families import FAMILIES, family_for_model_type, family_named, read_config_file
from aim_llava.model.language_model.modeling_qwen2 import RotaryEmbedding, apply_rotary
from aim_llava.reduction.tokens import TokenState, keep_tokens


def test_every_family_entry_loads_its_family_object():
    for name, entry in FAMILIES.items():
        family = family_named(name)
        assert family.name == name and family.model_types == entry.model_types and family.title == entry.title
        for model_type in entry.model_types:
            assert family_for_model_type(model_type) is family


def test_a_family_we_do_not_run_names_the_ones_we_do(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(CheckpointError) as error:
        read_config_file(tmp_path / "config.json")
    message = str(error.value)
    assert "'internvl_chat' is not a model family aim-llava runs" in message and "\n" not in message
    for entry in FAMILIES.values():
        assert entry.title in message and all(model_type in message for model_type in entry.model_types)


def test_cli_refuses_another_family_in_one_line(tmp_path, capsys):
    from aim_llava.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not read: the model is checked first")
    code = main(["ask", str(video), "What happens?", "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "model_type 'qwen3_vl' is not a model family aim-llava runs" in err and "Qwen2.5-VL" in err


def test_multimodal_rope_equals_transformers_qwen2_5_vl():
    """Our table lookup with (t, h, w) positions against transformers' Qwen2_5_VLRotaryEmbedding and
    its rotation, on positions whose three axes differ."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    section = [2, 3, 3]
    config = Qwen2_5_VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    theirs = Qwen2_5_VLRotaryEmbedding(config)
    ours = RotaryEmbedding(16, 1e6, 4096, tuple(section))
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4000, (3, 2, 9), generator=generator)  # transformers' layout [3, B, L]
    x = torch.randn(2, 4, 9, 16, generator=generator)
    cos_ref, sin_ref = theirs(x, positions)
    cos, sin = ours(positions.permute(1, 2, 0), torch.float32)  # ours: [B, L, 3]
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    rotated_ref, _ = apply_rotary_pos_emb(x, x, cos_ref, sin_ref)
    assert torch.equal(apply_rotary(x, cos, sin), rotated_ref)
    # equal axes are the 1-D embedding, so decoding steps look positions up as before
    plain = positions[0]
    assert torch.equal(ours(plain[..., None].expand(-1, -1, 3), torch.float32)[0], ours(plain, torch.float32)[0])


def test_mrope_section_must_cover_half_the_head():
    with pytest.raises(ValueError, match="add up to half the head size"):
        RotaryEmbedding(16, 1e6, 64, (2, 3, 2))


def test_removing_rows_carries_three_axis_positions():
    """Rows kept by ``keep_tokens`` in remove mode keep their (t, h, w), in order, right-aligned
    behind padding; mask mode keeps every row where it was."""
    generator = torch.Generator().manual_seed(1)
    batch, n = 2, 7
    positions = torch.randint(0, 50, (batch, n, 3), generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    visual = torch.zeros(batch, n, dtype=torch.bool)
    visual[:, 2:6] = True
    state = TokenState.start(torch.randn(batch, n, 4, generator=generator), positions, valid, visual, False,
                             [4, 4], [n, n])
    keep = ~visual.clone()
    keep[0, [3, 5]] = True  # sample 0 keeps two visual rows, sample 1 one
    keep[1, 4] = True
    removed = keep_tokens(state, keep, "remove", [2, 1])
    for b in range(batch):
        rows = keep[b].nonzero().flatten()
        width = removed.position_ids.shape[1]
        assert torch.equal(removed.position_ids[b, width - len(rows):], positions[b, rows])
        assert torch.equal(removed.hidden[b, width - len(rows):], state.hidden[b, rows])
    masked = keep_tokens(state, keep, "mask", [2, 1])
    assert torch.equal(masked.position_ids, positions) and torch.equal(masked.alive, keep)
