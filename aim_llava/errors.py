"""Exceptions that carry a one-line message meant for the user."""


def one_line(text: str) -> str:
    """``text`` with control characters, line separators and lone surrogates escaped as Python
    writes them, so that a file name or request field echoed into a message cannot break it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class AimLlavaError(ValueError):
    """Base class: the message says what was wrong and what to do."""


class CheckpointError(AimLlavaError):
    """A local checkpoint directory is missing files, tensors or has the wrong shapes."""


class InputError(AimLlavaError):
    """A prompt, image or video given to the model cannot be used."""
