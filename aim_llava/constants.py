"""Token conventions shared with the published LLaVA-NeXT code."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id that `tokenizer_image_token` puts where visual embeddings go."""

DEFAULT_IMAGE_TOKEN = "<image>"
"""The text marker for one image or one video in a prompt."""
