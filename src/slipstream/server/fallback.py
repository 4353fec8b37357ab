"""The HTTPS fallback server: the same transfers as over UDP, carried by HTTPS requests.

Protocol: see :mod:`slipstream.transport.http_fallback` and docs/protocol.md. The server
side keeps the rules of the UDP sessions, with the same code:

* logins, token binding and rights are :class:`ServerServices`', and the spec passes the
  SSH session's checks (:func:`~slipstream.server.session.check_session_rights`);
* uploads: the destination is the UDP session's ``DestinationResolver`` setup; skip,
  overwrite and resume follow :mod:`slipstream.engine.overwrite` (asking the client for
  checksums of byte ranges where a policy compares content); the server's ``overwrite =
  false`` veto holds; files land in ``NAME.partial`` (with the UDP path's checkpoint), are
  written only at offsets the client proves contiguous, and are finished by
  :func:`~slipstream.engine.incoming.finish_file` (digest and checksum, times, saving the
  old version, the rename); ``delete_before_transfer`` mirrors with the same tracker;
* downloads: sources are :func:`~slipstream.engine.selection.select_sources`' (filters,
  time windows, symlink policy), removed or archived after the client confirms them;
* every session is paced (the user's caps, and the server's one aggregate cap, shared
  with the UDP sessions) and is an ops record (continuing the UDP session's record after a
  fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from slipstream import __version__
from slipstream.engine.blockio import open_nofollow, os_error_to_slipstream
from slipstream.engine.digests import checksum_algorithm, digest_path, range_sums_of_path
from slipstream.engine.disposition import MirrorTracker
from slipstream.engine.envelope import HEADER_SIZE
from slipstream.engine.fallback import prefix_record
from slipstream.engine.incoming import (
    IncomingFile,
    ReceiveOptions,
    discard_partial,
    finish_file,
    place_link,
)
from slipstream.engine.multisession import select_share
from slipstream.engine.outgoing import SendOptions
from slipstream.engine.overwrite import (
    SameContent,
    overwrite_refused,
    resume_offset,
    skip_reason,
)
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.engine.ratelimits import RateState, initial_state
from slipstream.engine.resume import (
    CHECKPOINT_MIN_SIZE,
    ByteRange,
    CheckpointWriter,
    FileIdentity,
    read_checkpoint,
    remove_checkpoint,
)
from slipstream.engine.selection import LeftOut, select_sources
from slipstream.engine.sums import parse_ranges
from slipstream.engine.wiring import destination_for_spec
from slipstream.errors import (
    AuthenticationError,
    ChecksumMismatch,
    ContentProtectionError,
    FileIOError,
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
from slipstream.server.rate_policy import AggregateBudget
from slipstream.server.services import ServerServices
from slipstream.server.session import _file_details, check_session_rights, may_overwrite
from slipstream.spec import TransferSpec, load_transfer_spec
from slipstream.transport.http_fallback import (
    BASE_PATH,
    SEMANTICS_VERSION,
    SESSION_HEADER,
    Pacer,
)

log = logging.getLogger("slipstream.server")

IDLE_TIMEOUT = 300.0  # a fallback client silent this long is gone; its session ends
SWEEP_INTERVAL = 30.0
MAX_SESSIONS = 256
READ_CHUNK = 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class _Upload:
    incoming: IncomingFile  # the UDP receiver's per-file state: names, times, checkpoint
    received: int = 0
    result: dict[str, Any] | None = None  # set once committed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Session:
    id: str
    user: UserConfig
    spec: TransferSpec
    tracked: Tracked
    peer: str
    rate: RateState
    pacer: Pacer
    options: ReceiveOptions  # uploads
    sending: SendOptions | None = None  # downloads
    resolver: DestinationResolver | None = None
    mirror: MirrorTracker | None = None
    budget_handle: int | None = None
    mirrored: set[str] = field(default_factory=set)  # entries the mirror tracker has seen
    entries: list[SourceEntry] = field(default_factory=list)
    uploads: dict[int, _Upload] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)
    digests: dict[int, dict[str, Any]] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)

    def on_share(self, share_kbps: int | None) -> None:
        """The aggregate cap was re-split: pace at the new ceiling."""
        self.rate = replace(self.rate, ceiling_kbps=share_kbps)
        self.pacer.set_rate(self.rate.effective_target_kbps)


class _NeedSums(Exception):
    """An upload decision needs the client's checksums of ``ranges`` first."""

    def __init__(self, target: str, ranges: list[list[int]], env_header: str | None) -> None:
        super().__init__(target)
        self.answer: dict[str, Any] = {"action": "compare", "target": target, "ranges": ranges}
        if env_header is not None:
            self.answer["env_header"] = env_header


