"""Reading the text files a user hands in (video lists, evaluation and calibration data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from aim_llava.errors import InputError


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file is one clear error."""
    path = Path(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start} cannot be decoded): "
                         "give a text file") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path} ({err.strerror})") from None


def parse_json(text: str | bytes) -> object:
    """``json.loads``, with every way that hostile text makes it fail raised as one ValueError
    with a short reason: besides JSONDecodeError, the standard library raises RecursionError for
    deep nesting, UnicodeDecodeError for bytes that are not UTF-8 and a plain ValueError (whose
    advice is for the program, not its user) for integers of over 4,300 digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError:
        raise ValueError("it holds an integer of over 4,300 digits") from None
