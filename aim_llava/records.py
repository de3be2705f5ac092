"""JSONL result files: read back what an earlier (possibly interrupted) run wrote, and rewrite
them atomically (a temporary file beside the target, then a rename) so no result is ever lost."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from aim_llava.errors import AimLlavaError


def read_records(path: Path | None, key: str = "video") -> list[dict]:
    """The dict lines of a JSONL file that have ``key``; lines that do not parse are dropped."""
    if path is None or not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and key in record:
            records.append(record)
    return records


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records_atomically(path: Path, records: list[dict]) -> None:
    """The whole JSONL file, atomically."""
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def error_message(err: BaseException) -> str:
    """One line for a failed item: the package's own message, or the exception type and the first
    line of its message."""
    if isinstance(err, AimLlavaError):
        return str(err)
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
