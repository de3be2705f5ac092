"""Code written for LLaVA-NeXT, run against aim_llava: the names its scripts import, the opt-in
``llava`` alias, and two clients no one here wrote: lmms-eval's own ``llava_onevision`` model
(installed, unmodified) and LLaVA-NeXT's OneVision video tutorial.

Videos are 384x384, the tiny checkpoint's image size, so that no frame is resized: the host (PIL)
resize that LLaVA-NeXT code calls and the device resize of aim_llava's pipeline agree only within
2/255 (tests/test_preprocessing.py), and these tests compare texts. The models run in float16,
LLaVA-NeXT's default, which also makes the frames' float16 rounding in lmms-eval and the
tutorial (``.half()``) lose nothing against aim_llava's float32 pixels cast to the model's dtype.
"""

import ast
import base64
import copy
import dataclasses
import importlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lmms_eval_logged_replies, prompt_ids, random_image, run_lmms_eval, write_mcq_task
from PIL import Image

from aim_llava import load_pretrained_model
from aim_llava.cli import main as cli_main
from aim_llava.compat import AliasError, alias_llava, installed_alias, main, unalias_llava
from aim_llava.conversation import SeparatorStyle, conv_templates, default_conversation, get_conversation
from aim_llava.errors import CheckpointError, InputError, NotProvidedError
from aim_llava.mm_utils import (
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    load_image_from_base64,
    process_images,
)
from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM
from aim_llava.sample_media import write_sample_video

QUESTIONS = [  # (question, options, frames in the video): replies of the tiny model differ between them
    ("What does the clip show?", ["bars", "a cat"], 5),
    ("Which colour dominates the bars at the end?", ["red", "green", "blue", "white"], 12),
    ("What happens first?", ["a jump", "a fall", "a run"], 30),
]
MAX_NEW_TOKENS = 8


@pytest.fixture
def llava_alias():
    """alias_llava, removed again after the test."""
    yield alias_llava
    unalias_llava()


def square_video(path: Path, num_frames: int) -> Path:
    return write_sample_video(path, num_frames=num_frames, height=384, width=384)


def llava_imports(source: str) -> list[tuple[str, str]]:
    """Every (module, name) of a ``from llava... import name`` in Python source."""
    return [(node.module, alias.name) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llava"
            for alias in node.names]


def test_every_name_lmms_eval_llava_onevision_imports_comes_through_the_alias(llava_alias):
    source = importlib.util.find_spec("lmms_eval.models.simple.llava_onevision").origin  # read, not imported
    wanted = llava_imports(Path(source).read_text())
    assert ("llava.model.builder", "load_pretrained_model") in wanted and len(wanted) >= 10
    llava_alias()
    for module, name in wanted:
        assert getattr(importlib.import_module(module), name) is not None, (module, name)


def test_names_left_out_on_purpose_fail_with_a_message_not_an_attribute_error():
    for statement, reason in [
        ("from aim_llava.mm_utils import process_highres_image", "highres"),
        ("from aim_llava.constants import LOGDIR", "aim-llava serve"),
        ("from aim_llava.conversation import conv_llava_llama_3", "qwen_1_5"),
    ]:
        with pytest.raises(NotProvidedError, match=reason):
            exec(statement, {})
    with pytest.raises(InputError, match="known: qwen_1_5"):
        conv_templates["vicuna_v1"]
    with pytest.raises(NotProvidedError, match="ChatML"):
        dataclasses.replace(conv_templates["qwen_1_5"], sep_style=SeparatorStyle.TWO)
    import aim_llava.mm_utils

    assert not hasattr(aim_llava.mm_utils, "no_such_name")  # names LLaVA-NeXT never had stay AttributeErrors


def test_get_model_name_from_path_names_models_as_llava_next_does():
    assert get_model_name_from_path("model/llava-onevision-qwen2-7b-ov/") == "llava-onevision-qwen2-7b-ov"
    assert get_model_name_from_path(Path("runs/llava-ov/checkpoint-500")) == "llava-ov_checkpoint-500"
    assert get_model_name_from_path("checkpoint-500") == "checkpoint-500"


