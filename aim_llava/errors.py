"""Exceptions that carry a one-line message meant for the user."""


class AimLlavaError(ValueError):
    """Base class: the message says what was wrong and what to do."""


class CheckpointError(AimLlavaError):
    """A local checkpoint directory is missing files, tensors or has the wrong shapes."""


class InputError(AimLlavaError):
    """A prompt, image or video given to the model cannot be used."""