class FallbackServer:
    def __init__(self, services: ServerServices) -> None:
        self.services = services
        self.sessions: dict[str, _Session] = {}
        # The server's one aggregate cap, split with its UDP sessions (rate_policy.py).
        self.budget: AggregateBudget = services.budget
        self._sweeper: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware])
        routes = [
            web.get(f"{BASE_PATH}/ping", self.ping),
            web.post(f"{BASE_PATH}/sessions", self.open_session),
            web.post(f"{BASE_PATH}/dirs", self.make_dir),
            web.post(f"{BASE_PATH}/links", self.make_link),
            web.post(f"{BASE_PATH}/files", self.announce),
            web.put(f"{BASE_PATH}/files/{{id}}", self.put_range),
            web.get(f"{BASE_PATH}/files/{{id}}/status", self.upload_status),
            web.post(f"{BASE_PATH}/files/{{id}}/commit", self.commit),
            web.get(f"{BASE_PATH}/files/{{id}}", self.download),
            web.get(f"{BASE_PATH}/files/{{id}}/digest", self.digest),
            web.post(f"{BASE_PATH}/files/{{id}}/sums", self.sums),
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
        check_session_rights(user, spec)  # the SSH session's checks, word for word
        rate = initial_state(spec, user.rate.limits(), user.rate.target_rate_default_kbps)
        if len(self.sessions) >= MAX_SESSIONS:
            self._sweep(force=True)
        peer = request.remote or "?"
        xfer_id = getattr(getattr(user, "claims", None), "xfer_id", None)
        tracked = self.services.ops.start(
            user=user.name, peer=peer, spec=spec, transport="http", xfer_id=xfer_id
        )
        options = ReceiveOptions.from_spec(
            spec,
            allow_overwrite=may_overwrite(self.services.config, user),
            link_root=user.docroot,
        )
        session = _Session(
            secrets.token_urlsafe(24), user, spec, tracked, peer, rate, Pacer(), options
        )
        try:
            answer = await self._prepare(session)
        except SlipstreamError as exc:
            tracked.finish(exc)
            raise
        session.budget_handle = self.budget.join(session.on_share)
        session.on_share(self.budget.share_kbps())
        self.sessions[session.id] = session
        log.info(
            "fallback session user=%s peer=%s direction=%s xfer=%s",
            user.name,
            peer,
            spec.direction,
            tracked.id,
        )
        return web.json_response(
            {
                "session": session.id,
                "xfer_id": tracked.id,
                "semantics": SEMANTICS_VERSION,
                "rate": session.rate.to_wire(),
                **answer,
            }
        )

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

    async def _prepare(self, session: _Session) -> dict[str, Any]:
        user, spec = session.user, session.spec
        if spec.direction == "send":
            session.resolver = destination_for_spec(
                spec, base_dir=user.docroot, docroot=user.docroot, default_root="/"
            )
            session.mirror = self._mirror_tracker(session) if session.options.mirror else None
            return {}
        session.sending = SendOptions.from_spec(
            spec, local=False, base_dir=user.docroot, docroot=user.docroot
        )
        listed = await asyncio.to_thread(_list_sources, spec, user.docroot, session.sending)
        manifest: list[dict[str, Any]] = []
        for item in listed:
            if isinstance(item, LeftOut):
                self._record(session, _left_out_event(item))
                continue
            entry, extra = item
            manifest.append(_manifest_item(len(session.entries), entry, extra))
            session.entries.append(entry)
            if entry.kind == "dir":
                session.sending.disposer.note_dir(entry)
        return {"manifest": manifest}

    def _mirror_tracker(self, session: _Session) -> MirrorTracker:
        resolver, options = session.resolver, session.options
        assert resolver is not None
        return MirrorTracker(
            lambda rel: resolver.path_for(rel, kind="dir"),
            options.partial_suffix,
            lambda rel, is_dir: options.filters.excluding_rule(rel, is_dir) is not None,
            lambda rel, _path: self._record(session, {"type": "file_deleted", "path": rel}),
        )

    def _mirror_entry(self, session: _Session, rel: str, is_dir: bool) -> None:
        # A retried request must not announce an entry twice.
        if session.mirror is not None and rel not in session.mirrored:
            session.mirrored.add(rel)
            session.mirror.entry(rel, is_dir)

    async def close_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await json_body(request)
        error = body.get("error")
        failure = error_from_dict(error) if isinstance(error, dict) else None
        if failure is None:
            # Only a complete listing may mirror deletions or remove emptied folders.
            if session.mirror is not None:
                session.mirror.finish()
            if session.sending is not None:
                session.sending.disposer.finish(lambda event: self._record(session, event))
        self._end(session, failure)
        return web.json_response({"ok": True, "xfer_id": session.tracked.id})

    def _end(self, session: _Session, error: SlipstreamError | None) -> None:
        self.sessions.pop(session.id, None)
        if session.budget_handle is not None:
            self.budget.leave(session.budget_handle)
            session.budget_handle = None
        for upload in session.uploads.values():
            if upload.incoming.checkpoint is not None:
                upload.incoming.checkpoint.close()  # a rerun resumes from what it records
        session.tracked.finish(error)

    def _session(self, request: web.Request, direction: str | None = None) -> _Session:
        session = self.sessions.get(request.headers.get(SESSION_HEADER, ""))
        if session is None:
            raise AuthenticationError("Unknown or expired fallback session: open a new one")
        if direction is not None and session.spec.direction != direction:
            raise UsageError("This request does not fit the session's direction")
        session.last_seen = time.monotonic()
        return session

    def _record(self, session: _Session, event: dict[str, Any]) -> None:
        """One file's result: the ops record and the same log line as a UDP session's."""
        session.tracked.file_event(event)
        kind = event.get("type")
        if kind in ("file_done", "file_error", "file_skipped", "file_excluded"):
            log.info(
                "file user=%s peer=%s dir=%s path=%s result=%s size=%s%s transport=http",
                session.user.name,
                session.peer,
                "in" if session.spec.direction == "send" else "out",
                event.get("path"),
                kind,
                event.get("size", ""),
                _file_details(event),
            )

    async def _start_sweeper(self, _app: web.Application) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _stop(self, _app: web.Application) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions.values()):
            self._end(session, PeerAborted("The server stopped"))

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
            self._end(session, PeerAborted("The fallback client went away"))

    # --- uploads: folders and links ---------------------------------------------------------

    async def make_dir(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        body = await json_body(request)
        rel = str(body.get("path", ""))
        self._mirror_entry(session, rel, True)
        assert session.resolver is not None
        try:
            session.resolver.path_for(rel, kind="dir").mkdir(parents=True, exist_ok=True)
        except (SlipstreamError, OSError) as exc:
            # As over UDP: reported, and the files below it fail on their own.
            error = exc if isinstance(exc, SlipstreamError) else _os_error(exc, rel, "create")
            self._record(session, {"type": "file_error", "path": rel, "error": error.to_dict()})
            return web.json_response({"ok": False, "error": error.to_dict()})
        return web.json_response({"ok": True})

    async def make_link(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        body = await json_body(request)
        rel, target = str(body.get("path", "")), str(body.get("target", ""))
        self._mirror_entry(session, rel, False)
        resolver, options = session.resolver, session.options
        assert resolver is not None
        policy = "copy+force" if options.symlink_policy == "copy+force" else "copy"
        try:
            link = resolver.link_path_for(rel)
            root = options.link_root or resolver.confinement_root()
            reason = place_link(link, target, root, policy)
        except (SlipstreamError, OSError) as exc:
            error = exc if isinstance(exc, SlipstreamError) else _os_error(exc, rel, "create")
            self._record(session, {"type": "file_error", "path": rel, "error": error.to_dict()})
            return web.json_response({"status": "error", "error": error.to_dict()})
        if reason:
            self._record(session, {"type": "file_skipped", "path": rel, "reason": reason})
            return web.json_response({"status": "skipped", "reason": reason})
        if session.mirror is not None:
            session.mirror.created.add(link)
        self._record(session, {"type": "link_done", "path": rel, "target": target})
        return web.json_response({"status": "done"})

    # --- uploads: files ---------------------------------------------------------------------

    async def announce(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        body = await json_body(request)
        try:
            rel, size = str(body["path"]), int(body["size"])
            mtime_ns = int(body.get("mtime_ns", 0))
            atime = body.get("atime_ns")
            atime_ns = int(atime) if atime is not None else None
        except (KeyError, TypeError, ValueError):
            raise UsageError("A file announcement needs path and size") from None
        if size < 0:
            raise UsageError("A file size cannot be negative")
        sums = body.get("sums")
        sums = sums if isinstance(sums, dict) else {}
        incoming = IncomingFile(len(session.uploads), rel, rel, size, mtime_ns, atime_ns)
        try:
            return web.json_response(await self._place(session, incoming, sums))
        except _NeedSums as need:
            return web.json_response(need.answer)
        except (SlipstreamError, OSError) as exc:
            # One file's problem (a name outside the docroot, a folder in the way, the
            # server's overwrite veto) fails that file, as over UDP; the session goes on.
            error = exc if isinstance(exc, SlipstreamError) else _os_error(exc, rel, "write")
            self._record(session, {"type": "file_error", "path": rel, "error": error.to_dict()})
            return web.json_response({"action": "error", "error": error.to_dict()})

    async def _place(
        self, session: _Session, incoming: IncomingFile, sums: dict[str, Any]
    ) -> dict[str, Any]:
        """Skip the file, or open its partial and say from which offset to send."""
        rel = incoming.rel_path
        known = session.by_path.get(rel)
        if known is not None:  # a retried announcement: same file, resume where it is
            return {"action": "send", "file": known, "offset": session.uploads[known].received}
        self._mirror_entry(session, rel, False)
        resolver, options = session.resolver, session.options
        assert resolver is not None
        incoming.final = resolver.path_for(rel, kind="file")
        incoming.partial = incoming.final.with_name(incoming.final.name + options.partial_suffix)
        try:
            existing: os.stat_result | None = os.lstat(incoming.final)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise PathError(f"{rel}: a folder is in the way of this file")
        announced = FileIdentity(incoming.size, incoming.mtime_ns)
        if existing is not None:
            same = self._comparer(session, "final", incoming.final, sums)
            reason = await skip_reason(options, existing, announced, same)
            if reason:
                event = {"type": "file_skipped", "path": rel, "size": incoming.size}
                self._record(session, {**event, "reason": reason})
                return {"action": "skip", "reason": reason}
            if not options.allow_overwrite:
                raise overwrite_refused(rel)
        record = read_checkpoint(incoming.partial) or prefix_record(incoming.partial, announced)
        same = self._comparer(session, "partial", incoming.partial, sums)
        offset = await resume_offset(options, record, announced, same)
        self._open_partial(session, incoming, offset)
        session.uploads[incoming.file_id] = _Upload(incoming, offset)
        session.by_path[rel] = incoming.file_id
        return {"action": "send", "file": incoming.file_id, "offset": offset}

    def _comparer(
        self, session: _Session, target: str, path: Path, sums: dict[str, Any]
    ) -> SameContent:
        """Compares ``path`` with the client's source, once the client sent its checksums.

        Until then it raises :class:`_NeedSums`, which answers the announcement with the
        ranges to checksum (and the stored envelope's header, which the client needs to
        produce the same envelope); the client announces again with them.
        """

        async def same(ranges: list[ByteRange]) -> bool:
            header: str | None = None
            if session.options.encrypted_upload:
                with open(path, "rb") as handle:
                    head = handle.read(HEADER_SIZE)
                if len(head) < HEADER_SIZE:
                    return False
                header = head.hex()
            wire = [list(r) for r in ranges]
            theirs = sums.get(target)
            if not isinstance(theirs, dict) or theirs.get("ranges") != wire:
                raise _NeedSums(target, wire, header)
            if theirs.get("error"):
                return False  # the client could not produce them: not the same
            ours = await asyncio.to_thread(range_sums_of_path, path, ranges)
            return theirs.get("sums") == ours

        return same

    def _open_partial(self, session: _Session, incoming: IncomingFile, offset: int) -> None:
        assert session.resolver is not None
        incoming.final = session.resolver.ensure_parent(incoming.rel_path)
        incoming.partial = incoming.final.with_name(
            incoming.final.name + session.options.partial_suffix
        )
        if incoming.size >= CHECKPOINT_MIN_SIZE:  # first: it also locks the partial
            source = FileIdentity(incoming.size, incoming.mtime_ns)
            incoming.checkpoint = CheckpointWriter(incoming.partial, source, offset)
        else:
            remove_checkpoint(incoming.partial)
        try:
            fd = open_nofollow(incoming.partial, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, offset)  # anything past the trusted prefix goes
            finally:
                os.close(fd)
        except OSError:
            if incoming.checkpoint is not None:
                incoming.checkpoint.close()
            raise

    async def upload_status(self, request: web.Request) -> web.Response:
        upload = self._upload(self._session(request, "send"), request)
        committed = upload.result is not None
        return web.json_response({"received": upload.received, "committed": committed})

    async def put_range(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        upload = self._upload(session, request)
        start, end = _content_range(request.headers.get("Content-Range", ""), upload.incoming.size)
        async with upload.lock:
            if start > upload.received:
                # A gap would leave bytes nobody sent: the client must resume at `received`.
                return web.json_response({"received": upload.received, "error": "gap"}, status=416)
            written = await self._write_body(session, request, upload, start)
            session.last_seen = time.monotonic()
        if start + written != end + 1:
            raise ProtocolError("The request body is shorter than its Content-Range")
        return web.json_response({"received": upload.received})

    async def _write_body(
        self, session: _Session, request: web.Request, upload: _Upload, start: int
    ) -> int:
        incoming = upload.incoming
        try:
            fd = open_nofollow(incoming.partial, os.O_WRONLY)
        except OSError as exc:
            raise _os_error(exc, incoming.rel_path, "write") from None
        position = start
        try:
            async for chunk in request.content.iter_chunked(READ_CHUNK):
                if position + len(chunk) > incoming.size:
                    raise UsageError("More bytes than the file's announced size")
                os.pwrite(fd, chunk, position)
                position += len(chunk)
                # Count as we go: a cut connection keeps every byte that did arrive.
                if position > upload.received:
                    upload.received = position
                    if incoming.checkpoint is not None:
                        incoming.checkpoint.write(position)
                await session.pacer.take(len(chunk))  # the server's caps, whatever the client
        except OSError as exc:
            raise _os_error(exc, incoming.rel_path, "write") from None
        finally:
            os.close(fd)
        return position - start

    async def commit(self, request: web.Request) -> web.Response:
        session = self._session(request, "send")
        upload = self._upload(session, request)
        body = await json_body(request)
        async with upload.lock:
            if upload.result is None:
                upload.result = await self._finish_upload(session, upload, body)
        return web.json_response(upload.result)

    async def _finish_upload(
        self, session: _Session, upload: _Upload, body: dict[str, Any]
    ) -> dict[str, Any]:
        incoming = upload.incoming
        rel = incoming.rel_path
        if upload.received != incoming.size:
            raise ProtocolError(f"{rel}: {upload.received} of {incoming.size} bytes received")
        incoming.digest = str(body.get("digest") or "")
        checksum = body.get("checksum")
        incoming.checksum = str(checksum) if checksum else None
        if incoming.checkpoint is not None:
            incoming.checkpoint.close()
        try:
            result = await asyncio.to_thread(finish_file, incoming, session.options)
        except (SlipstreamError, OSError) as exc:
            error = exc if isinstance(exc, SlipstreamError) else _os_error(exc, rel, "finish")
            if isinstance(error, ChecksumMismatch | ContentProtectionError):
                # Start this file over: whatever is in the partial cannot be trusted.
                discard_partial(incoming)
                session.by_path.pop(rel, None)
            self._record(session, {"type": "file_error", "path": rel, "error": error.to_dict()})
            raise error from None
        digests = result.digests
        event: dict[str, Any] = {
            "type": "file_done",
            "path": rel,
            "size": incoming.size,
            "digest": digests.digest,
        }
        if session.options.checksum and digests.checksum:
            event["file_checksum"] = digests.checksum
            event["file_checksum_type"] = session.options.checksum
        if incoming.offset:
            event["resumed_from"] = incoming.offset
        if result.backup is not None:
            event["saved_as"] = str(result.backup)
            if session.mirror is not None:
                session.mirror.created.add(result.backup)
        self._record(session, event)
        return {"digest": digests.digest, "checksum": digests.checksum}

    def _upload(self, session: _Session, request: web.Request) -> _Upload:
        upload = session.uploads.get(_file_id(request))
        if upload is None:
            raise UsageError("Unknown file id for this session")
        return upload

    # --- downloads --------------------------------------------------------------------------

    def _entry(
        self, session: _Session, request: web.Request, kinds: tuple[str, ...] = ("file",)
    ) -> tuple[int, SourceEntry]:
        file_id = _file_id(request)
        if not 0 <= file_id < len(session.entries) or session.entries[file_id].kind not in kinds:
            raise UsageError("Unknown file id for this session")
        return file_id, session.entries[file_id]

    async def download(self, request: web.Request) -> web.StreamResponse:
        session = self._session(request, "receive")
        _, entry = self._entry(session, request)
        offset = _range_start(request.headers.get("Range"))
        try:
            fd = os.open(entry.local_path, os.O_RDONLY)
        except OSError as exc:
            raise _os_error(exc, entry.rel_path, "read") from None
        try:
            # Never more than the manifest said: a grown file fails its digest instead.
            end = min(entry.size, os.fstat(fd).st_size)
            if offset > end:
                raise FileIOError(f"{entry.rel_path} is shorter than the resume offset")
            return await self._stream(session, request, fd, offset, end)
        finally:
            os.close(fd)

    async def _stream(
        self, session: _Session, request: web.Request, fd: int, offset: int, end: int
    ) -> web.StreamResponse:
        """The file's bytes from ``offset``, paced; a ``Range`` request gets its 206."""
        response = web.StreamResponse(status=206 if offset else 200)
        response.content_type = "application/octet-stream"
        response.content_length = end - offset
        if offset:
            response.headers["Content-Range"] = f"bytes {offset}-{end - 1}/{end}"
        await response.prepare(request)
        chunk = session.pacer.chunk_size(READ_CHUNK)
        position = offset
        try:
            while position < end:
                data = await asyncio.to_thread(os.pread, fd, min(chunk, end - position), position)
                if not data:
                    break  # shrank meanwhile: the client sees a short file and fails it
                await session.pacer.take(len(data))
                await response.write(data)
                position += len(data)
                session.last_seen = time.monotonic()
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; it resumes with Range, or the session is swept
        return response

    async def digest(self, request: web.Request) -> web.Response:
        session = self._session(request, "receive")
        file_id, entry = self._entry(session, request)
        if file_id not in session.digests:
            algorithm = checksum_algorithm(session.spec.file_checksum)
            try:
                digests = await asyncio.to_thread(digest_path, entry.local_path, algorithm)
            except OSError as exc:
                raise _os_error(exc, entry.rel_path, "read") from None
            session.digests[file_id] = {"digest": digests.digest, "checksum": digests.checksum}
        return web.json_response(session.digests[file_id])

    async def sums(self, request: web.Request) -> web.Response:
        """Checksums of byte ranges, for the client's overwrite and resume decisions."""
        session = self._session(request, "receive")
        _, entry = self._entry(session, request)
        body = await json_body(request)
        ranges = parse_ranges(body.get("ranges"), entry.size)
        try:
            sums = await asyncio.to_thread(range_sums_of_path, entry.local_path, ranges)
        except OSError as exc:
            error = _os_error(exc, entry.rel_path, "read")
            return web.json_response({"error": error.to_dict()})
        return web.json_response({"sums": sums})

    async def download_done(self, request: web.Request) -> web.Response:
        session = self._session(request, "receive")
        file_id, entry = self._entry(session, request, ("file", "link"))
        body = await json_body(request)
        if file_id not in session.reported:  # a retried report counts once
            session.reported.add(file_id)
            self._record(session, _download_event(entry, body))
            self._dispose(session, entry, str(body.get("status")))
        return web.json_response({"ok": True})

    def _dispose(self, session: _Session, entry: SourceEntry, status: str) -> None:
        """remove/move_after_transfer, once the client confirmed (or skipped) the file."""
        if session.sending is None or entry.kind != "file":
            return
        if status in ("completed", "skipped"):

            def emit(event: dict[str, Any]) -> None:
                self._record(session, event)

            session.sending.disposer.file_done(entry, emit, skipped=status == "skipped")


def _list_sources(
    spec: TransferSpec, docroot: Path, sending: SendOptions
) -> list[LeftOut | tuple[SourceEntry, dict[str, Any]]]:
    """The UDP session's selection, with what a FILE message adds. Runs in a thread."""
    selected = select_share(select_sources(spec, base_dir=docroot, docroot=docroot), spec)
    listed: list[LeftOut | tuple[SourceEntry, dict[str, Any]]] = []
    for item in selected:
        if isinstance(item, LeftOut):
            listed.append(item)
        elif isinstance(item, SourceEntry):
            listed.append((item, _file_extras(item, sending)))
    return listed


def _file_extras(entry: SourceEntry, sending: SendOptions) -> dict[str, Any]:
    """The access time before anything reads the file (``preserve_access_time``), and the
    envelope header of a file to decrypt (its passphrase is checked before it travels)."""
    extras: dict[str, Any] = {}
    if entry.kind != "file":
        return extras
    with contextlib.suppress(OSError):  # the read for sending reports it properly
        if sending.preserve_atime:
            extras["atime_ns"] = os.stat(entry.local_path).st_atime_ns
        if sending.attach_headers and entry.rel_path.endswith(sending.extension):
            with open(entry.local_path, "rb") as handle:
                header = handle.read(HEADER_SIZE)
            if len(header) == HEADER_SIZE:
                extras["env_header"] = header.hex()
    return extras


def _manifest_item(index: int, entry: SourceEntry, extras: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {"id": index, "path": entry.rel_path, "kind": entry.kind}
    if entry.kind == "link":
        return {**item, "target": entry.link_target}
    return {**item, "size": entry.size, "mtime_ns": entry.mtime_ns, "mode": entry.mode, **extras}


def _left_out_event(note: LeftOut) -> dict[str, Any]:
    kind = "file_excluded" if note.excluded else "file_skipped"
    return {"type": kind, "path": note.path, "reason": note.reason}


def _download_event(entry: SourceEntry, body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status")
    event: dict[str, Any] = {"path": entry.rel_path, "size": entry.size}
    if status == "completed":
        return {**event, "type": "file_done", "digest": body.get("digest")}
    if status == "skipped":
        return {**event, "type": "file_skipped", "reason": body.get("reason")}
    if status == "link_done":
        return {"path": entry.rel_path, "type": "link_done", "target": entry.link_target}
    return {**event, "type": "file_error", "error": body.get("error") or {}}


# --- helpers --------------------------------------------------------------------------------


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


def _range_start(header: str | None) -> int:
    if not header:
        return 0
    match = _RANGE.match(header.strip())
    if not match:
        raise UsageError("GET takes only Range: bytes=START- (a resume)")
    return int(match.group(1))


def _os_error(exc: OSError, rel: str, action: str) -> SlipstreamError:
    # The docroot-relative name only: the message goes to the client.
    error = os_error_to_slipstream(exc, Path(rel), action)
    return error if isinstance(error, SlipstreamError) else SlipstreamError(str(error))