def test_conversation_templates_render_llava_next_prompts():
    conv = copy.deepcopy(conv_templates["chatml_direct"])  # LLaVA-NeXT's MPT layout: no line break after <|im_end|>
    conv.append_message(conv.roles[0], "<image>\nQ?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == ("<|im_start|>system\nAnswer the questions.<|im_end|>"
                                 "<|im_start|>user\n<image>\nQ?<|im_end|><|im_start|>assistant\n")
    assert default_conversation.get_prompt() == get_conversation("qwen_1_5").get_prompt()
    qwen = conv_templates["qwen_1_5"].copy()  # lmms-eval's stop string: sep, or sep2 for SeparatorStyle.TWO
    assert (qwen.sep if qwen.sep_style != SeparatorStyle.TWO else qwen.sep2) == "<|im_end|>"


def test_expand2square_centres_the_image_on_the_background_colour(loaded):
    _, model, processor, _ = loaded
    mean = tuple(int(x * 255) for x in processor.image_mean)
    for image in [random_image(300, 200, seed=1), random_image(100, 400, seed=2)]:
        side = max(image.size)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = mean
        top, left = (side - image.height) // 2, (side - image.width) // 2
        canvas[top : top + image.height, left : left + image.width] = np.asarray(image)
        assert np.array_equal(np.asarray(expand2square(image, mean)), canvas)
        (view,) = process_images([image], processor, model.config, image_aspect_ratio="pad")
        assert torch.equal(view, processor.preprocess([Image.fromarray(canvas)])["pixel_values"])


def test_load_image_from_base64():
    image = random_image(20, 10, seed=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = load_image_from_base64(base64.b64encode(buffer.getvalue()).decode())
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))
    for data in [b"plain text", buffer.getvalue()[:80]]:  # not an image; a PNG cut short
        with pytest.raises(InputError, match="not an image"):
            load_image_from_base64(base64.b64encode(data).decode())
    with pytest.raises(InputError, match="base64"):
        load_image_from_base64("abc")


def test_keywords_stopping_criteria_end_generation_at_the_keyword(loaded):
    tokenizer, model, _, _ = loaded
    ids = prompt_ids(tokenizer, "Say something.", num_images=0)
    free = model.generate(ids, max_new_tokens=12, eos_token_id=[])[0].tolist()
    # the first token after the first whose text is one token and new in the reply
    stop_at = next(k for k in range(1, len(free)) if free[k] not in free[:k]
                   and tokenizer(tokenizer.decode([free[k]])).input_ids == [free[k]])
    keyword = tokenizer.decode([free[stop_at]])
    criterion = KeywordsStoppingCriteria([keyword], tokenizer, ids)
    stopped = model.generate(ids, max_new_tokens=12, eos_token_id=[], stopping_criteria=[criterion])
    assert stopped[0].tolist() == free[: stop_at + 1]
    assert criterion(torch.cat([ids, stopped], dim=1), None)
    assert not criterion(ids, None)  # nothing generated yet

    im_end = KeywordsStoppingCriteria(["<|im_end|>"], tokenizer, ids)
    assert im_end.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(InputError, match="single-token"):
        model.generate(ids, stopping_criteria=[KeywordsStoppingCriteria(["frame by frame"], tokenizer, ids)])
    with pytest.raises(InputError, match="stopping criterion object"):
        model.generate(ids, stopping_criteria=[object()])


def test_generate_takes_num_beams_1_and_refuses_beam_search_and_losses(loaded):
    tokenizer, model, _, _ = loaded
    ids = prompt_ids(tokenizer, "Say something.", num_images=0)
    assert torch.equal(model.generate(ids, max_new_tokens=4, num_beams=1), model.generate(ids, max_new_tokens=4))
    with pytest.raises(InputError, match="beam search"):
        model.generate(ids, max_new_tokens=4, num_beams=2)
    with pytest.raises(InputError, match="log-likelihood tasks are not supported"):
        model(ids, labels=ids)  # what lmms-eval's llava_onevision does for log-likelihood tasks


