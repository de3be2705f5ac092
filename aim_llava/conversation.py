"""Chat prompt templates (``qwen_1_5`` is the one the OneVision checkpoints were trained with)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from aim_llava.errors import InputError


@dataclass
class Conversation:
    """A ChatML conversation: ``<|im_start|>role\\ntext<|im_end|>\\n`` per message."""

    system: str
    roles: tuple[str, str] = ("<|im_start|>user", "<|im_start|>assistant")
    messages: list[list] = field(default_factory=list)
    sep: str = "<|im_end|>"

    def append_message(self, role: str, message: str | None) -> None:
        if message is not None:
            check_text(message, "a message")
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        """The prompt text; a message of ``None`` leaves the role open for the model to answer."""
        parts = [f"<|im_start|>system\n{self.system}{self.sep}\n" if self.system else ""]
        for role, message in self.messages:
            parts.append(f"{role}\n{message}{self.sep}\n" if message is not None else f"{role}\n")
        return "".join(parts)

    def copy(self) -> Conversation:
        return copy.deepcopy(self)


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates, which invalid UTF-8 bytes on a command
    line become); otherwise one clear InputError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} is not valid UTF-8 text (character {err.start} cannot be encoded): "
                         "give the text in UTF-8") from None
    return text


conv_templates: dict[str, Conversation] = {
    "qwen_1_5": Conversation(system="You are a helpful assistant."),
    "qwen_2": Conversation(system="You are a helpful assistant."),
    "chatml_direct": Conversation(
        system="Answer the questions.",
    ),
}


def get_conversation(name: str) -> Conversation:
    """A fresh copy of a named template."""
    if name not in conv_templates:
        raise InputError(f"unknown conversation template {name!r}; known: {', '.join(conv_templates)}")
    return conv_templates[name].copy()


def build_prompt(question: str, template: str = "qwen_1_5", num_images: int = 1) -> str:
    """One user turn with ``num_images`` ``<image>`` markers on their own lines before the question."""
    conv = get_conversation(template)
    conv.append_message(conv.roles[0], "<image>\n" * num_images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
