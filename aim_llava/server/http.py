"""The HTTP layer: who may call (API keys, the Host and Origin headers), what a body may be (JSON
only, of bounded size, arriving in bounded time, framed one way), the routes, the access log,
and the uvicorn server with its connection limit and timeouts.

* Host: only the names the server answers to (the bound address, localhost, and
  ``--allowed-host``), a name or a bracketed IPv6 address with at most a port after it, so that
  a web page whose domain is rebound to 127.0.0.1 (DNS rebinding) is refused before anything runs.
* Origin: a browser's cross-origin request is refused unless its origin is one allowed with
  ``--allowed-origin``, exactly as browsers send it (which also turns on CORS for it); there is
  no CORS otherwise.
* Framing: a request with both ``Transfer-Encoding`` and ``Content-Length`` is refused (a proxy
  in front may read its body differently: request smuggling).
* Bodies must be ``application/json``: a page cannot post a "simple" ``text/plain`` request.
* API keys (``--api-key``, ``$AIM_LLAVA_API_KEY``): every ``/v1`` route needs
  ``Authorization: Bearer KEY``; keys are compared in constant time (as digests, every key every
  time), and a refusal is a 401 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from aim_llava.server.errors import ApiError, cut
from aim_llava.server.metrics import CONTENT_TYPE, Outcome, log_access
from aim_llava.server.service import BodyBudget, Service

logger = logging.getLogger("aim_llava.serve")

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
KEEP_ALIVE_S = 5  # an idle connection is closed after this
SHUTDOWN_S = 10  # what a stopping server gives the replies in progress


# a Host header: a name, or an IPv6 address in brackets, then at most a port
HOST = re.compile(r"(?:\[(?P<address>[0-9a-f:.]+)\]|(?P<name>[^\[\]:/@\s]+))(?::[0-9]{1,5})?")


def host_name(header: str) -> str | None:
    """The name of a Host header, without its port (an IPv6 address without its brackets); None
    for a header that is not a name or address with at most a port (``[::1]evil.example``)."""
    match = HOST.fullmatch(header.strip().lower())
    return None if match is None else match["address"] or match["name"]


def configured_name(name: str) -> str:
    """A name the server is configured to answer to (``--host``, ``--allowed-host``), as
    :func:`host_name` gives it: a bare IPv6 address is taken as it is."""
    return name.strip().lower() if name.count(":") > 1 and "[" not in name else host_name(name) or name.lower()


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call the server (see the module docstring)."""

    api_keys: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] = frozenset(LOCAL_HOSTS)
    allowed_origins: tuple[str, ...] = ()

    @classmethod
    def for_address(cls, address: str, api_keys: Iterable[str] = (), allowed_hosts: Iterable[str] = (),
                    allowed_origins: Iterable[str] = ()) -> AccessPolicy:
        """The policy of a server bound to ``address``: it answers to that name, localhost and
        ``allowed_hosts``."""
        hosts = {*LOCAL_HOSTS, configured_name(address), *(configured_name(host) for host in allowed_hosts)}
        return cls(tuple(api_keys), frozenset(hosts), tuple(origin.rstrip("/") for origin in allowed_origins))

    def host_allowed(self, header: str | None) -> bool:
        return header is not None and host_name(header) in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser's Origin header is one allowed, as browsers send it (scheme, host and
        port, no path: ``https://app.example/`` is not ``https://app.example``, and CORS would not
        answer it)."""
        return origin in self.allowed_origins

    def key_valid(self, authorization: str | None) -> bool:
        """Whether ``Authorization`` holds ``Bearer KEY`` with one of the keys; every key is
        compared, as SHA-256 digests (of equal length), with :func:`hmac.compare_digest`."""
        scheme, _, given = (authorization or "").partition(" ")
        given_digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        valid = False
        for key_digest in self.key_digests:
            valid |= hmac.compare_digest(given_digest, key_digest)
        return valid and scheme.lower() == "bearer"

    @cached_property
    def key_digests(self) -> tuple[bytes, ...]:
        """The SHA-256 digests of the keys (computed once, not per request)."""
        return tuple(hashlib.sha256(key.encode()).digest() for key in self.api_keys)


def error_response(error: ApiError) -> JSONResponse:
    """The HTTP response of a refusal."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Refusal:
    """An ASGI app answering every request with one :class:`ApiError`."""

    def __init__(self, error: ApiError):
        self.response = error_response(error)

    async def __call__(self, scope, receive, send) -> None:
        await self.response(scope, receive, send)


