"""docs/records.schema.json describes the records the commands write: real caption, ask and eval
records (answered and failed) are checked against it, and their per-layer visual tokens and FLOPs
fraction against the analytic report of the same setting."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from aim_llava.cli import main
from aim_llava.flops import resolve_architecture
from aim_llava.preset_report import preset_report
from aim_llava.sample_media import write_sample_video

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "records.schema.json").read_text())
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
KNOWN_KEYWORDS = {"$schema", "title", "description", "$defs", "$ref", "oneOf", "type", "required",
                  "additionalProperties", "properties", "items", "enum", "minimum"}


def is_type(value, name: str) -> bool:
    if name in ("integer", "number"):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return numeric and (name == "number" or float(value).is_integer())
    return isinstance(value, JSON_TYPES[name])


def violations(value, schema: dict, where: str = "record") -> list[str]:
    """What in ``value`` breaks ``schema`` (the JSON Schema keywords the file uses; any other
    keyword fails, so that the file never says more than is checked)."""
    unknown = set(schema) - KNOWN_KEYWORDS
    assert not unknown, f"{where}: keywords this check does not know: {unknown}"
    if "$ref" in schema:
        return violations(value, SCHEMA["$defs"][schema["$ref"].removeprefix("#/$defs/")], where)
    if "oneOf" in schema:
        matching = [option for option in schema["oneOf"] if not violations(value, option, where)]
        return [] if len(matching) == 1 else [f"{where}: matches {len(matching)} of the oneOf schemas"]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if types and not any(is_type(value, name) for name in types):
        return [f"{where}: {value!r} is not {'/'.join(types)}"]
    found = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and is_type(value, "number") and value < schema["minimum"]:
        found.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        found += [f"{where}: no {name!r}" for name in schema.get("required", []) if name not in value]
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            found += [f"{where}: unexpected {name!r}" for name in value if name not in properties]
        for name, item in value.items():
            if name in properties:
                found += violations(item, properties[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += violations(item, schema["items"], f"{where}[{index}]")
    return found


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    write_sample_video(root / "clip.mp4", num_frames=20, fps=10)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "red.png")
    return root


def run_json(capsys, *args) -> list[dict]:
    main([str(a) for a in args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_the_check_finds_what_breaks_the_schema():
    record = {"video": "v.mp4", "question": "q", "config": "baseline", "text": None, "error": "boom",
              "settings": {}, "settings_id": "x", "version": "0"}
    assert violations(record, SCHEMA) == ["record: matches 0 of the oneOf schemas"]
    assert any("settings: no 'model'" in v for v in violations(record, SCHEMA["$defs"]["caption"]))
    assert "record.video: 3 is not string" in violations({"video": 3}, SCHEMA["$defs"]["caption"])


def test_caption_and_ask_records_follow_the_schema(capsys, tiny_qwen_dir, media):
    common = ["--model", tiny_qwen_dir, "--frames", 3, "--max-new-tokens", 2, "--dtype", "float32", "--json"]
    records = run_json(capsys, "caption", media / "clip.mp4", media / "red.png", media / "absent.mp4",
                       "--config", "aim_default", *common)
    records += run_json(capsys, "ask", media / "clip.mp4", "What moves?", *common)
    assert [r["error"] is None for r in records] == [True, True, False, True]
    for record in records:
        assert violations(record, SCHEMA) == [], record


def test_eval_records_follow_the_schema(capsys, tiny_qwen_dir, media, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": name, "video": str(media / name), "question": "?",
                                        "options": ["a", "b"], "answer": "B"}) + "\n"
                            for name in ("clip.mp4", "absent.mp4")))
    main(["eval", "--data", str(data), "--model", str(tiny_qwen_dir), "--frames", "2", "--max-new-tokens", "2",
          "--output", str(tmp_path / "out")])
    records = [json.loads(line) for line in (tmp_path / "out" / "baseline.jsonl").read_text().splitlines()]
    assert [r["error"] is None for r in records] == [True, False]
    for record in records:
        assert violations(record, SCHEMA) == [], record


@pytest.mark.parametrize("preset", ["aim_default", "fastv_default", "aim_prune_only"])
def test_per_layer_tokens_counted_in_the_run_are_the_analytic_ones(capsys, tiny_qwen_dir, media, preset):
    """What FastV and AIM's pruning do shows in the record (before, its visual_tokens, the count
    entering the LLM, made them look like the baseline): the tokens counted in the run at each
    layer are those of `aim-llava presets` for the same setting, and the FLOPs fraction is the
    SPEC's (docs/algorithms.md §4) over them, each layer charged with the tokens leaving it."""
    (record,) = run_json(capsys, "caption", media / "clip.mp4", "--model", tiny_qwen_dir, "--frames", 3,
                         "--max-new-tokens", 2, "--config", preset, "--json")
    name, arch = resolve_architecture(str(tiny_qwen_dir))
    text_tokens = record_text_tokens(tiny_qwen_dir, record["question"])
    report = preset_report(preset, name, arch, 3, text_tokens)
    entering = record["visual_tokens_per_layer"]
    assert entering == report.visual_tokens_per_layer
    assert entering[-1] < record["visual_tokens"]
    leaving = entering[1:] + [last_layer_leaving(preset, entering)]
    side = math.ceil(arch.vision.image_size // arch.vision.patch_size / 2)  # SPEC §1: each frame pooled 2x2
    unreduced = 3 * side * side + 1  # and one newline token after the frames
    fraction = (spec_prefill_flops(arch.text, [n + text_tokens for n in leaving])
                / spec_prefill_flops(arch.text, [unreduced + text_tokens] * len(entering)))
    assert record["prefill_flops_fraction"] == pytest.approx(fraction, abs=1e-4)


def last_layer_leaving(preset: str, entering: list[int]) -> int:
    """Visual tokens kept after the last layer: FastV prunes once, early; AIM's schedule (SPEC §3)
    keeps int(V * (1 - (l - start + 1) * 0.125)) of V after layer l >= start, its first pruning layer."""
    if preset == "fastv_default":
        return entering[-1]
    visual = entering[0]
    start = next(layer for layer in range(len(entering) - 1) if entering[layer + 1] < visual)
    return int(visual * max(0.0, 1 - (len(entering) - start) * 0.125))


def spec_prefill_flops(text, tokens_per_layer: list[int]) -> float:
    """docs/algorithms.md §4: 2 n P + 4 n^2 H a layer, P its linear weights (q, o, k, v, gate, up, down)."""
    h, kv = text.hidden_size, text.num_key_value_heads * text.head_dim
    params = 2 * h * h + 2 * h * kv + 3 * h * text.intermediate_size
    return sum(2 * n * params + 4 * n * n * h for n in tokens_per_layer)


def record_text_tokens(model_dir: Path, question: str) -> int:
    """The text tokens of the caption prompt, counted with the checkpoint's own tokenizer."""
    from aim_llava.conversation import build_prompt
    from aim_llava.mm_utils import tokenizer_image_token
    from aim_llava.model.builder import load_tokenizer

    return len(tokenizer_image_token(build_prompt(question), load_tokenizer(Path(model_dir)))) - 1
