"""With no token reduction, our Qwen2.5-VL computes transformers' Qwen2_5_VLForConditionalGeneration
in float32, on a tiny checkpoint written by transformers' own classes (and one written by ours)."""

import numpy as np
import pytest
import torch
from conftest import random_frames, random_image

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.model.families import family_of

TOL = 1e-5
MODALITY_TYPE = {"image": 1, "video": 2}  # transformers' mm_token_type_ids


def prompt_ids(tokenizer, processor, config, question, modality, turns_before=()):
    text = family_of(config).prompt([*turns_before, (question, None)], modality, None, "qwen_1_5", tokenizer, processor)
    return tokenizer_image_token(text, tokenizer)


def transformers_inputs(config, prompts, visuals, counts, pad_id=0):
    """transformers' inputs for our prompts (each with one placeholder) and visuals: the placeholder
    expanded into ``counts[b]`` pad tokens of its modality, left padding, token types, pixels, grids
    and seconds per group."""
    rows, types = [], []
    for prompt, visual, count in zip(prompts, visuals, counts):
        pad = config.image_token_id if visual.modality == "image" else config.video_token_id
        row, kind = [], []
        for token in prompt:
            row += [pad] * count if token == IMAGE_TOKEN_INDEX else [token]
            kind += [MODALITY_TYPE[visual.modality]] * count if token == IMAGE_TOKEN_INDEX else [0]
        rows.append(row)
        types.append(kind)
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad_id)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    token_types = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, (row, kind) in enumerate(zip(rows, types)):
        ids[b, longest - len(row):] = torch.tensor(row)
        mask[b, longest - len(row):] = 1
        token_types[b, longest - len(row):] = torch.tensor(kind)
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": token_types}
    for modality, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        chosen = [v for v in visuals if v.modality == modality]
        if chosen:
            inputs[key] = torch.cat([v.pixels for v in chosen])
            inputs[f"{modality}_grid_thw"] = torch.tensor([v.grid_thw for v in chosen])
    videos = [v for v in visuals if v.modality == "video"]
    if videos:
        inputs["second_per_grid_ts"] = torch.tensor([v.seconds_per_group for v in videos])
    return inputs


def compare(qwen25, oracle, prompts, visuals):
    """Our logits and transformers' on the same prompts and pixels; returns the largest gap over
    the real (unpadded) rows."""
    tokenizer, model, _, _ = qwen25
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, longest - len(prompt):] = torch.tensor(prompt)
        mask[b, longest - len(prompt):] = 1
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, images=visuals)
        counts = [int(n) for n in ours.inputs.num_visual]
        theirs = oracle(**transformers_inputs(model.config, prompts, visuals, counts)).logits
    assert ours.logits.shape == theirs.shape
    valid = ours.inputs.valid
    return (ours.logits - theirs).abs()[valid].max().item()


def video_input(processor, frames, fps=2.0):
    return processor.video(frames, "cpu", torch.float32, fps)


def test_image_prompt_logits_match(qwen25, qwen25_oracle):
    tokenizer, model, processor, _ = qwen25
    image = processor.image(random_image(230, 150, seed=3), "cpu")
    assert image.groups == 1 and image.grid == (10, 16)  # 150 x 230 -> 140 x 224 pixels
    prompts = [prompt_ids(tokenizer, processor, model.config, "What is in the image?", "image")]
    assert compare(qwen25, qwen25_oracle, prompts, [image]) <= TOL


def test_eight_frame_video_prompt_logits_match(qwen25, qwen25_oracle):
    tokenizer, model, processor, _ = qwen25
    video = video_input(processor, random_frames(8, 196, 196, seed=4))
    assert video.grid_thw == (4, 14, 14)  # 7 x 7 tokens a group: several windows, partly cut
    prompts = [prompt_ids(tokenizer, processor, model.config, "Describe the video.", "video")]
    assert compare(qwen25, qwen25_oracle, prompts, [video]) <= TOL