class HostAndOriginCheck:
    """Refuses requests framed two ways, whose Host is not one of the server's names, or whose
    Origin (sent by browsers) was not allowed; then passes the request on."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            if "transfer-encoding" in headers and "content-length" in headers:
                return await Refusal(ApiError(
                    400, "a request may not carry both Transfer-Encoding and Content-Length: send one",
                    code="invalid_framing", headers={"Connection": "close"},
                ))(scope, receive, send)
            if not self.policy.host_allowed(headers.get("host")):
                return await Refusal(ApiError(
                    400, f"this server does not answer to the host {cut(headers.get('host') or '')!r} (a server "
                         "reached by another name is started with --allowed-host NAME)", code="invalid_host",
                ))(scope, receive, send)
            origin = headers.get("origin")
            if origin is not None and not self.policy.origin_allowed(origin):
                return await Refusal(ApiError(
                    403, f"requests from the web origin {cut(origin)!r} are not allowed (a server meant for a web "
                         "page is started with --allowed-origin ORIGIN)", code="origin_not_allowed",
                ))(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKeyCheck:
    """Refuses ``/v1`` requests without a valid ``Authorization: Bearer KEY`` (when the server
    has keys): 401 in OpenAI's shape."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and self.policy.api_keys and scope["path"].startswith("/v1")
                and not self.policy.key_valid(Headers(scope=scope).get("authorization"))):
            return await Refusal(ApiError(
                401, "missing or incorrect API key: send the header Authorization: Bearer KEY with one of the "
                     "server's keys", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            ))(scope, receive, send)
        await self.app(scope, receive, send)


CHAT_COMPLETIONS = "/v1/chat/completions"


class AccessLog:
    """Writes one access-log line per HTTP request once its response is sent (or has failed),
    refusals included, and counts chat completions in /metrics (:mod:`aim_llava.server.metrics`).
    The request's :class:`Outcome` is in ``scope["state"]["outcome"]`` for the routes to fill."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, outcome = time.monotonic(), [500], Outcome()
        scope.setdefault("state", {})["outcome"] = outcome

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            latency = time.monotonic() - started
            log_access(scope["method"], scope["path"], status[0], latency, outcome)
            if scope["path"] == CHAT_COMPLETIONS:
                self.service.metrics.observe(status[0], latency, outcome)


def create_app(service: Service, policy: AccessPolicy | None = None):
    """The ASGI application of ``service``: FastAPI routes behind the access checks of ``policy``
    (by default: local host names only, no keys, no cross-origin requests), and the access log."""
    policy = policy or AccessPolicy()
    limits = service.limits
    app = FastAPI(title="aim-llava", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def unknown_route(request: HttpRequest, error: HTTPException):
        """Starlette's own refusals (an unknown route, a method a route does not take) in
        OpenAI's shape and words."""
        where = f"{request.method} {cut(request.url.path)}"
        if error.status_code == 405:
            return error_response(ApiError(405, f"Invalid method for URL ({where})"))
        if error.status_code == 404:
            return error_response(ApiError(404, f"Invalid URL ({where})"))
        return error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def server_error(_, error: Exception):
        logger.exception("unexpected server error")
        return JSONResponse(ApiError(500, "internal server error (see the server's log)").body(), status_code=500)

    @app.get("/health")
    async def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.post(CHAT_COMPLETIONS)
    async def chat_completions(request: HttpRequest):
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "the request body must be JSON, sent with Content-Type: application/json",
                           code="unsupported_media_type")

        async def body(budget: BodyBudget) -> bytearray:  # read once there is room for the request
            try:
                return await asyncio.wait_for(read_body(request, limits.max_body_bytes, budget),
                                              limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                               code="timeout") from None

        answer = await service.complete(body, lambda: until_disconnected(request), request.state.outcome)
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    guarded = ApiKeyCheck(app, policy)
    if policy.allowed_origins:
        guarded = CORSMiddleware(guarded, allow_origins=list(policy.allowed_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])
    return AccessLog(HostAndOriginCheck(guarded, policy), service)


async def until_disconnected(request: HttpRequest) -> None:
    """Returns once the client has gone (the body has been read: what comes next is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: HttpRequest, limit: int, budget: BodyBudget) -> bytearray:
    """The request body, read up to ``limit`` bytes into one buffer that grows as its bytes
    arrive, each chunk taken from ``budget`` before the buffer grows and all given back once it
    is read: a client that declares a large body and sends little holds what it sent, not what
    it declared."""
    too_large = ApiError(413, f"the request body may hold at most {limit >> 20} MiB", code="too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    body, taken = bytearray(), 0
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_large
            budget.take(len(chunk))
            taken += len(chunk)
            body += chunk
    finally:
        budget.give_back(taken)
    return body


def server_config(app, host: str, port: int, max_connections: int):
    """uvicorn's configuration: at most ``max_connections`` connections at a time (beyond, 503),
    idle ones closed after :data:`KEEP_ALIVE_S`, no trust in proxies' forwarding headers."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections,
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=SHUTDOWN_S,
                          proxy_headers=False, server_header=False)
