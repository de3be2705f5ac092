"""Chat prompt templates (``qwen_1_5`` is the one the OneVision checkpoints were trained with), with
the names of LLaVA-NeXT's ``llava/conversation.py``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum, auto

from aim_llava.errors import InputError, NotProvidedError, refuse_names


class SeparatorStyle(Enum):
    """LLaVA-NeXT's prompt layouts. aim_llava renders the two ChatML ones: CHATML (the Qwen
    templates) and MPT (the same without a line break after each separator, ``chatml_direct``)."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    CHATML = auto()
    LLAMA_2 = auto()
    LLAMA_3 = auto()
    QWEN = auto()
    GEMMA = auto()


RENDERED_STYLES = (SeparatorStyle.CHATML, SeparatorStyle.MPT)


@dataclass
class Conversation:
    """A ChatML conversation: ``<|im_start|>role\\ntext<|im_end|>\\n`` per message.

    The fields are LLaVA-NeXT's, in its order, with two differences: ``system`` is the system
    message's text (the template adds its ``<|im_start|>system`` header, which LLaVA-NeXT's
    ``system`` includes) and ``roles`` are the role headers without their line break.
    """

    system: str
    roles: tuple[str, str] = ("<|im_start|>user", "<|im_start|>assistant")
    messages: list[list] = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.CHATML
    sep: str = "<|im_end|>"
    sep2: str | None = None
    version: str = "qwen"

    def __post_init__(self) -> None:
        if self.sep_style not in RENDERED_STYLES:
            raise NotProvidedError(
                f"SeparatorStyle.{self.sep_style.name} prompts are not provided: aim_llava renders the ChatML "
                "layouts of the Qwen2 checkpoints (SeparatorStyle.CHATML and SeparatorStyle.MPT)"
            )

    def append_message(self, role: str, message: str | None) -> None:
        if message is not None:
            check_text(message, "a message")
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        """The prompt text; a message of ``None`` leaves the role open for the model to answer."""
        end = self.sep + ("\n" if self.sep_style is SeparatorStyle.CHATML else "")
        parts = [f"<|im_start|>system\n{self.system}{end}" if self.system else ""]
        for role, message in self.messages:
            parts.append(f"{role}\n{message}{end}" if message is not None else f"{role}\n")
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


class Templates(dict):
    """Templates by name; looking up one that is not here (LLaVA-NeXT's ``vicuna_v1``,
    ``llava_llama_3``, ...) is an InputError that lists the known names."""

    def __missing__(self, name: str) -> Conversation:
        raise InputError(
            f"unknown conversation template {name!r}; known: {', '.join(self)} (aim_llava runs the "
            "LLaVA-OneVision/Qwen2 checkpoints, whose template is qwen_1_5)"
        )


conv_qwen = Conversation(system="You are a helpful assistant.")
conv_chatml_direct = Conversation(system="Answer the questions.", sep_style=SeparatorStyle.MPT, version="mpt")
conv_templates: dict[str, Conversation] = Templates(
    {"qwen_1_5": conv_qwen, "qwen_2": conv_qwen, "chatml_direct": conv_chatml_direct}
)
default_conversation = conv_qwen
"""The template the OneVision checkpoints were trained with (LLaVA-NeXT's default is Vicuna's)."""

OTHER_FAMILIES = (
    "a template of another model family (Vicuna, Llama, Mistral, MPT, Gemma, ...), which aim_llava does not "
    "provide: the LLaVA-OneVision/Qwen2 checkpoints use conv_templates['qwen_1_5']"
)
__getattr__ = refuse_names(__name__, dict.fromkeys((
    "conv_vicuna_v0", "conv_vicuna_v1", "conv_llama_2", "conv_llava_llama_2", "conv_llava_llama_3",
    "conv_mistral_instruct", "conv_llava_llama_2_simple", "conv_llava_llama_2_mmtag", "conv_mpt", "conv_qwen_2_5",
    "conv_gemma_instruct", "conv_llava_plain", "conv_llava_v0", "conv_llava_v0_mmtag", "conv_llava_v1",
    "conv_llava_v1_mmtag", "conv_mistral_orca", "conv_mistral_zephyr", "conv_mistral_direct",
), OTHER_FAMILIES))


def get_conversation(name: str) -> Conversation:
    """A fresh copy of a named template."""
    return conv_templates[name].copy()


def build_prompt(question: str, template: str = "qwen_1_5", num_images: int = 1) -> str:
    """One user turn with ``num_images`` ``<image>`` markers on their own lines before the question."""
    conv = get_conversation(template)
    conv.append_message(conv.roles[0], "<image>\n" * num_images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
