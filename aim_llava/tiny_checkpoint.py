"""Tiny random LLaVA-OneVision checkpoints, written offline in either published layout.

The architecture is the real one (SigLIP at 384 px with 14 px patches, so 729 patches a view and
196 pooled tokens a frame; mlp2x_gelu; Qwen2 with GQA) at small widths, with a byte-level BPE
tokenizer trained here on a small corpus and carrying the ChatML special tokens. The same seed
gives the same weights in both layouts. Its outputs are random text: it is for tests and demos.
:func:`write_random_checkpoint` writes a named full-size architecture the same way (random bf16
weights, the tiny tokenizer), for speed measurements of what loads checkpoint directories.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from aim_llava.model.config import LlavaConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 384,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
}
TINY_VOCAB_SIZE = 320
TINY_TEXT = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
WORDS = (
    "a the video shows person man woman dog cat car ball red green blue yellow white black is are walks "
    "runs sits on in at with and of to from table room street park camera moves slowly quickly then "
    "frame scene image question answer what who where when how many color left right top bottom people "
    "holding playing talking looking into out up down small large bright dark one two three four five"
).split()
LAYOUTS = ("llava_qwen", "hf")
MAX_SHARD_BYTES = 4 * 2**30


def printable_byte_alphabet() -> list[str]:
    """ByteLevel symbols of printable ASCII plus space, newline and tab.

    Leaving out the other bytes means every token decodes to readable text, so the random model's
    output is random words rather than broken UTF-8; other characters are dropped when
    tokenising, which is acceptable for a test model only.
    """
    # GPT-2's byte-to-symbol map: printable ASCII maps to itself, byte b < 33 to chr(256 + b).
    return [chr(b) for b in range(33, 127)] + [chr(256 + b) for b in (9, 10, 32)]


def build_tokenizer(seed: int, special_tokens: list[str] = SPECIAL_TOKENS):
    """A byte-level BPE tokenizer (Qwen2 style) trained on a generated corpus; the special tokens
    take the first ids, in order (the first is the padding token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(2000)]
    corpus += ["You are a helpful assistant.", "Describe the video in detail.", "user", "assistant", "system"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=printable_byte_alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    if tokenizer.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError("the tiny tokenizer's vocabulary does not fill the model's: enlarge the corpus")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=special_tokens[0],
        additional_special_tokens=special_tokens[1:],
    )


def random_state_dict(seed: int, vision: dict = TINY_VISION, text: dict = TINY_TEXT,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights under our (LLaVA-NeXT) names, including the unused vision parts a real file has.
    Matrices wider than the tiny model's are drawn with a smaller spread (by the square root of
    their width), so that activations of a full-size model stay of order one."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.1, mean=0.0):
        if len(shape) == 2:
            std *= min(1.0, (128 / shape[1]) ** 0.5)
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    v, t = vision, text
    state: dict[str, torch.Tensor] = {}
    vp = "model.vision_tower.vision_tower.vision_model."
    state[vp + "embeddings.patch_embedding.weight"] = randn(v["hidden_size"], 3, v["patch_size"], v["patch_size"], std=0.05)
    state[vp + "embeddings.patch_embedding.bias"] = randn(v["hidden_size"])
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    state[vp + "embeddings.position_embedding.weight"] = randn(n_patches, v["hidden_size"], std=0.5)
    vh, vi = v["hidden_size"], v["intermediate_size"]
    for i in range(v["num_hidden_layers"]):
        lp = f"{vp}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{lp}self_attn.{name}.weight"] = randn(vh, vh, std=0.15)
            state[f"{lp}self_attn.{name}.bias"] = randn(vh)
        state[lp + "mlp.fc1.weight"], state[lp + "mlp.fc1.bias"] = randn(vi, vh, std=0.15), randn(vi)
        state[lp + "mlp.fc2.weight"], state[lp + "mlp.fc2.bias"] = randn(vh, vi, std=0.15), randn(vh)
        for norm in ("layer_norm1", "layer_norm2"):
            state[f"{lp}{norm}.weight"], state[f"{lp}{norm}.bias"] = randn(vh, mean=1.0), randn(vh)
    state[vp + "post_layernorm.weight"], state[vp + "post_layernorm.bias"] = randn(vh, mean=1.0), randn(vh)

    h, inter = t["hidden_size"], t["intermediate_size"]
    kv = t["num_key_value_heads"] * h // t["num_attention_heads"]
    state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"] = randn(h, vh, std=0.2), randn(h)
    state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"] = randn(h, h, std=0.2), randn(h)
    state["model.image_newline"] = randn(h, std=1.0)
    state["model.embed_tokens.weight"] = randn(t["vocab_size"], h, std=1.0)
    for i in range(t["num_hidden_layers"]):
        lp = f"model.layers.{i}."
        state[lp + "self_attn.q_proj.weight"], state[lp + "self_attn.q_proj.bias"] = randn(h, h), randn(h)
        state[lp + "self_attn.k_proj.weight"], state[lp + "self_attn.k_proj.bias"] = randn(kv, h), randn(kv)
        state[lp + "self_attn.v_proj.weight"], state[lp + "self_attn.v_proj.bias"] = randn(kv, h), randn(kv)
        state[lp + "self_attn.o_proj.weight"] = randn(h, h)
        state[lp + "mlp.gate_proj.weight"] = randn(inter, h)
        state[lp + "mlp.up_proj.weight"] = randn(inter, h)
        state[lp + "mlp.down_proj.weight"] = randn(h, inter)
        state[lp + "input_layernorm.weight"] = randn(h, mean=1.0)
        state[lp + "post_attention_layernorm.weight"] = randn(h, mean=1.0)
    state["model.norm.weight"] = randn(h, mean=1.0)
    if not t.get("tie_word_embeddings", False):
        state["lm_head.weight"] = randn(t["vocab_size"], h, std=0.2)
    return state


