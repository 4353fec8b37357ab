"""The HTTPS fallback server: the same transfers as over UDP, carried by HTTPS requests.

Protocol: see :mod:`slipstream.transport.http_fallback` and docs/protocol.md. The server
side keeps the rules of the UDP sessions, with the same code where it can:

* logins, token binding and rights are :class:`ServerServices`' (same as over SSH);
* destinations are resolved by the server session's ``DestinationResolver`` setup and
  sources expanded by ``expand_sources``, both confined to the user's docroot;
* uploads land in ``NAME.partial``, written only at offsets the client proves contiguous,
  and are renamed only after the client's digest matches the bytes on disk;
* every session is an ops record (continuing the UDP session's record after a fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from slipstream import __version__
from slipstream.engine.blockio import file_digest, os_error_to_slipstream
from slipstream.engine.fallback import skip_reason
from slipstream.engine.paths import DestinationResolver, SourceEntry, expand_sources
from slipstream.engine.session import ReceiveOptions
from slipstream.engine.wiring import destination_for_spec
from slipstream.errors import (
    AuthenticationError,
    ChecksumMismatch,
    PathError,
    PeerAborted,
    ProtocolError,
    SlipstreamError,
    UsageError,
    error_from_dict,
)
from slipstream.server.config import UserConfig
from slipstream.server.http_common import (
    basic_credentials,
    bearer_token,
    error_middleware,
    json_body,
)
from slipstream.server.ops import Tracked
from slipstream.server.services import ServerServices
from slipstream.spec import TransferSpec, load_transfer_spec
from slipstream.transport.http_fallback import BASE_PATH, SESSION_HEADER

log = logging.getLogger("slipstream.server")

IDLE_TIMEOUT = 300.0  # a fallback client silent this long is gone; its session ends
SWEEP_INTERVAL = 30.0
MAX_SESSIONS = 256
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass
class _Upload:
    file_id: int
    rel_path: str
    final: Path
    partial: Path
    size: int
    mtime_ns: int
    received: int = 0
    digest: str | None = None  # set once committed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Session:
    id: str
    user: UserConfig
    spec: TransferSpec
    tracked: Tracked
    options: ReceiveOptions
    resolver: DestinationResolver | None = None
    entries: list[SourceEntry] = field(default_factory=list)
    uploads: dict[int, _Upload] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)


class FallbackServer:
    def __init__(self, services: ServerServices) -> None:
        self.services = services
        self.sessions: dict[str, _Session] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        routes = [
            web.get(f"{BASE_PATH}/ping", self.ping),
            web.post(f"{BASE_PATH}/sessions", self.open_session),
            web.post(f"{BASE_PATH}/dirs", self.make_dir),
            web.post(f"{BASE_PATH}/files", self.announce),
            web.put(f"{BASE_PATH}/files/{{id}}", self.put_range),
            web.get(f"{BASE_PATH}/files/{{id}}/status", self.upload_status),
            web.post(f"{BASE_PATH}/files/{{id}}/commit", self.commit),
            web.get(f"{BASE_PATH}/files/{{id}}", self.download),
            web.get(f"{BASE_PATH}/files/{{id}}/digest", self.digest),
            web.post(f"{BASE_PATH}/files/{{id}}/done", self.download_done),
            web.post(f"{BASE_PATH}/close", self.close_session),
        ]
        app.add_routes(routes)
        app.on_startup.append(self._start_sweeper)
        app.on_cleanup.append(self._stop)
        return app

    # --- session life -------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "service": "slipstream-fallback", "version": __version__}
        )

    async def open_session(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        spec = load_transfer_spec(body.get("spec"))
        user = await self._login(request, spec)
        self.services.authorize(user, spec)  # before any file system access
        if len(self.sessions) >= MAX_SESSIONS:
            self._sweep(force=True)
        peer = request.remote or "?"
        xfer_id = getattr(getattr(user, "claims", None), "xfer_id", None)
        tracked = self.services.ops.start(
            user=user.name, peer=peer, spec=spec, transport="http", xfer_id=xfer_id
        )
        session = _Session(
            secrets.token_urlsafe(24), user, spec, tracked, ReceiveOptions.from_spec(spec)
        )
        try:
            answer = self._prepare(session)
        except SlipstreamError as exc:
            tracked.finish(exc)
            raise
        self.sessions[session.id] = session
        log.info(
            "fallback session user=%s peer=%s direction=%s xfer=%s",
            user.name,
            peer,
            spec.direction,
            tracked.id,
        )
        return web.json_response({"session": session.id, "xfer_id": tracked.id, **answer})

    async def _login(self, request: web.Request, spec: TransferSpec) -> UserConfig:
        header = request.headers.get("Authorization", "")
        token = bearer_token(header)
        if token is not None:
            if not spec.remote_user:
                raise UsageError("remote_user: the transfer user is required")
            return await self.services.http_login(spec.remote_user, password=None, token=token)
        credentials = basic_credentials(header)
        if credentials is None:
            raise AuthenticationError("The HTTPS fallback needs a token or a user and password")
        user, password = credentials
        return await self.services.http_login(user, password=password, token=None)

    def _prepare(self, session: _Session) -> dict[str, Any]:
        user, spec = session.user, session.spec
        if spec.direction == "send":
            session.resolver = destination_for_spec(
                spec, base_dir=user.docroot, docroot=user.docroot, default_root="/"
            )
            return {}
        session.entries = list(
            expand_sources(
                [(p.source, p.destination) for p in spec.path_pairs()],
                base_dir=user.docroot,
                docroot=user.docroot,
                source_root=spec.source_root,
                src_base=spec.src_base,
            )
        )
        manifest = [
            {
                "id": index,
                "path": entry.rel_path,
                "kind": entry.kind,
                "size": entry.size,
                "mtime_ns": entry.mtime_ns,
                "mode": entry.mode,
            }
            for index, entry in enumerate(session.entries)
        ]
        return {"manifest": manifest}

    async def close_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await json_body(request)
        error = body.get("error")
        self.sessions.pop(session.id, None)
        session.tracked.finish(error_from_dict(error) if isinstance(error, dict) else None)
        return web.json_response({"ok": True, "xfer_id": session.tracked.id})

    def _session(self, request: web.Request, direction: str | None = None) -> _Session:
        session = self.sessions.get(request.headers.get(SESSION_HEADER, ""))
        if session is None:
            raise AuthenticationError("Unknown or expired fallback session: open a new one")
        if direction is not None and session.spec.direction != direction:
            raise UsageError("This request does not fit the session's direction")
        session.last_seen = time.monotonic()
        return session

    async def _start_sweeper(self, _app: web.Application) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _stop(self, _app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions.values()):
            session.tracked.finish(PeerAborted("The server stopped"))
        self.sessions.clear()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self._sweep()

    def _sweep(self, *, force: bool = False) -> None:
        now = time.monotonic()
        idle = sorted(self.sessions.values(), key=lambda s: s.last_seen)
        for session in idle:
            if now - session.last_seen < IDLE_TIMEOUT and not force:
                break
            force = False  # under pressure, drop only the one idle the longest
            self.sessions.pop(session.id, None)
            session.tracked.finish(PeerAborted("The fallback client went away"))

    # --- uploads ----------------------------------------------------------------------------

    async def make_dir(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        body = await json_body(request)
        assert session.resolver is not None
        path = session.resolver.path_for(str(body.get("path", "")), kind="dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PathError(f"Cannot create folder {body.get('path')!r}: {exc.strerror}") from None
        return web.json_response({"ok": True})

    async def announce(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        body = await json_body(request)
        try:
            rel, size = str(body["path"]), int(body["size"])
            mtime_ns = int(body.get("mtime_ns", 0))
        except (KeyError, TypeError, ValueError):
            raise UsageError("A file announcement needs path and size") from None
        if size < 0:
            raise UsageError("A file size cannot be negative")
        try:
            return web.json_response(self._place(session, rel, size, mtime_ns))
        except SlipstreamError as exc:
            # One file's problem (a name outside the docroot, a folder in the way) fails
            # that file, as over UDP; the session goes on.
            session.tracked.file_event({"type": "file_error", "path": rel, "error": exc.to_dict()})
            return web.json_response({"action": "error", "error": exc.to_dict()})

    def _place(self, session: _Session, rel: str, size: int, mtime_ns: int) -> dict[str, Any]:
        known = session.by_path.get(rel)
        if known is not None:  # a retried announcement: same file, resume where it is
            upload = session.uploads[known]
            return {"action": "send", "file": known, "offset": upload.received}
        assert session.resolver is not None
        final = session.resolver.path_for(rel, kind="file")
        reason = skip_reason(session.options.overwrite, final, size, mtime_ns)
        if reason:
            session.tracked.file_event(
                {"type": "file_skipped", "path": rel, "size": size, "reason": reason}
            )
            return {"action": "skip", "reason": reason}
        final = session.resolver.ensure_parent(rel)
        partial = final.with_name(final.name + session.options.partial_suffix)
        offset = _resume_offset(partial, size, session.spec)
        if offset == 0:
            try:
                with open(partial, "wb"):
                    pass
            except OSError as exc:
                raise _os_error(exc, rel, "write") from None
        file_id = len(session.uploads)
        session.uploads[file_id] = _Upload(file_id, rel, final, partial, size, mtime_ns, offset)
        session.by_path[rel] = file_id
        return {"action": "send", "file": file_id, "offset": offset}

    async def upload_status(self, request: web.Request) -> web.Response:
        upload = self._upload(self._session(request, "send"), request)
        return web.json_response({"received": upload.received, "committed": bool(upload.digest)})

    async def put_range(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        upload = self._upload(session, request)
        start, end = _content_range(request.headers.get("Content-Range", ""), upload.size)
        async with upload.lock:
            if start > upload.received:
                # A gap would leave bytes nobody sent: the client must resume at `received`.
                return web.json_response({"received": upload.received, "error": "gap"}, status=416)
            written = await self._write_body(request, upload, start)
            session.last_seen = time.monotonic()
        if start + written != end + 1:
            raise ProtocolError("The request body is shorter than its Content-Range")
        return web.json_response({"received": upload.received})

    async def _write_body(self, request: web.Request, upload: _Upload, start: int) -> int:
        try:
            fd = os.open(upload.partial, os.O_WRONLY)
        except OSError as exc:
            raise _os_error(exc, upload.rel_path, "write") from None
        position = start
        try:
            async for chunk in request.content.iter_chunked(1024 * 1024):
                if position + len(chunk) > upload.size:
                    raise UsageError("More bytes than the file's announced size")
                os.pwrite(fd, chunk, position)
                position += len(chunk)
                # Count as we go: a cut connection keeps every byte that did arrive.
                upload.received = max(upload.received, position)
        except OSError as exc:
            raise _os_error(exc, upload.rel_path, "write") from None
        finally:
            os.close(fd)
        return position - start

    async def commit(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        upload = self._upload(session, request)
        body = await json_body(request)
        async with upload.lock:
            if upload.digest is None:
                await self._finish_upload(session, upload, str(body.get("digest", "")))
        return web.json_response({"digest": upload.digest})

    async def _finish_upload(self, session: _Session, upload: _Upload, expected: str) -> None:
        if upload.received != upload.size:
            raise ProtocolError(
                f"{upload.rel_path}: {upload.received} of {upload.size} bytes received"
            )
        try:
            digest = await asyncio.to_thread(file_digest, upload.partial)
            if digest != expected:
                # Start this file over: whatever is in the partial cannot be trusted.
                upload.partial.unlink(missing_ok=True)
                session.by_path.pop(upload.rel_path, None)
                error = ChecksumMismatch(
                    f"{upload.rel_path}: received bytes differ from the sender's",
                    internal_message=f"sender {expected}, receiver {digest}",
                )
                session.tracked.file_event(
                    {"type": "file_error", "path": upload.rel_path, "error": error.to_dict()}
                )
                raise error
            if session.options.preserve_times and upload.mtime_ns:
                os.utime(upload.partial, ns=(upload.mtime_ns, upload.mtime_ns))
            os.replace(upload.partial, upload.final)
        except OSError as exc:
            raise _os_error(exc, upload.rel_path, "finish") from None
        upload.digest = digest
        session.tracked.file_event(
            {"type": "file_done", "path": upload.rel_path, "size": upload.size, "digest": digest}
        )

    def _upload(self, session: _Session, request: web.Request) -> _Upload:
        upload = session.uploads.get(_file_id(request))
        if upload is None:
            raise UsageError("Unknown file id for this session")
        return upload

    # --- downloads --------------------------------------------------------------------------

    def _entry(self, session: _Session, request: web.Request) -> tuple[int, SourceEntry]:
        file_id = _file_id(request)
        if not 0 <= file_id < len(session.entries) or session.entries[file_id].kind != "file":
            raise UsageError("Unknown file id for this session")
        return file_id, session.entries[file_id]

    async def download(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request, "receive")
        _, entry = self._entry(session, request)
        # FileResponse answers Range requests (206) itself: that is the resume.
        return web.FileResponse(entry.local_path, chunk_size=1024 * 1024)

    async def digest(self, request: web.Request) -> web.Response:
        session = self._session(request, "receive")
        file_id, entry = self._entry(session, request)
        if file_id not in session.digests:
            try:
                session.digests[file_id] = await asyncio.to_thread(file_digest, entry.local_path)
            except OSError as exc:
                raise _os_error(exc, entry.rel_path, "read") from None
        return web.json_response({"digest": session.digests[file_id]})

    async def download_done(self, request: web.Request) -> web.Response:
        session = self._session(request, "receive")
        file_id, entry = self._entry(session, request)
        body = await json_body(request)
        if file_id not in session.reported:  # a retried report counts once
            session.reported.add(file_id)
            session.tracked.file_event(_download_event(entry, body))
        return web.json_response({"ok": True})


def _download_event(entry: SourceEntry, body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status")
    event: dict[str, Any] = {"path": entry.rel_path, "size": entry.size}
    if status == "completed":
        return {**event, "type": "file_done", "digest": body.get("digest")}
    if status == "skipped":
        return {**event, "type": "file_skipped", "reason": body.get("reason")}
    return {**event, "type": "file_error", "error": body.get("error") or {}}


# --- helpers --------------------------------------------------------------------------------


def _resume_offset(partial: Path, size: int, spec: TransferSpec) -> int:
    """Where an upload resumes. A partial is trusted only if it is shorter than the file:
    one the UDP path made is pre-sized to the full length with holes, so its length says
    nothing. The digest check at commit catches anything else."""
    if spec.resume == "none":
        return 0
    with contextlib.suppress(OSError):
        held = partial.stat().st_size
        if 0 < held < size and partial.is_file():
            return held
    return 0


def _file_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise UsageError("A file id is a number") from None


def _content_range(header: str, size: int) -> tuple[int, int]:
    match = _CONTENT_RANGE.match(header.strip())
    if not match:
        raise UsageError("PUT needs Content-Range: bytes START-END/SIZE")
    start, end, total = (int(g) for g in match.groups())
    if total != size or start > end or end >= size:
        raise UsageError(f"Content-Range {header!r} does not fit the file's size {size}")
    return start, end


def _os_error(exc: OSError, rel: str, action: str) -> SlipstreamError:
    # The docroot-relative name only: the message goes to the client.
    error = os_error_to_slipstream(exc, Path(rel), action)
    return error if isinstance(error, SlipstreamError) else SlipstreamError(str(error))
