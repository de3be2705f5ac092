"""Refusals in OpenAI's error shape, and client text cut short before it is echoed in one."""

from __future__ import annotations

from aim_llava.errors import one_line

SHOWN_CHARACTERS = 80  # of a client's field echoed in an error message


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        message = one_line(message)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param, code)


def cut(text: str) -> str:
    """A client's text cut to :data:`SHOWN_CHARACTERS` characters, to be quoted in a message."""
    if len(text) > SHOWN_CHARACTERS:
        return text[:SHOWN_CHARACTERS] + f"... ({len(text):,} characters)"
    return text


def shown(value) -> str:
    """A client's value (a decoded JSON value) as an error message quotes it: its ``repr``, cut to
    :data:`SHOWN_CHARACTERS` characters first (a field may hold megabytes, and escaping happens
    after the cut); an array or object by its kind alone."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    if not isinstance(value, str):
        return repr(value)
    if len(value) > SHOWN_CHARACTERS:
        return repr(value[:SHOWN_CHARACTERS]) + f"... ({len(value):,} characters)"
    return repr(value)
