"""A request body parsed into JSON values within a small multiple of its size.

What parsing builds is bounded before it starts:

* the values: every JSON value but the outermost comes first in a container or after a comma, so
  counting ``{``, ``[`` and ``,`` bounds the Python objects (:attr:`ServerLimits.max_json_punctuation`);
* the strings: CPython stores a string in 1, 2 or 4 bytes a character, by its widest character,
  so one emoji (or the escape ``\\ud83d\\ude00``) in a 60 MB field makes a 240 MB string. The
  strings that hold a character beyond Latin-1 may take :func:`wide_text_bytes` bytes of the body,
  all together (what the largest admissible text needs), and be at most
  :data:`MAX_WIDE_STRINGS`, checked on the raw bytes;
* the document: ``json.loads`` first decodes the whole body into one string, as wide as its
  widest character; characters beyond Latin-1 (inside those bounded strings) are therefore
  written as ``\\u`` escapes before it is parsed, and that string has one byte a character.

A body of ``n`` bytes then costs at most about 3 n at its peak: the bytes (n; a ``bytearray`` is
emptied once its escaped copy is made), one document string (n, dropped once parsed) and the
values (n, plus four times the bounded wide text).
"""

from __future__ import annotations

import codecs
import re

from aim_llava.server.errors import bad
from aim_llava.server.limits import ServerLimits
from aim_llava.text_files import parse_json

MAX_WIDE_STRINGS = 2**16  # strings holding characters beyond Latin-1 (a request's texts are ~2,000 at most)
# UTF-8 lead bytes of characters beyond Latin-1 (and bytes that are no UTF-8), marked as NUL to be found
WIDE_BYTES = bytes.maketrans(bytes(range(0xC4, 0x100)), bytes(0x100 - 0xC4))
WIDE_ESCAPE = re.compile(rb"\\u(?!00)")  # an escape of a character beyond Latin-1 (\u0100 and up)
FIRST_WINDOW = 256  # bytes looked at first for the next wide byte; doubled up to LAST_WINDOW until one is found
LAST_WINDOW = 2**20
JSON_ESCAPES = "aim_llava_json_escape"


def json_escapes(error: UnicodeEncodeError) -> tuple[str, int]:
    """A codec error handler: the characters ASCII cannot encode, as JSON ``\\u`` escapes."""
    units = error.object[error.start:error.end].encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)), error.end


codecs.register_error(JSON_ESCAPES, json_escapes)


def wide_text_bytes(limits: ServerLimits) -> int:
    """The bytes that the strings holding characters beyond Latin-1 may take in one body: the
    request's text at up to 12 bytes a character (two ``\\u`` escapes), with slack for the other
    fields."""
    return 12 * limits.max_text_chars + 2**16


def next_wide_byte(raw: bytes, start: int) -> int:
    """The position of the next byte at or after ``start`` that begins a character beyond
    Latin-1 (or is no UTF-8), or ``len(raw)``; the window looked at (copied twice) doubles from
    :data:`FIRST_WINDOW` to :data:`LAST_WINDOW`, so finding a near one is cheap."""
    window = FIRST_WINDOW
    while start < len(raw):
        at = raw[start:start + window].translate(WIDE_BYTES).find(0)
        if at >= 0:
            return start + at
        start, window = start + window, min(2 * window, LAST_WINDOW)
    return len(raw)


def unescaped_quote(raw: bytes, start: int, forward: bool) -> int:
    """The first ``"`` from ``start`` (forward, or backward) that no backslash escapes; -1 or
    ``len(raw)`` when there is none."""
    while True:
        at = raw.find(b'"', start) if forward else raw.rfind(b'"', 0, start)
        if at < 0:
            return len(raw) if forward else -1
        backslashes, before = 0, at
        while before > 0:
            chunk = raw[max(0, before - 64):before]
            run = len(chunk) - len(chunk.rstrip(b"\\"))
            backslashes, before = backslashes + run, before - run
            if run < len(chunk):
                break
        if backslashes % 2 == 0:
            return at
        start = at + 1 if forward else at


def wide_strings(raw: bytes, limits: ServerLimits) -> list[tuple[int, int]]:
    """The (start, end) of each string holding a character beyond Latin-1 (as UTF-8 or as an
    escape); refuses a body whose such strings take more than :func:`wide_text_bytes` or are
    more than :data:`MAX_WIDE_STRINGS`. A non-ASCII byte is valid JSON only inside a string,
    between the unescaped quotes around it."""
    limit, found, held, position = wide_text_bytes(limits), [], 0, 0
    wide_byte = escape = -1  # the next of each at or after ``position`` (len(raw): none)
    while position < len(raw):
        if wide_byte < position:
            wide_byte = next_wide_byte(raw, position)
        if escape < position:
            match = WIDE_ESCAPE.search(raw, position)
            escape = match.start() if match is not None else len(raw)
        at = min(wide_byte, escape)
        if at >= len(raw):
            break
        start, end = unescaped_quote(raw, at, False), unescaped_quote(raw, at + 1, True)
        found.append((start, end))
        held += end - start
        if held > limit or len(found) > MAX_WIDE_STRINGS:
            raise bad(f"the request body's text beyond Latin-1 takes more than {limit:,} bytes in up to "
                      f"{MAX_WIDE_STRINGS:,} strings, more than the largest request this server takes needs",
                      code="too_much_wide_text")
        position = end + 1
    return found


def narrowed(raw: bytes, strings: list[tuple[int, int]]) -> bytes | bytearray:
    """The body with the non-ASCII characters of ``strings`` written as ``\\u`` escapes (the
    same JSON, whose document string is then one byte a character); invalid UTF-8 is refused."""
    if not strings or raw.isascii():
        return raw
    body, position = bytearray(), 0
    for start, end in strings:
        body += raw[position:max(position, start)]
        try:
            body += raw[max(position, start):end].decode("utf-8").encode("ascii", JSON_ESCAPES)
        except UnicodeDecodeError:
            raise bad("the request body is not valid JSON (it is not UTF-8 text)", code="malformed_body") from None
        position = max(position, end)
    body += raw[position:]
    return body


def parse_body(raw: bytes | bytearray, limits: ServerLimits) -> object:
    """A request body's JSON value, within the bounds of the module docstring (a ``bytearray``
    body is emptied once it has been copied with its characters escaped)."""
    punctuation = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if punctuation > limits.max_json_punctuation:
        raise bad(f"the request body holds {punctuation:,} JSON brackets and commas; a request this server "
                  f"takes holds at most {limits.max_json_punctuation:,}", code="too_many_values")
    text = narrowed(raw, wide_strings(raw, limits))
    if text is not raw and isinstance(raw, bytearray):
        raw.clear()  # its bytes are in ``text`` now
    try:
        return parse_json(text)
    except ValueError as err:
        raise bad(f"the request body is not valid JSON ({err})", code="malformed_body") from None