def test_padded_batch_of_two_prompts_logits_match(qwen25, qwen25_oracle):
    tokenizer, model, processor, _ = qwen25
    video = video_input(processor, random_frames(4, 200, 252, seed=5), fps=1.0)
    image = processor.image(random_image(120, 300, seed=6), "cpu")
    prompts = [prompt_ids(tokenizer, processor, model.config, "What happens in this clip, from start to end?", "video"),
               prompt_ids(tokenizer, processor, model.config, "Color?", "image")]
    assert len(prompts[0]) != len(prompts[1])
    assert compare(qwen25, qwen25_oracle, prompts, [video, image]) <= TOL


def test_greedy_tokens_match_over_sixteen_steps(qwen25, qwen25_oracle):
    tokenizer, model, processor, _ = qwen25
    video = video_input(processor, random_frames(6, 168, 224, seed=7))
    prompt = prompt_ids(tokenizer, processor, model.config, "What happens?", "video")
    ours = model.generate(torch.tensor([prompt]), images=[video], max_new_tokens=16, eos_token_id=[])
    count = model.prepare_multimodal_inputs(torch.tensor([prompt]), images=[video]).num_visual[0]
    inputs = transformers_inputs(model.config, [prompt], [video], [count])
    theirs = qwen25_oracle.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                    pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    assert ours.shape == (1, 16) and torch.equal(ours, theirs)


def release_rope_positions(segments, tokens_per_second):
    """An independent re-implementation of Qwen2.5-VL's release rule (its get_rope_index before
    transformers 5.3): segments are ("text", length) or ("video", groups, rows, columns,
    seconds per group); returns [3, L] positions. Text after a block starts at the block's largest
    position + 1."""
    parts, start = [], 0
    for segment in segments:
        if segment[0] == "text":
            parts.append(torch.arange(segment[1]).expand(3, -1) + start)
        else:
            _, groups, rows, columns, seconds = segment
            t = (torch.arange(groups).view(-1, 1).expand(-1, rows * columns)
                 * torch.tensor(seconds, dtype=torch.float32) * tokens_per_second).long().flatten()
            h = torch.arange(rows).view(1, -1, 1).expand(groups, -1, columns).flatten()
            w = torch.arange(columns).view(1, 1, -1).expand(groups, rows, -1).flatten()
            parts.append(torch.stack([t, h, w]) + start)
        start = int(parts[-1].max()) + 1
    return torch.cat(parts, dim=1)


def test_text_after_a_long_video_continues_from_its_largest_time_position(qwen25, qwen25_oracle):
    """Ten groups at 2 s a group reach time 36, past the 4 x 4 grid: the question continues from 37
    (the release rule), where transformers 5.24's get_rope_index would continue from 4. The model
    given those positions computes transformers' logits."""
    tokenizer, model, processor, _ = qwen25
    video = video_input(processor, random_frames(20, 112, 112, seed=8), fps=1.0)
    assert video.grid_thw == (10, 8, 8) and video.seconds_per_group == 2.0
    prompt = prompt_ids(tokenizer, processor, model.config, "When does it change?", "video")
    place = prompt.index(IMAGE_TOKEN_INDEX)
    expected = release_rope_positions([("text", place), ("video", 10, 4, 4, 2.0), ("text", len(prompt) - place - 1)],
                                      model.config.vision.tokens_per_second)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]), images=[video])
        assert torch.equal(ours.inputs.position_ids[0].T, expected)
        assert ours.inputs.next_position == [int(expected.max()) + 1]
        inputs = transformers_inputs(model.config, [prompt], [video], [160])
        theirs = qwen25_oracle(**inputs, position_ids=expected[:, None]).logits
    assert (ours.logits - theirs).abs().max() <= TOL