def test_load_pretrained_model_takes_llava_next_arguments(tiny_qwen_dir):
    with pytest.raises(CheckpointError, match="multimodal=True"):
        load_pretrained_model(tiny_qwen_dir, None, "ov-7b", device_map="cpu")
    with pytest.raises(CheckpointError, match="overwrite_config"):
        load_pretrained_model(tiny_qwen_dir, None, "llava_qwen", device_map="cpu", customized_config={})
    _, model, _, _ = load_pretrained_model(tiny_qwen_dir, None, "ov-7b", device_map="cpu", multimodal=True)
    assert model.config.text.num_hidden_layers == 6


def test_alias_builder_applies_its_reduction_and_dtype_where_the_caller_gives_none(tiny_qwen_dir, llava_alias):
    llava_alias(reduction="aim_default", torch_dtype="float16")
    from llava.model.builder import load_pretrained_model as aliased

    _, model, _, _ = aliased(tiny_qwen_dir, None, "llava_qwen", device_map="cpu")
    assert (model.dtype, model.default_reduction.name) == (torch.float16, "aim_default")
    _, model, _, _ = aliased(tiny_qwen_dir, None, "llava_qwen", device_map="cpu", torch_dtype="float32",
                             overwrite_config={"reduction": "fastv_default"})
    assert (model.dtype, model.default_reduction.name) == (torch.float32, "fastv_default")


def test_alias_serves_only_what_it_provides_and_registers_llava_qwen_configs(tiny_qwen_dir, tmp_path, llava_alias):
    llava_alias()
    import llava.mm_utils

    import aim_llava.mm_utils

    assert llava.mm_utils is aim_llava.mm_utils
    with pytest.raises(ModuleNotFoundError, match="llava.train is a part of LLaVA-NeXT that aim_llava does not"):
        importlib.import_module("llava.train.train")
    with pytest.raises(NotProvidedError, match="load_pretrained_model"):
        exec("from llava.model import LlavaQwenForCausalLM", {})
    checkpoint = shutil.copytree(tiny_qwen_dir, tmp_path / "ckpt")  # as LLaVA-NeXT's trainer saves them
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(dict(config, model_type="llava_qwen")))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(checkpoint)).hidden_size == config["hidden_size"]  # lmms-eval reads it


