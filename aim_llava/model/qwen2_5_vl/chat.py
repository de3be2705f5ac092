"""Qwen2.5-VL prompts, rendered with the checkpoint's chat template (jinja, through the tokenizer's
renderer); the template of the published Instruct checkpoints when the checkpoint has none."""

from __future__ import annotations

from aim_llava.constants import DEFAULT_IMAGE_TOKEN
from aim_llava.errors import InputError

# The chat template of Qwen/Qwen2.5-VL-*-Instruct (its chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAD_TOKENS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def chat_messages(turns: list[tuple[str, str | None]], modality: str | None, system: str | None) -> list[dict]:
    """The messages of ``turns`` [(question, answer or None)], the visual (if any: ``modality``
    None is a text-only conversation) before the first question."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    for index, (question, answer) in enumerate(turns):
        parts = [{"type": "text", "text": question}]
        visual = [{"type": modality}] if index == 0 and modality is not None else []
        messages.append({"role": "user", "content": visual + parts})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def render_prompt(turns: list[tuple[str, str | None]], modality: str | None, system: str | None, tokenizer,
                  template: str | None) -> str:
    """The prompt text with the visual's one pad token replaced by ``<image>`` (the placeholder
    that ``tokenizer_image_token`` turns into the visual tokens' place); ``modality`` None: a
    text-only conversation."""
    text = tokenizer.apply_chat_template(chat_messages(turns, modality, system),
                                         chat_template=template or QWEN2_5_VL_CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=turns[-1][1] is None)
    if modality is None:
        if DEFAULT_IMAGE_TOKEN in text:
            raise InputError(f"the text may not hold {DEFAULT_IMAGE_TOKEN!r}")
        return text
    pad = PAD_TOKENS[modality]
    if text.count(pad) != 1 or DEFAULT_IMAGE_TOKEN in text:
        raise InputError(f"the chat template must place one {pad} for the {modality}, and the text may not hold "
                         f"{DEFAULT_IMAGE_TOKEN!r}; this prompt has {text.count(pad)} and "
                         f"{text.count(DEFAULT_IMAGE_TOKEN)}")
    return text.replace(pad, DEFAULT_IMAGE_TOKEN)
