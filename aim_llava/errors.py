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


class NonFiniteOutputError(AimLlavaError):
    """The model's logits or token importance became NaN or infinite (its activations overflowed
    the dtype it runs in): no answer is given for the samples ``rows`` of the batch; ``partial``
    holds what the other samples got (the generate call's output, or a list of per-sample
    results with None at ``rows``)."""

    def __init__(self, message: str, rows: list[int], partial: object = None):
        super().__init__(message)
        self.rows, self.partial = rows, partial


class DeviceFailure(AimLlavaError):
    """The GPU failed (a sticky CUDA error: an illegal memory access, a device-side assert, ...):
    nothing more can run on it in this process."""


class DeviceMemoryError(AimLlavaError):
    """A request needed more device memory than was free, even after the reuse cache was emptied."""


class NotProvidedError(AimLlavaError, ImportError):
    """A LLaVA-NeXT name or feature that aim_llava does not provide, on purpose. It is an
    ImportError too, so that ``from aim_llava.mm_utils import NAME`` shows this message (Python
    replaces an AttributeError there by a bare "cannot import name")."""


def refuse_names(module: str, refused: dict[str, str]):
    """A module ``__getattr__`` for LLaVA-NeXT names the module leaves out: ``refused[name]`` says
    why and what to use instead; other unknown names are the usual AttributeError."""

    def __getattr__(name: str):
        if name in refused:
            raise NotProvidedError(f"{module}.{name} (from LLaVA-NeXT) is not provided: {refused[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
