"""HTTPS fallback, the client's transport: JSON requests and byte ranges over TLS.

Used when UDP cannot pass (a firewall), or always with ``http_fallback: "force"``. The
protocol is in docs/protocol.md ("HTTPS fallback"); in short, under ``/slipstream/v1``:

============================  ===============================================================
``POST /sessions``            spec + ``Authorization`` (Bearer token/ticket, or Basic)
``POST /dirs``                upload: create a folder
``POST /links``               upload: create a symbolic link (``symlink_policy`` copy)
``POST /files``               upload: announce a file -> ``skip``, ``send`` from ``offset``,
                              or ``compare`` (checksums of byte ranges, then announce again)
``PUT /files/{id}``           upload: bytes, ``Content-Range: bytes a-b/size``
``GET /files/{id}/status``    upload: ``received`` (where to resume after a dropped request)
``POST /files/{id}/commit``   upload: digest and checksum; the server checks, then renames
``GET /files/{id}``           download: bytes, ``Range: bytes=a-`` to resume
``GET /files/{id}/digest``    download: the server's digest (and ``file_checksum``)
``POST /files/{id}/sums``     download: checksums of byte ranges (overwrite ``diff``, resume)
``POST /files/{id}/done``     download: the client's result (records, source removal)
``POST /close``               end of the session, with the client's totals
``GET /ping``                 unauthenticated liveness check (``slipstream doctor``)
============================  ===============================================================

Every request after ``POST /sessions`` carries the session id in ``X-Slipstream-Session``
(a header, not the URL, so it stays out of access logs). The server's certificate is
pinned by fingerprint when one is known (from the SSH channel's ACCEPT, or the spec's
``https_fallback_fingerprint``), otherwise checked against the system's CAs.

Both ends pace their bytes with a :class:`Pacer` (the spec's ``target_rate_kbps``, clamped by
the server's per-user and aggregate caps): TCP alone would take the whole path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from slipstream.errors import (
    ConnectError,
    HostKeyError,
    NetworkError,
    ProtocolError,
    SlipstreamError,
    error_from_dict,
)
from slipstream.server.tls import fingerprint_digest

log = logging.getLogger("slipstream.transport.http")

BASE_PATH = "/slipstream/v1"
SESSION_HEADER = "X-Slipstream-Session"
CHUNK_BYTES = 4 * 1024 * 1024  # per PUT: a dropped connection costs at most this much
RETRIES = 5
RETRY_BASE_DELAY = 0.25
REQUEST_TIMEOUT = 120.0
# The file semantics the server honours (docs/files.md). A server answering another value
# (or none) would silently ignore some of them: the client refuses it instead.
SEMANTICS_VERSION = 2
PACED_CHUNK_MIN = 64 * 1024


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Pacer:
    """A token bucket in bytes: ``rate_kbps`` on average, at most ``BURST_SECONDS`` ahead.

    ``take`` lets a sender go into debt by one chunk, then sleeps until the debt is paid, so a
    chunk of any size is paced without splitting it. No rate (None or 0): no pacing.

    Both ends pace the same bytes (the server enforces its caps whatever the client does).
    A burst of about one chunk (:meth:`chunk_size`) lets the tokens one end saves while the
    other end holds a chunk back count, so two pacers in a row still move ``rate_kbps``,
    not half of it. The bucket starts empty: a session never opens with a burst.
    """

    BURST_SECONDS = 1.0

    def __init__(self, rate_kbps: int | None = None) -> None:
        self._bytes_per_s = 0.0
        self._tokens = 0.0
        self._last = time.monotonic()
        self.set_rate(rate_kbps)

    def set_rate(self, rate_kbps: int | None) -> None:
        self._refill()
        self._bytes_per_s = (rate_kbps or 0) * 1000 / 8

    def chunk_size(self, ceiling: int) -> int:
        """A request size that takes about a second at this rate (``ceiling`` unpaced)."""
        if not self._bytes_per_s:
            return ceiling
        return max(PACED_CHUNK_MIN, min(ceiling, int(self._bytes_per_s)))

    def _refill(self) -> None:
        now = time.monotonic()
        burst = self._bytes_per_s * self.BURST_SECONDS
        self._tokens = min(burst, self._tokens + (now - self._last) * self._bytes_per_s)
        self._last = now

    async def take(self, count: int) -> None:
        if not self._bytes_per_s:
            return
        self._refill()
        self._tokens -= count
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self._bytes_per_s)


class FallbackClient:
    """One HTTPS connection pool to a server's fallback port, with retries."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        authorization: str,
        fingerprint: str | None,
        retries: int = RETRIES,
    ) -> None:
        self.where = f"{url_host(host)}:{port}"
        self.base = f"https://{self.where}{BASE_PATH}"
        self._authorization = authorization
        self._ssl: Any = (
            aiohttp.Fingerprint(fingerprint_digest(fingerprint)) if fingerprint else True
        )
        self._retries = retries
        self._http: aiohttp.ClientSession | None = None
        self.session_id: str | None = None

    async def __aenter__(self) -> FallbackClient:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=REQUEST_TIMEOUT)
        self._http = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": self._authorization}
        if self.session_id:
            headers[SESSION_HEADER] = self.session_id
        return {**headers, **(extra or {})}

    # --- requests ---------------------------------------------------------------------------

    async def open_session(self, spec: dict[str, Any]) -> dict[str, Any]:
        body = await self.call("POST", "/sessions", {"spec": spec})
        self.session_id = str(body["session"])
        return body

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A JSON request, retried on network errors (every call here is idempotent)."""

        async def once(http: aiohttp.ClientSession) -> dict[str, Any]:
            async with http.request(
                method, self.base + path, json=body, headers=self._headers(), ssl=self._ssl
            ) as response:
                return await _json_or_error(response)

        return await self._with_retries(once)

    async def put_range(self, file_id: int, start: int, data: bytes, size: int) -> int:
        """Send ``data`` as bytes ``start..`` of a file of ``size``; returns what the server
        now holds. Not retried here: after a failure the caller asks where to resume."""
        http = self._session()
        end = start + len(data) - 1
        headers = self._headers(
            {
                "Content-Range": f"bytes {start}-{end}/{size}",
                "Content-Type": "application/octet-stream",
            }
        )
        try:
            async with http.put(
                f"{self.base}/files/{file_id}", data=data, headers=headers, ssl=self._ssl
            ) as response:
                return int((await _json_or_error(response))["received"])
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(exc, self.where) from None

    async def download(
        self,
        file_id: int,
        offset: int,
        write: Callable[[bytes], Awaitable[None]],
        chunk_size: int = 1024 * 1024,
    ) -> None:
        """Stream a file from ``offset`` into ``write``. Raises NetworkError if cut."""
        http = self._session()
        headers = self._headers({"Range": f"bytes={offset}-"} if offset else {})
        try:
            async with http.get(
                f"{self.base}/files/{file_id}", headers=headers, ssl=self._ssl
            ) as response:
                if response.status >= 400:
                    await _json_or_error(response)
                if offset and response.status != 206:
                    raise ProtocolError("The fallback server ignored the resume range")
                async for chunk in response.content.iter_chunked(chunk_size):
                    await write(chunk)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _network_error(exc, self.where) from None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("FallbackClient used outside 'async with'")
        return self._http

    async def _with_retries(
        self, attempt: Callable[[aiohttp.ClientSession], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        delay = RETRY_BASE_DELAY
        for number in range(self._retries + 1):
            try:
                return await attempt(self._session())
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = _network_error(exc, self.where)
                if not error.retryable or number == self._retries:
                    raise error from None
                log.info("fallback request failed (%s); retrying in %.2f s", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 4.0)
        raise AssertionError("unreachable")


async def _json_or_error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        body = None
    if response.status >= 400:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            raise error_from_dict(body)
        raise NetworkError(f"The fallback server answered HTTP {response.status}")
    if not isinstance(body, dict):
        raise ProtocolError("The fallback server sent something that is not a JSON object")
    return body


def _network_error(exc: BaseException, where: str) -> SlipstreamError:
    if isinstance(exc, SlipstreamError):
        return exc
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return HostKeyError(
            f"The HTTPS fallback at {where} presented another certificate than the one "
            "pinned: someone may be impersonating the server"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return HostKeyError(
            f"The HTTPS fallback at {where} has a certificate this machine does not trust; "
            "pin it with https_fallback_fingerprint / --fallback-fingerprint (slipstream serve "
            "prints it)"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"Cannot reach the HTTPS fallback at {where}: {exc.os_error}")
    reason = str(exc) or type(exc).__name__
    return NetworkError(f"HTTPS fallback connection to {where} failed: {reason}")
