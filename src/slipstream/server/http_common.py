"""What the REST API and the HTTPS fallback server share: errors as JSON, bodies, sites.

Every error leaves as the Connect error object ``{"error": {code, user_message,
internal_message, retryable}}`` with an HTTP status that matches it, so a web backend can
branch on either. Anything unexpected is logged here and answered with a generic 500: a
traceback never reaches a client.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from slipstream.errors import (
    AuthenticationError,
    ChecksumMismatch,
    ConfigError,
    DestinationExists,
    DiskFull,
    DocrootViolation,
    NetworkError,
    PathError,
    PermissionDenied,
    ProtocolError,
    SlipstreamError,
    SourceNotFound,
    SpecError,
    TokenError,
    UsageError,
)

log = logging.getLogger("slipstream.server")

MAX_JSON_BODY = 16 * 1024 * 1024

_STATUS: list[tuple[type[SlipstreamError], int]] = [
    (AuthenticationError, 401),
    (TokenError, 403),
    (DocrootViolation, 403),
    (PermissionDenied, 403),
    (SourceNotFound, 404),
    (DestinationExists, 409),
    (ChecksumMismatch, 409),
    (DiskFull, 507),
    (SpecError, 400),
    (UsageError, 400),
    (PathError, 400),
    (ProtocolError, 400),
    (NetworkError, 503),
]


def status_for(error: SlipstreamError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_response(error: SlipstreamError) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="slipstream"'} if status_for(error) == 401 else {}
    return web.json_response(error.to_connect(), status=status_for(error), headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SlipstreamError as exc:
        return error_response(exc)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(SlipstreamError("Internal server error"))


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise UsageError("Request body too large")
    raw = await request.content.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise UsageError("Request body too large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("The request body must be a JSON object")
    return body


def basic_credentials(header: str) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic`` header, else None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationError("Malformed basic authorization header") from None
    user, sep, password = text.partition(":")
    if not sep:
        raise AuthenticationError("Malformed basic authorization header")
    return user, password


def bearer_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def start_sites(
    app: web.Application, host: str, sites: list[tuple[int, ssl.SSLContext | None]]
) -> tuple[web.AppRunner, list[int]]:
    """Serve ``app`` on ``host`` at each ``(port, tls)``; port 0 picks a free one.

    The sockets are bound here, not by aiohttp, so the real ports are known (tests and
    quickstart ask for port 0, and what they print must be what clients reach).
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ports: list[int] = []
    try:
        for port, context in sites:
            sock = _listen(host, port)
            ports.append(int(sock.getsockname()[1]))
            await web.SockSite(runner, sock, ssl_context=context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, ports


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