def to_hf_name(name: str) -> str:
    """Our name -> the transformers v5 ``LlavaOnevisionForConditionalGeneration`` name."""
    rules = [
        ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.image_newline", "model.image_newline"),
        ("model.", "model.language_model."),
    ]
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _llava_qwen_config(image_token_index: int, text: dict = TINY_TEXT, vision: dict = TINY_VISION,
                       dtype: str = "float32", tower: str = "aim-llava/siglip-tiny-patch14-384") -> dict:
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **text,
        "hidden_act": "silu",
        "mm_vision_tower": tower,
        "mm_vision_config": vision,
        "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)],
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_newline_position": "one_token",
        "image_token_index": image_token_index,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "use_sliding_window": False,
    }


def _hf_config(image_token_index: int, video_token_index: int, text: dict = TINY_TEXT, vision: dict = TINY_VISION,
               dtype: str = "float32") -> dict:
    """The transformers config; ``vision`` counts the tower's stored layers (one more than it runs)."""
    vision = dict(vision, num_hidden_layers=vision["num_hidden_layers"] - 1)
    vision.update(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    text = dict(text, model_type="qwen2", hidden_act="silu", use_sliding_window=False)
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": image_token_index,
        "video_token_index": video_token_index,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "vision_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)],
        "tie_word_embeddings": text.get("tie_word_embeddings", False),
        "torch_dtype": dtype,
    }


def text_with_head_size(head_size: int) -> dict:
    """The tiny text model with the same head counts (4 query, 2 key/value heads) and
    ``head_size`` per head (the default has 16; vLLM's CPU attention needs 32, 64, 80, ...)."""
    hidden = TINY_TEXT["num_attention_heads"] * head_size
    return dict(TINY_TEXT, hidden_size=hidden, intermediate_size=2 * hidden)


