"""JSONL result files that never lose what was written.

A :class:`ResultsFile` is written one record at a time (append, flush, fsync), so a run that is
killed keeps every finished record and at most a torn last line, which reading back drops. It is
held under an exclusive lock (a second process writing the same file is refused), it refuses a
path that is one of the run's inputs, a directory, a special file (a FIFO, ``/dev/stdout`` when
it is a pipe or a terminal), the command's own stdout or stderr redirected to a file (the printed
text and the records would overwrite each other), a place that cannot be written (found by
trying, before any work: permission bits do not tell for root, ACLs or read-only mounts) or an
existing file that is not a results file, and a symbolic link is written through to its target.
An existing file that holds records is never started afresh unasked: without ``resume`` (go on
from its records) or ``overwrite`` (replace it) it is refused. An overwriting run writes its
records to a new file beside it, renamed over the old one when the run ends (interrupted or not)
once it holds at least one record, so the old records stay whole until then; a run that ends
before its first record (a model that fails to load, Ctrl-C while loading) leaves the old file as
it was. When a resumed run superseded earlier records (a failed item done again), the file is
rewritten once at the end, atomically, with one record per item.
Every file is created with the permissions the user's umask gives (a replaced file keeps its own).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

from aim_llava.errors import AimLlavaError
from aim_llava.text_files import parse_json


class ResultsError(AimLlavaError):
    """An output path that cannot be used for results."""


def error_message(err: BaseException) -> str:
    """One line for a failed item: the package's own message, or the exception type and the first
    line of its message."""
    if isinstance(err, AimLlavaError):
        return str(err)
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def resolve_output(path: str | Path, inputs: Iterable[str | Path] = (), what: str = "--output") -> Path:
    """The file an output path writes to (a symlink's target), checked before any work is done:
    not a directory or special file, not one of ``inputs``, in a writable directory."""
    path = Path(path)
    try:
        return _checked_output(path, inputs, what)
    except OSError as err:  # a name too long for the file system, a parent that cannot be searched
        raise ResultsError(f"{what} {path} cannot be written ({err.strerror}): give another path") from None


def _checked_output(path: Path, inputs: Iterable[str | Path], what: str) -> Path:
    try:
        status = os.stat(path)  # through links, /dev/stdout's and /proc's included
    except (FileNotFoundError, NotADirectoryError):
        status = None
    target = Path(os.path.realpath(path))
    if status is not None:
        if stat.S_ISDIR(status.st_mode):
            raise ResultsError(f"{what} {path} is a directory: give a file path")
        if not stat.S_ISREG(status.st_mode):
            raise ResultsError(f"{what} {path} is not a regular file (a device or pipe): give a file path "
                               "(--json prints the records on stdout)")
        for stream, name in ((sys.stdout, "standard output"), (sys.stderr, "standard error")):
            if same_file(status, stream):
                raise ResultsError(f"{what} {path} is this command's {name}: the printed text and the records would "
                                   "overwrite each other; give another file (--json prints the records on stdout)")
        for item in inputs:
            if os.path.exists(item) and os.path.samefile(item, target):
                raise ResultsError(f"{what} {path} is one of the inputs: it would be overwritten; give another path")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ResultsError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        check_writable(target if status is not None else existing)
    except OSError as err:
        raise ResultsError(f"{what} {path} cannot be written ({(err.strerror or str(err)).lower()}): "
                           "give a writable path") from None
    return target


def same_file(status: os.stat_result, stream) -> bool:
    """Whether ``status`` is the file behind an open stream (False when it has no descriptor)."""
    try:
        return os.path.samestat(status, os.fstat(stream.fileno()))
    except (OSError, ValueError, AttributeError):  # closed, or replaced by something without a descriptor
        return False


def check_writable(path: Path) -> None:
    """Raise the operating system's error if ``path`` (an existing file, or a directory to create
    files in) cannot be written: the file is opened for appending, or a file created and removed
    in the directory. Trying is the only answer that holds for every user and file system."""
    if path.is_dir():
        handle, name = create_beside(path / "check", None)
        os.close(handle)
        os.unlink(name)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))


def create_beside(target: Path, replaced: Path | None) -> tuple[int, str]:
    """A new, empty temporary file in ``target``'s directory (its descriptor and path) with the
    permissions of the file it will replace, or, when ``replaced`` is None or does not exist, those
    the umask gives a new file (``tempfile.mkstemp`` would make it private, 0600, for good)."""
    try:
        mode = stat.S_IMODE(os.stat(replaced).st_mode) if replaced is not None else None
    except FileNotFoundError:
        mode = None
    while True:
        name = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(handle, mode)
        return handle, name


def write_text_atomically(path: str | Path, text: str, inputs: Iterable[str | Path] = ()) -> None:
    """Write to a temporary file beside the target, then rename it into place (a symlink is
    written through to its target); the file gets the permissions of the one it replaces, or the
    umask's for a new one."""
    target = resolve_output(path, inputs, what="output")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = create_beside(target, target)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """A whole JSONL file of records, written atomically (used to merge or compact)."""
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def parse_records(text: str, source: Path, key: Callable[[dict], Hashable] | None) -> tuple[list[dict], int]:
    """The records of a results file and the byte length of its intact part.

    Every line but a torn last one (no newline at its end) must be a JSON object that ``key``
    accepts; otherwise the file is not ours and is refused rather than overwritten.
    """
    records, intact, offset = [], 0, 0
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        offset += len(line.encode("utf-8"))
        torn = number == len(lines) and not line.endswith("\n")
        if not line.strip():
            intact = offset
            continue
        try:
            record = parse_json(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if key is not None:
                key(record)
        except (ValueError, KeyError, TypeError):
            if torn:
                break
            raise ResultsError(
                f"{source} is not an aim-llava results file (line {number} is not one of its records): "
                "choose another output path"
            ) from None
        records.append(record)
        intact = offset
    return records, intact


def read_records(path: Path | None, key: Callable[[dict], Hashable] | None = None) -> list[dict]:
    """The records of a results file (a torn last line dropped); [] when there is none."""
    if path is None or not os.path.exists(path):
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not an aim-llava results file (not UTF-8 text): choose another path") from None
    return parse_records(text, path, key)[0]


def unasked_records_error(path: Path, count: int) -> ResultsError:
    return ResultsError(f"{path} already holds {count} record(s): add --resume to go on from them or --overwrite "
                        "to replace them (or choose another --output)")


def check_no_unasked_records(path: Path, key: Callable[[dict], Hashable], resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a results file that holds records the run was not told to go on
    from (``resume``) or replace (``overwrite``): what :class:`ResultsFile` checks, for a file that
    a run writes only at its end (the merge of several processes' records)."""
    if resume or overwrite:
        return
    records = read_records(path, key)
    if records:
        raise unasked_records_error(path, len(records))


def latest_by_key(records: list[dict], key: Callable[[dict], Hashable]) -> list[dict]:
    """One record per key, the last one written, in the order keys first appeared."""
    latest: dict[Hashable, dict] = {}
    for record in records:
        latest.pop(key(record), None)
        latest[key(record)] = record
    return list(latest.values())


class ResultsFile:
    """A results JSONL file open for one run (see the module docstring).

    ``key(record)`` identifies an item (resuming skips items whose latest record has no error).
    An existing file holding records needs ``resume`` (go on from them) or ``overwrite`` (replace
    them when the run ends); otherwise it is refused before any work.
    """

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable], resume: bool = False,
                 inputs: Iterable[str | Path] = (), overwrite: bool = False):
        if resume and overwrite:
            raise ResultsError("--resume goes on from the records of the output and --overwrite replaces them: "
                               "give one of the two")
        self.shown = Path(path)
        self.path = resolve_output(path, inputs)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+b")  # noqa: SIM115 (held for the run, closed by close())
        self.replacement: str | None = None
        self.writer = self.handle
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ResultsError(f"{self.shown} is being written by another aim-llava process: wait for it or "
                               "choose another --output") from None
        try:
            self.records = self.read_own_records(resume, overwrite)
            if overwrite:
                handle, self.replacement = create_beside(self.path, self.path)
                self.writer = os.fdopen(handle, "wb")
        except BaseException:
            self.close(compact=False)
            raise
        self.superseded = len(self.records) != len(latest_by_key(self.records, key))

    def read_own_records(self, resume: bool, overwrite: bool) -> list[dict]:
        """The records the run goes on from: those of the file when resuming (a torn last line
        cut off), none otherwise; a file that is not a results file, or one that holds records
        the run was not told what to do with, is refused."""
        self.handle.seek(0)
        raw = self.handle.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ResultsError(f"{self.shown} is not an aim-llava results file (not UTF-8 text): "
                               "choose another output path") from None
        records, intact = parse_records(text, self.shown, self.key)
        if resume:
            self.handle.truncate(intact)
            return records
        if not overwrite:
            if records:
                raise unasked_records_error(self.shown, len(records))
            self.handle.truncate(0)  # at most a torn line of an interrupted run
        return []

    def done(self) -> set[Hashable]:
        """Keys of the items whose latest record has no error."""
        return {self.key(r) for r in latest_by_key(self.records, self.key) if r.get("error") is None}

    def append(self, record: dict) -> None:
        """Add one record durably."""
        self.superseded |= any(self.key(r) == self.key(record) for r in self.records)
        self.records.append(record)
        self.writer.seek(0, os.SEEK_END)
        self.writer.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.writer.flush()
        os.fsync(self.writer.fileno())

    def close(self, compact: bool = True) -> None:
        """Put an overwriting run's file in place of the old one once it holds a record (or drop
        it, when the run could not start or ended before its first record), or rewrite once with
        one record per item if earlier records were superseded; release the file."""
        if self.handle.closed:
            return
        try:
            if self.replacement is not None:
                self.replace_old_file(keep=compact and bool(self.records))
            if compact and self.superseded:
                write_records(self.path, latest_by_key(self.records, self.key))
        finally:
            self.handle.close()

    def replace_old_file(self, keep: bool) -> None:
        """The overwriting run's file renamed over the old one (``keep``), or removed."""
        self.writer.close()
        if keep:
            os.replace(self.replacement, self.path)
        else:
            Path(self.replacement).unlink(missing_ok=True)
        self.replacement = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
