"""``load_pretrained_model``: a local checkpoint directory -> tokenizer, model, image processor.

The checkpoint's family (:mod:`aim_llava.model.families`, by the config's ``model_type``) reads the
config, builds the modules, names the tensors and gives the image processor."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from aim_llava.capabilities import auto_dtype
from aim_llava.devices import make_current
from aim_llava.errors import CheckpointError
from aim_llava.model.attention import resolve_attn_implementation
from aim_llava.model.checkpoint import find_weight_files, plan_loading, read_tensors
from aim_llava.model.config import LlavaConfig
from aim_llava.model.families import family_of, read_config_file
from aim_llava.model.hub_cache import cached_snapshot, is_repo_id
from aim_llava.model.language_model.llava_qwen import Qwen2MultimodalForCausalLM
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLConfig
from aim_llava.reduction.config import load_reduction_config

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
ModelConfig = LlavaConfig | Qwen2_5_VLConfig  # a config of any family
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not os.path.exists(path):
        raise CheckpointError(f"{model_dir} has no config.json: is this a checkpoint directory?")
    return read_config_file(path)


def model_directory(model_path: str | Path) -> Path:
    """The checkpoint directory of ``model_path``: a local directory, or a Hugging Face id
    (``org/name``) found in the local Hugging Face cache (:mod:`aim_llava.model.hub_cache`)."""
    model_dir = Path(model_path).expanduser()
    if os.path.isdir(model_dir):
        return model_dir
    if is_repo_id(str(model_path)):
        return cached_snapshot(str(model_path))
    raise CheckpointError(f"model path {str(model_path)!r} is not a local directory: give a checkpoint directory, "
                          "or a Hugging Face id (org/name) downloaded to the local Hugging Face cache")


def checkpoint_config(model_path: str | Path) -> ModelConfig:
    """The config of a checkpoint (a directory or a cached Hugging Face id), read without loading
    any weights."""
    return read_config(model_directory(model_path))


def apply_overrides(config: ModelConfig, overwrite_config: dict | None) -> ModelConfig:
    """Replace top-level config fields by name (LLaVA-NeXT's ``overwrite_config``)."""
    if not overwrite_config:
        return config
    known = {f.name for f in dataclasses.fields(config)} - {"text", "vision", "layout"}
    unknown = sorted(set(overwrite_config) - known - {"reduction"})
    if unknown:
        raise CheckpointError(f"overwrite_config: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return dataclasses.replace(config, **{k: v for k, v in overwrite_config.items() if k != "reduction"})


def resolve_device(device_map) -> torch.device:
    if device_map in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        raise CheckpointError("device_map dictionaries (multi-device sharding) are not supported: give one device")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {device_map!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device_map!r} asked for, but CUDA is not available here: run on the CPU "
                              "(--device cpu; device_map='cpu' in Python)")
    return device


def resolve_dtype(torch_dtype, config: ModelConfig, device: torch.device, say: bool = True) -> torch.dtype:
    """'auto': decided by the device's capabilities and logged unless ``say`` is False
    (:func:`aim_llava.capabilities.auto_dtype`): on a CPU bfloat16 where it computes bfloat16 in
    hardware, else float32; on a GPU the checkpoint's dtype, float16 in place of bfloat16 where
    the GPU has no bfloat16."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype in (None, "auto"):
        return auto_dtype(device, DTYPES.get(config.torch_dtype or "bfloat16", torch.bfloat16), say)
    if torch_dtype not in DTYPES:
        raise CheckpointError(f"unknown torch_dtype {torch_dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[torch_dtype]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as err:  # tokenizers and transformers raise many types for damaged files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot load the tokenizer of {model_dir} ({type(err).__name__}: {first})") from None


def check_tokenizer_fits(tokenizer, config: ModelConfig, model_dir: Path) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding table."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= config.text.vocab_size:
        raise CheckpointError(
            f"the tokenizer of {model_dir} produces ids up to {largest} but the model's vocabulary has "
            f"{config.text.vocab_size} entries: the tokenizer and the weights do not belong together"
        )


def build_model(
    model_dir: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
    allow_pickle: bool = False,
) -> Qwen2MultimodalForCausalLM:
    """Create the modules without memory (meta device) and fill them from the checkpoint."""
    family = family_of(config)
    files = find_weight_files(model_dir, allow_pickle)
    with torch.device("meta"):
        model = family.build_model(config, attn_implementation)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    rules = family.loading_rules(config)
    plan = plan_loading(files, expected, rules.rename, rules.tolerated, set(rules.optional), f"a {family.title} model")
    state = read_tensors(plan, device, dtype)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if "lm_head.weight" not in plan:
        model.tie_weights()
    return model.eval()


def load_pretrained_model(
    model_path: str | Path,
    model_base: str | None = None,
    model_name: str = "llava_qwen",
    device_map="auto",
    torch_dtype="auto",
    attn_implementation: str = "sdpa",
    overwrite_config: dict | None = None,
    allow_pickle: bool = False,
    multimodal: bool = False,
    customized_config=None,
):
    """Load a checkpoint of a family the package runs (LLaVA-OneVision in the LLaVA-NeXT or the
    transformers layout, Qwen2.5-VL in the transformers layout; :mod:`aim_llava.model.families`).

    Returns ``(tokenizer, model, image_processor, max_length)`` like LLaVA-NeXT's builder.
    Nothing is downloaded: ``model_path`` is a directory, or a Hugging Face id (``org/name``)
    already in the local Hugging Face cache. ``device_map`` is one device
    ("auto" picks CUDA when present). ``attn_implementation``: eager, sdpa or
    flash_attention_2 (falls back to sdpa, with a warning, when flash-attn is not installed).
    ``overwrite_config`` replaces config fields by name; its ``reduction`` entry (a preset name,
    YAML path, mapping or ReductionConfig) sets the model's default token reduction (calls may
    pass another plan with ``reduction=``). ``multimodal=True`` (what LLaVA-NeXT callers such as
    lmms-eval pass) accepts any ``model_name``, as LLaVA-NeXT does.
    """
    if model_base is not None:
        raise CheckpointError("model_base (LoRA/projector-only checkpoints) is not supported: give a full checkpoint")
    if customized_config is not None:
        raise CheckpointError("customized_config (a replacement config) is not supported: change fields with overwrite_config")
    if "llava" not in model_name.lower() and not multimodal:
        raise CheckpointError(f"model_name {model_name!r} is not a LLaVA model; use 'llava_qwen' (or multimodal=True)")
    model_dir = model_directory(model_path)
    config = apply_overrides(read_config(model_dir), overwrite_config)
    reduction = load_reduction_config((overwrite_config or {}).get("reduction"))
    device = resolve_device(device_map)
    dtype = resolve_dtype(torch_dtype, config, device)
    attn = resolve_attn_implementation(attn_implementation)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer_fits(tokenizer, config, model_dir)
    make_current(device)  # cuda:N: this thread's kernels, streams and events go to the model's GPU
    model = build_model(model_dir, config, device, dtype, attn, allow_pickle)
    model.set_reduction(reduction.build(config.text.num_hidden_layers))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = [i for i in (im_end, tokenizer.eos_token_id) if isinstance(i, int) and i != tokenizer.unk_token_id]
    model.generation_defaults.eos_token_ids = sorted(set(eos_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    model.generation_defaults.pad_token_id = pad
    image_processor = family_of(config).image_processor(config, model_dir)
    logger.info("loaded %s (%s layout) on %s as %s, attention %s", model_dir, config.layout, device, dtype, attn)
    return tokenizer, model, image_processor, config.max_length
