"""With no token reduction, our model computes transformers' LlavaOnevision function exactly."""

import pytest
import torch
from conftest import expand_placeholders, prompt_ids, random_frames, random_image

from aim_llava import load_pretrained_model
from aim_llava.mm_utils import process_images

TOL = 1e-4


def visual_counts(output) -> list[int]:
    """Lengths of the visual runs in the (single-sample) sequence."""
    flags = output.inputs.visual[0].tolist()
    counts, run = [], 0
    for flag in flags + [False]:
        if flag:
            run += 1
        elif run:
            counts.append(run)
            run = 0
    return counts


def test_video_logits_match(loaded, hf_oracle):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(8))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe the video.")
    with torch.no_grad():
        ours = model(ids, images=[video], modalities=["video"])
        assert visual_counts(ours) == [8 * 196 + 1]
        hf_ids = expand_placeholders(ids, visual_counts(ours), hf_oracle.config.video_token_id)
        theirs = hf_oracle(input_ids=hf_ids, pixel_values_videos=video[None]).logits
    assert ours.logits.shape == theirs.shape
    assert (ours.logits - theirs).abs().max() <= TOL


def _image_parity(loaded, hf_oracle, image):
    tokenizer, model, processor, _ = loaded
    pixels = process_images([image], processor, model.config)
    ids = prompt_ids(tokenizer, "What is in the image?")
    width, height = image.size
    with torch.no_grad():
        ours = model(ids, images=pixels, image_sizes=[image.size], modalities=["image"])
        hf_ids = expand_placeholders(ids, visual_counts(ours), hf_oracle.config.image_token_id)
        theirs = hf_oracle(
            input_ids=hf_ids, pixel_values=pixels[0][None], image_sizes=torch.tensor([[height, width]])
        ).logits
    assert ours.logits.shape == theirs.shape
    assert (ours.logits - theirs).abs().max() <= TOL
    return pixels[0].shape[0]


def test_anyres_wide_image_logits_match(loaded, hf_oracle):
    views = _image_parity(loaded, hf_oracle, random_image(900, 500))
    assert views > 2  # base view plus a grid of several crops


def test_anyres_tall_image_downscaled_logits_match(loaded, hf_oracle):
    # 1500x2300 selects a large grid, so the unpadded features exceed 9 crops and get downscaled.
    views = _image_parity(loaded, hf_oracle, random_image(1500, 2300, seed=1))
    assert views - 1 > 9


def test_two_images_logits_match(loaded, hf_oracle):
    tokenizer, model, processor, _ = loaded
    images = [random_image(640, 360, seed=2), random_image(300, 420, seed=3)]
    pixels = process_images(images, processor, model.config, image_aspect_ratio="pad")
    ids = prompt_ids(tokenizer, "What differs between the images?", num_images=2)
    with torch.no_grad():
        ours = model(ids, images=pixels, image_sizes=[im.size for im in images])
        assert visual_counts(ours) == [730, 730]
        hf_ids = expand_placeholders(ids, [730, 730], hf_oracle.config.image_token_id)
        theirs = hf_oracle(
            input_ids=hf_ids,
            pixel_values=torch.cat(pixels),
            image_sizes=torch.tensor([[im.size[1], im.size[0]] for im in images]),
            batch_num_images=torch.tensor([2]),
        ).logits
    assert (ours.logits - theirs).abs().max() <= TOL


def test_text_only_logits_match(loaded, hf_oracle):
    tokenizer, model, _, _ = loaded
    ids = prompt_ids(tokenizer, "Tell me about a red ball on the table.", num_images=0)
    with torch.no_grad():
        assert (model(ids).logits - hf_oracle(input_ids=ids).logits).abs().max() <= TOL


def test_greedy_generation_matches(loaded, hf_oracle):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(4, seed=5))["pixel_values"]
    ids = prompt_ids(tokenizer, "What happens?")
    ours = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=20, eos_token_id=[])
    hf_ids = expand_placeholders(ids, [4 * 196 + 1], hf_oracle.config.video_token_id)
    theirs = hf_oracle.generate(
        input_ids=hf_ids,
        pixel_values_videos=video[None],
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[:, hf_ids.shape[1] :]
    assert ours.shape == (1, 20)
    assert torch.equal(ours, theirs)


def test_hf_layout_gives_same_logits(loaded, tiny_hf_dir):
    tokenizer, model, processor, _ = loaded
    _, model_hf_layout, _, _ = load_pretrained_model(tiny_hf_dir, device_map="cpu", torch_dtype="float32")
    assert model_hf_layout.config.layout == "hf"
    video = processor.preprocess(random_frames(3, seed=7))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe.")
    with torch.no_grad():
        a = model(ids, images=[video], modalities=["video"]).logits
        b = model_hf_layout(ids, images=[video], modalities=["video"]).logits
    assert (a - b).abs().max() <= TOL


def test_two_videos_in_one_prompt_logits_match(loaded, hf_oracle):
    tokenizer, model, processor, _ = loaded
    videos = [processor.preprocess(random_frames(3, seed=s))["pixel_values"] for s in (11, 12)]
    ids = prompt_ids(tokenizer, "Which video is brighter?", num_images=2)
    with torch.no_grad():
        ours = model(ids, images=videos, modalities=["video", "video"])
        assert visual_counts(ours) == [3 * 196 + 1, 3 * 196 + 1]
        hf_ids = expand_placeholders(ids, visual_counts(ours), hf_oracle.config.video_token_id)
        theirs = hf_oracle(input_ids=hf_ids, pixel_values_videos=torch.stack(videos)).logits
    assert (ours.logits - theirs).abs().max() <= TOL


@pytest.mark.parametrize("origin", ["loaded", "built from its config"])
def test_checkpoints_saved_by_the_installed_transformers_load(tiny_hf_dir, tmp_path, origin):
    """Whatever names the installed transformers writes (current versions flatten SigLIP:
    vision_tower.embeddings.*), the saved checkpoint loads and computes transformers' logits."""
    import shutil

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    if origin == "loaded":
        theirs = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tiny_hf_dir), dtype=torch.float32)
    else:
        torch.manual_seed(0)
        theirs = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_pretrained(str(tiny_hf_dir)))
    theirs = theirs.eval()
    theirs.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_hf_dir / name).exists():
            shutil.copy(tiny_hf_dir / name, tmp_path / name)
    tokenizer, ours, processor, _ = load_pretrained_model(tmp_path, device_map="cpu", torch_dtype="float32")
    video = processor.preprocess(random_frames(3, seed=5))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe the video.")
    with torch.no_grad():
        mine = ours(ids, images=[video], modalities=["video"])
        hf_ids = expand_placeholders(ids, visual_counts(mine), theirs.config.video_token_id)
        reference = theirs(input_ids=hf_ids, pixel_values_videos=video[None]).logits
    assert (mine.logits - reference).abs().max() <= TOL
