"""Reading the text files a user hands in (video lists, evaluation and calibration data)."""

from __future__ import annotations

from pathlib import Path

from aim_llava.errors import InputError


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start} cannot be decoded): "
                         "give a text file") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path} ({err.strerror})") from None