def test_alias_never_shadows_a_real_llava_silently(tmp_path, monkeypatch, capsys, llava_alias):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AliasError, match="installed .*llava.*force=True"):
        llava_alias()
    assert main(["lmms_eval", "--help"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m aim_llava.compat: error: a package named llava is installed") and \
        error.count("\n") == 1
    llava_alias(force=True)
    import llava.constants

    import aim_llava.constants

    assert llava.constants is aim_llava.constants
    unalias_llava()
    try:
        import llava

        assert llava.REAL
        with pytest.raises(AliasError, match="imported already"):
            llava_alias(force=True)
    finally:
        sys.modules.pop("llava", None)


def test_launcher_checks_its_arguments_before_running_anything(capsys):
    assert main(["--reduction", "no_such_preset", "lmms_eval"]) == 2
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err
    assert main(["no_such_module_here"]) == 2
    assert capsys.readouterr().err == "python -m aim_llava.compat: error: no module named 'no_such_module_here' to run\n"
    assert installed_alias() is None  # nothing was installed


def test_llava_next_onevision_video_tutorial_runs_through_the_alias(tiny_qwen_dir, tmp_path, llava_alias):
    """docs/LLaVA_OneVision_Tutorials.ipynb's video cell, with its imports, on the CPU and with
    max_new_tokens=8 instead of 4096; the reduction comes from the alias."""
    video_path = str(square_video(tmp_path / "clip.mp4", 12))
    llava_alias(reduction="aim_default", torch_dtype="float16")  # float16: LLaVA-NeXT's default

    from decord import VideoReader, cpu
    from llava.constants import (  # noqa: F401 (the tutorial's imports, used or not)
        DEFAULT_IM_END_TOKEN,
        DEFAULT_IM_START_TOKEN,
        DEFAULT_IMAGE_TOKEN,
        IGNORE_INDEX,
        IMAGE_TOKEN_INDEX,
    )
    from llava.conversation import SeparatorStyle, conv_templates  # noqa: F401
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token  # noqa: F401
    from llava.model.builder import load_pretrained_model

    pretrained, model_name, device, device_map = str(tiny_qwen_dir), "llava_qwen", "cpu", "auto"
    llava_model_args = {"multimodal": True}
    tokenizer, model, image_processor, max_length = load_pretrained_model(
        pretrained, None, model_name, device_map=device_map, attn_implementation="sdpa", **llava_model_args)
    model.eval()

    def load_video(video_path, max_frames_num):
        vr = VideoReader(video_path, ctx=cpu(0))
        total_frame_num = len(vr)
        frame_idx = np.linspace(0, total_frame_num - 1, max_frames_num, dtype=int).tolist()
        return vr.get_batch(frame_idx).asnumpy()

    video_frames = load_video(video_path, 4)
    image_tensors = [image_processor.preprocess(video_frames, return_tensors="pt")["pixel_values"].half().to(device)]
    question = f"{DEFAULT_IMAGE_TOKEN}\nDescribe what's happening in this video."
    conv = copy.deepcopy(conv_templates["qwen_1_5"])
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX,
                                      return_tensors="pt").unsqueeze(0).to(device)
    image_sizes = [frame.size for frame in video_frames]
    cont = model.generate(input_ids, images=image_tensors, image_sizes=image_sizes, do_sample=False, temperature=0,
                          max_new_tokens=MAX_NEW_TOKENS, modalities=["video"])
    tutorial_text = tokenizer.batch_decode(cont, skip_special_tokens=True)[0].strip()

    llm = VideoLLM.from_pretrained(tiny_qwen_dir, "aim_default", device="cpu", dtype="float16",
                                   sampling=SamplingOptions(num_frames=4),
                                   generation=GenerationOptions(max_new_tokens=MAX_NEW_TOKENS))
    ours = llm.ask(video_path, "Describe what's happening in this video.")
    assert tutorial_text == ours
    assert llm.ask(video_path, "Describe what's happening in this video.", reduction="baseline") != ours


def test_lmms_eval_llava_onevision_through_the_alias_answers_like_the_plugin_and_the_runner(tiny_qwen_dir, tmp_path,
                                                                                           capsys):
    """lmms-eval's own llava_onevision model (unmodified) drives aim_llava through the alias, with
    the reduction and dtype chosen by the launcher; every logged reply equals the aim_llava
    plugin's and ``aim-llava eval``'s, and differs from the unreduced one somewhere."""
    lines = [{"id": f"q{i}", "video": str(square_video(tmp_path / f"v{i}.mp4", frames)), "question": question,
              "options": options, "answer": "A", "category": "all"}
             for i, (question, options, frames) in enumerate(QUESTIONS)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks = write_mcq_task(tmp_path, data, MAX_NEW_TOKENS)

    def lmms_eval_replies(launcher: list[str], model: str, model_args: str) -> list[str]:
        out = tmp_path / model
        run_lmms_eval([sys.executable, *launcher, "--model", model, "--model_args", model_args,
                       "--tasks", "aim_local_mcq", "--include_path", str(tasks), "--batch_size", "1",
                       "--log_samples", "--output_path", str(out)], cwd=tmp_path)
        return lmms_eval_logged_replies(out)

    onevision = lmms_eval_replies(
        ["-m", "aim_llava.compat", "--reduction", "aim_default", "--dtype", "float16", "lmms_eval"],
        "llava_onevision", f"pretrained={tiny_qwen_dir},device=cpu,device_map=auto,max_frames_num=4")
    plugin = lmms_eval_replies(
        ["-m", "lmms_eval"], "aim_llava",
        f"pretrained={tiny_qwen_dir},config=aim_default,device=cpu,dtype=float16,max_frames_num=4")
    assert cli_main(["eval", "--data", str(data), "--model", str(tiny_qwen_dir), "--configs", "baseline,aim_default",
                     "--frames", "4", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu",
                     "--dtype", "float16", "--output", str(tmp_path / "local")]) == 0
    capsys.readouterr()

    def runner_replies(config: str) -> list[str]:
        return [json.loads(line)["text"] for line in (tmp_path / "local" / f"{config}.jsonl").read_text().splitlines()]

    assert onevision == plugin == runner_replies("aim_default")
    assert onevision != runner_replies("baseline")  # so the reduction chosen through the launcher was applied
    assert len(set(onevision)) > 1  # and the replies tell the samples apart