# The qwen_1_5 conversation of aim_llava.conversation as a chat template, for the processor files
# (what `vllm serve` formats chat requests with): media markers first, then the text.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'video') %}"
    "{{ '<' ~ part['type'] ~ '>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_hf_processor(out: Path, tokenizer, vision: dict = TINY_VISION) -> None:
    """transformers' ``LlavaOnevisionProcessor`` files beside an HF-layout checkpoint, as the
    published conversions have them (vLLM preprocesses images and videos with them): SigLIP's
    size and normalisation (aim_llava.model.config.VisionConfig), the qwen_1_5 chat template.
    Needs torchvision (transformers' video processor does)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    settings = {"size": {"height": vision["image_size"], "width": vision["image_size"]},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**settings),
        video_processor=LlavaOnevisionVideoProcessor(**settings),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
    )
    processor.save_pretrained(str(out))


def write_shards(out: Path, state: dict[str, torch.Tensor], count: int) -> None:
    """``state`` as ``count`` safetensors shards (names in order, split at equal bytes) and their index."""
    names, total = sorted(state), sum(tensor.nbytes for tensor in state.values())
    groups: list[list[str]] = [[] for _ in range(count)]
    written = 0
    for name in names:
        groups[min(count - 1, written * count // total)].append(name)
        written += state[name].nbytes
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file({name: state[name].contiguous() for name in group}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_checkpoint(out: str | Path, config: LlavaConfig, seed: int = 0, layout: str = "llava_qwen",
                            processor: bool = False) -> Path:
    """A full-size checkpoint with random bfloat16 weights for ``config`` (one of
    :data:`aim_llava.architectures.ARCHITECTURES`), in the LLaVA-NeXT layout (or ``layout="hf"``,
    with ``processor=True`` the processor files too: what vLLM loads), with the tiny tokenizer:
    ids beyond its 320 tokens decode to nothing, so replies are mostly empty text and rarely end
    early. For measuring speed (which does not depend on the weights' values), never accuracy."""
    out, tokenizer = _start_checkpoint(out, seed, layout, processor)
    text = dataclasses.asdict(config.text)
    vision = {key: value for key, value in dataclasses.asdict(config.vision).items() if key in TINY_VISION}
    vision["num_hidden_layers"] += 1  # stored like the published tower: with the layer it does not run
    state = random_state_dict(seed, vision, text, torch.bfloat16)
    shards = max(1, -(-sum(t.nbytes for t in state.values()) // MAX_SHARD_BYTES))
    _write_layout(out, layout, tokenizer, state, text, vision, "bfloat16", processor,
                  "google/siglip-so400m-patch14-384", shards)
    return out


def _start_checkpoint(out: str | Path, seed: int, layout: str, processor: bool) -> tuple[Path, object]:
    """Check the layout options (before any weight is made), create ``out`` and write the tiny
    tokenizer there; returns the directory and the tokenizer."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if processor and layout != "hf":
        raise ValueError("processor files come with the HF layout (layout='hf')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    tokenizer.save_pretrained(str(out))
    return out, tokenizer


def _write_layout(out: Path, layout: str, tokenizer, state: dict[str, torch.Tensor], text: dict, vision: dict,
                  dtype: str, processor: bool, tower: str, shards: int) -> None:
    """Weights (in ``shards`` files; one HF-layout file is ``model.safetensors``) and config.json
    in ``layout`` (checked by :func:`_start_checkpoint`), and the processor files (HF layout only)."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if layout == "llava_qwen":
        config = _llava_qwen_config(image_id, text, vision, dtype, tower)
        write_shards(out, state, shards)
    else:
        config = _hf_config(image_id, tokenizer.convert_tokens_to_ids("<video>"), text, vision, dtype)
        # Like the published conversions, the file holds only the vision layers that are used.
        unused = f"encoder.layers.{vision['num_hidden_layers'] - 1}."
        hf_state = {to_hf_name(n): t.contiguous() for n, t in state.items() if unused not in n}
        if shards == 1:
            save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
        else:
            write_shards(out, hf_state, shards)
        if processor:
            write_hf_processor(out, tokenizer, vision)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def has_tiny_architecture(config: LlavaConfig) -> bool:
    """Whether a model has the tiny checkpoints' widths: its weights are random, so are its answers."""
    return (config.vision.hidden_size == TINY_VISION["hidden_size"]
            and config.text.hidden_size == TINY_TEXT["hidden_size"])


def write_tiny_checkpoint(out: str | Path, layout: str = "llava_qwen", seed: int = 0, head_size: int | None = None,
                          processor: bool = False) -> Path:
    """Write config, tokenizer and weights to ``out``; returns the directory. ``head_size``: the
    text model's head size (None: the tiny default, 16); ``processor``: also write transformers'
    processor files (HF layout only), as vLLM needs."""
    out, tokenizer = _start_checkpoint(out, seed, layout, processor)
    text = TINY_TEXT if head_size is None else text_with_head_size(head_size)
    _write_layout(out, layout, tokenizer, random_state_dict(seed, text=text), text, TINY_VISION, "float32", processor,
                  "aim-llava/siglip-tiny-patch14-384", 2 if layout == "llava_qwen" else 1)
    return out
