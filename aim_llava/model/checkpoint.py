"""Reading checkpoint tensors: file discovery, the one place where names are mapped, validation.

All checks (missing shards, missing/unexpected tensors, shapes) run on the files' headers before
any tensor is read, and each error names the file or tensor at fault.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from aim_llava.errors import CheckpointError
from aim_llava.text_files import parse_json

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
# Prefix rewrites from the names transformers writes for LlavaOnevision (v5 and v4 names, and the
# flat SigLIP names that current versions save: vision_tower.embeddings.*) to ours, which are the
# LLaVA-NeXT names.
HF_NAME_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), VISION_PREFIX),
    (re.compile(r"^(model\.language_model\.|language_model\.model\.)"), "model."),
    (re.compile(r"^(language_model\.)?lm_head\."), "lm_head."),
    (re.compile(r"^(model\.)?multi_modal_projector\.linear_1\."), "model.mm_projector.0."),
    (re.compile(r"^(model\.)?multi_modal_projector\.linear_2\."), "model.mm_projector.2."),
    (re.compile(r"^(model\.)?image_newline$"), "model.image_newline"),
]
VISION_LAYER = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
# Derived buffers that some exporters saved; they are recomputed, never loaded.
DERIVED_BUFFERS = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")


def map_name(name: str, layout: str) -> str:
    """Checkpoint tensor name -> our module name."""
    if layout == "llava_qwen":
        return name
    for pattern, replacement in HF_NAME_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def is_unused_vision_part(name: str, used_vision_layers: int) -> bool:
    """Tensors of the tower that LLaVA never runs: post-layernorm, pooling head, later layers."""
    if name.startswith(VISION_PREFIX + "post_layernorm.") or name.startswith(VISION_PREFIX + "head."):
        return True
    match = VISION_LAYER.match(name)
    return bool(match) and int(match.group(1)) >= used_vision_layers


@dataclass
class TensorRef:
    file: Path
    name: str
    shape: tuple[int, ...]


def find_weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    """The safetensors shards (via the index when there is one), or pickles if allowed."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = parse_json(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index (its weight_map is not names -> files)")
        files = sorted({model_dir / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"checkpoint shard {missing[0]} listed in {index.name} is missing from {model_dir}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        unreadable = [f.name for f in files if not f.is_file() or not os.access(f, os.R_OK)]
        if unreadable:
            raise CheckpointError(f"checkpoint shard {unreadable[0]} in {model_dir} cannot be read "
                                  "(not a regular file, or permission denied)")
        return files
    single = sorted(model_dir.glob("*.safetensors"))
    if single:
        return single
    pickles = sorted(model_dir.glob("*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{model_dir} holds only pickled .bin weights ({pickles[0].name}); loading pickles can run "
                "arbitrary code: convert them to safetensors or pass allow_pickle=True if you trust the files"
            )
        return pickles
    raise CheckpointError(f"no *.safetensors weights in {model_dir}")


def load_pickle(file: Path, map_location) -> dict:
    """A pickled state dict, with only tensors allowed (``weights_only``): anything else in the
    file is refused with one line, and no code from it runs."""
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle and torch raise many types, with multi-line messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load {file} as a tensor-only checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file} does not hold a dictionary of tensors")
    return state


def list_tensors(files: list[Path]) -> Iterator[TensorRef]:
    for file in files:
        if file.suffix == ".bin":
            for name, tensor in load_pickle(file, "meta").items():
                yield TensorRef(file, name, tuple(tensor.shape))
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield TensorRef(file, name, tuple(handle.get_slice(name).get_shape()))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {file}: {err}") from None


def is_tolerated(name: str, used_vision_layers: int) -> bool:
    """A LLaVA-OneVision tensor that may be in the file without being loaded."""
    return is_unused_vision_part(name, used_vision_layers) or bool(DERIVED_BUFFERS.search(name))


def plan_loading(
    files: list[Path],
    expected: dict[str, tuple[int, ...]],
    rename: Callable[[str], str],
    tolerated: Callable[[str], bool],
    optional: set[str],
    model_name: str = "a LLaVA-OneVision model",
) -> dict[str, TensorRef]:
    """Map every checkpoint tensor (its name through ``rename``) to a parameter; raise on anything
    missing, unknown (not ``tolerated``) or misshapen."""
    plan: dict[str, TensorRef] = {}
    for ref in list_tensors(files):
        target = rename(ref.name)
        if target in expected:
            if ref.shape != expected[target]:
                raise CheckpointError(
                    f"tensor {ref.name} in {ref.file.name} has shape {list(ref.shape)} but the config implies "
                    f"{list(expected[target])}: config.json and weights do not belong together"
                )
            plan[target] = ref
        elif not tolerated(target):
            raise CheckpointError(
                f"unexpected tensor {ref.name} in {ref.file.name}: not part of {model_name} with this config"
            )
    missing = sorted(set(expected) - set(plan) - optional)
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]} is missing from the checkpoint"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return plan


def read_tensors(plan: dict[str, TensorRef], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the planned tensors, file by file, converted to ``dtype`` on ``device``."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, ref in plan.items():
        by_file.setdefault(ref.file, []).append((target, ref.name))
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if file.suffix == ".bin":
            raw = load_pickle(file, "cpu")
            for target, name in names:
                state[target] = raw[name].to(device=device, dtype=dtype)
            continue
        with safe_open(file, framework="pt") as handle:
            for target, name in names:
                state[target] = handle.get_tensor(name).to(device=device, dtype=dtype)
    return state
