"""Token conventions shared with the published LLaVA-NeXT code (the names of its
``llava/constants.py``, so that its scripts run with ``llava`` replaced by ``aim_llava``)."""

from aim_llava.errors import refuse_names

IMAGE_TOKEN_INDEX = -200
"""Placeholder id that `tokenizer_image_token` puts where visual embeddings go."""

DEFAULT_IMAGE_TOKEN = "<image>"
"""The text marker for one image or one video in a prompt."""

IGNORE_INDEX = -100
"""Label of positions a training loss ignores (LLaVA-NeXT's value; no loss is computed here)."""

DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
"""LLaVA-1.5's optional patch and image-boundary markers; the OneVision checkpoints use none of
them (their prompts hold only ``<image>``), so they are names for scripts that import them."""

IMAGE_PLACEHOLDER = "<image-placeholder>"
"""LLaVA-1.5's marker that its demo scripts replace by ``<image>``."""

SERVING = ("a setting of LLaVA-NeXT's gradio controller and workers, which aim_llava does not include; "
           "`aim-llava serve` is its server (OpenAI-compatible)")
__getattr__ = refuse_names(__name__, dict.fromkeys(
    ("CONTROLLER_HEART_BEAT_EXPIRATION", "WORKER_HEART_BEAT_INTERVAL", "LOGDIR"), SERVING))