def test_decoded_positions_continue_after_the_prompt(qwen25):
    """Cached decoding (positions from next_position) equals recomputing the whole sequence with
    the generated tokens appended (uncached generation), which takes their positions one by one."""
    tokenizer, model, processor, _ = qwen25
    video = video_input(processor, random_frames(20, 112, 112, seed=8), fps=1.0)
    ids = torch.tensor([prompt_ids(tokenizer, processor, model.config, "When?", "video")])
    cached = model.generate(ids, images=[video], max_new_tokens=6, eos_token_id=[])
    uncached = model.generate(ids, images=[video], max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, uncached)


def test_our_processor_equals_transformers_processor(qwen25, hf_qwen25_dir):
    """Grids, seconds per group, pixels (the same 8-bit resampling kernel on the CPU) and the
    prompt's ids with the pad tokens expanded, against transformers' Qwen2_5_VLProcessor."""
    from transformers import AutoProcessor

    tokenizer, model, processor, _ = qwen25
    theirs = AutoProcessor.from_pretrained(str(hf_qwen25_dir))
    frames = random_frames(6, 150, 270, seed=9)
    image = random_image(333, 210, seed=10)
    video = video_input(processor, frames)
    picture = processor.image(image, "cpu")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is shown?"}]}]
    text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=6, fps=2.0, frames_indices=list(range(6)))
    encoded = theirs(text=[text], videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], video_metadata=[metadata],
                     videos_kwargs={"cap_pixels_per_frame": True, "do_sample_frames": False}, return_tensors="pt")
    assert tuple(encoded["video_grid_thw"][0].tolist()) == video.grid_thw
    assert encoded["second_per_grid_ts"][0].item() == pytest.approx(video.seconds_per_group)
    assert (encoded["pixel_values_videos"] - video.pixels).abs().max() <= 1e-5
    prompt = prompt_ids(tokenizer, processor, model.config, "What is shown?", "video")
    count = video.groups * video.grid[0] * video.grid[1] // 4
    expected = transformers_inputs(model.config, [prompt], [video], [count])["input_ids"]
    assert torch.equal(encoded["input_ids"], expected)
    image_encoded = theirs.image_processor(images=[image], return_tensors="pt")
    assert tuple(image_encoded["image_grid_thw"][0].tolist()) == picture.grid_thw
    assert (image_encoded["pixel_values"] - picture.pixels).abs().max() <= 1e-5


def test_gpu_resampling_is_within_two_levels_of_the_8_bit_kernel():
    """The float32 passes used on GPUs (no 8-bit kernel there) against torch's 8-bit kernel, on
    noise (the hardest case: the kernel's overshoot clamped between passes), up and down."""
    from aim_llava.model.qwen2_5_vl.processor import resize_frames, two_pass_bicubic

    frames = torch.from_numpy(random_frames(3, 150, 270, seed=12)).permute(0, 3, 1, 2)
    for size in ((140, 280), (196, 336), (112, 336)):
        exact = resize_frames(frames, size)
        assert (two_pass_bicubic(frames.float(), size) - exact).abs().max() <= 2


def test_checkpoint_written_by_our_writer_loads_in_transformers_and_matches(tiny_qwen25_dir):
    """The published layout our writer uses (flat config.json, visual.* names) is the one
    transformers reads for Qwen/Qwen2.5-VL-*-Instruct: both compute the same logits from it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from aim_llava import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(tiny_qwen25_dir, device_map="cpu", torch_dtype="float32")
    assert model.config.layout == "published"
    oracle = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_qwen25_dir), dtype=torch.float32).eval()
    video = video_input(processor, random_frames(4, 112, 168, seed=11))
    prompts = [prompt_ids(tokenizer, processor, model.config, "Describe.", "video")]
    assert compare((tokenizer, model, processor, None), oracle, prompts, [video]) <= TOL


def test_images_are_kept_at_native_resolution(qwen25):
    """Two images of different sizes give different grids (no fixed square input)."""
    _, _, processor, _ = qwen25
    wide = processor.image(np.zeros((100, 400, 3), dtype=np.uint8), "cpu")
    tall = processor.image(np.zeros((400, 100, 3), dtype=np.uint8), "cpu")
    assert wide.grid == (8, 28) and tall.grid == (28, 8)
