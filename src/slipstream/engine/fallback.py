"""A client transfer over the HTTPS fallback: the same files, rules and events as over UDP.

:func:`run_http_transfer` is what ``engine.job`` switches to when the UDP port does not
answer (``http_fallback: true``) or at once (``"force"``). Only the carrier changes: every
file-semantics field of the spec is decided by the code the UDP path uses (docs/files.md):

* uploads send what :func:`~slipstream.engine.selection.select_sources` selects (filters,
  time windows, symlink policy), prepared by the UDP sender's own helpers (access times,
  envelopes for ``content_protection``, obfuscated names), and dispose of sources with the
  same :class:`~slipstream.engine.disposition.SourceDisposer`;
* downloads decide skip, overwrite and resume with the UDP receiver's rules
  (:func:`~slipstream.engine.overwrite.skip_reason`, checkpoints) and finish every file with
  :func:`~slipstream.engine.incoming.finish_file` (digest and ``file_checksum`` check,
  decryption, times, ``save_before_overwrite``, the rename);
* both directions pace their bytes at the spec's ``target_rate_kbps``, within what the
  server grants.

Where a policy compares content, the two ends exchange checksums of byte ranges, as
SUMS_REQ/SUMS do over SSH. Events are the UDP path's, with ``"transport": "http"``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream.engine.blockio import new_digest, open_nofollow
from slipstream.engine.digests import (
    FileDigests,
    Reader,
    path_reader,
    range_sums_of_path,
)
from slipstream.engine.disposition import MirrorTracker
from slipstream.engine.driver import as_error
from slipstream.engine.envelope import (
    ChunkCipher,
    EnvelopeHeader,
    EnvelopeView,
    plain_file_reader,
)
from slipstream.engine.events import add_checksum, file_done_event
from slipstream.engine.incoming import (
    FinishResult,
    IncomingFile,
    ReceiveOptions,
    discard_partial,
    finish_file,
    hash_while_arriving,
    place_link,
)
from slipstream.engine.outgoing import (
    Announcement,
    NameObfuscator,
    SendOptions,
    announced_size,
    prepare_announcement,
)
from slipstream.engine.overwrite import overwrite_refused, resume_offset, skip_reason
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.engine.ratelimits import RateLimits, RateState, initial_state
from slipstream.engine.recv_inspect import open_envelope_header
from slipstream.engine.resume import (
    CHECKPOINT_MIN_SIZE,
    ByteRange,
    CheckpointRecord,
    CheckpointWriter,
    FileIdentity,
    read_checkpoint,
    remove_checkpoint,
)
from slipstream.engine.selection import LeftOut, iterate_in_thread
from slipstream.engine.semantics import session_metadata
from slipstream.engine.sums import envelope_sums, open_peer_envelope, parse_ranges
from slipstream.engine.totals import SessionTotals
from slipstream.errors import (
    BadPassphrase,
    ChecksumMismatch,
    ContentProtectionError,
    FileIOError,
    NetworkError,
    PathError,
    ProtocolError,
    SlipstreamError,
    UnsupportedError,
    UsageError,
)
from slipstream.spec import TransferSpec
from slipstream.transport.http_fallback import (
    CHUNK_BYTES,
    RETRIES,
    SEMANTICS_VERSION,
    FallbackClient,
    Pacer,
)

Emit = Callable[[dict[str, Any]], None]
DEFAULT_FALLBACK_PORT = 8443
MAX_COMPARE_ROUNDS = 4  # an existing file, then its partial: two are ever needed
READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class FallbackTarget:
    """Where and how to reach the server's HTTPS fallback."""

    host: str
    port: int
    authorization: str  # the Authorization header value
    fingerprint: str | None  # pinned certificate, or None for the system's CAs
    xfer_id: str | None = None


def plan_fallback(
    spec: TransferSpec, password: str | None, accept: dict[str, Any] | None
) -> FallbackTarget:
    """The fallback endpoint and credentials.

    After an SSH session (``accept`` given), the server's ACCEPT carries a ticket (a token
    bound to this very transfer) and the certificate fingerprint, both trusted as much as
    the SSH host key; otherwise the spec's token, or its user and password, are used.
    """
    offer = (accept or {}).get("fallback") or {}
    port = spec.https_fallback_port or offer.get("port") or DEFAULT_FALLBACK_PORT
    fingerprint = offer.get("fingerprint") or spec.https_fallback_fingerprint
    if offer.get("ticket"):
        authorization = f"Bearer {offer['ticket']}"
    elif spec.authentication == "token" and spec.token:
        authorization = f"Bearer {spec.token}"
    elif password is not None and spec.remote_user:
        pair = f"{spec.remote_user}:{password}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    else:
        raise UsageError("The HTTPS fallback needs a token or a password (SSH keys do not work)")
    assert spec.remote_host is not None
    xfer_id = (accept or {}).get("xfer_id")
    return FallbackTarget(spec.remote_host, int(port), authorization, fingerprint, xfer_id)


async def run_http_transfer(
    spec: TransferSpec,
    wire_spec: dict[str, Any],
    target: FallbackTarget,
    emit: Emit,
    *,
    sources: Callable[[], Iterable[SourceEntry | LeftOut]],
    destination: Callable[[], DestinationResolver],
    base_dir: Path,
    docroot: Path | None = None,
    progress_interval: float = 1.0,
) -> SessionTotals:
    """Run the whole transfer over HTTPS; returns the totals (raises on a session failure).

    ``sources`` is the UDP sender's selection (engine.job's), ``base_dir`` and ``docroot``
    place the archive folder of ``move_after_transfer``.
    """
    if target.xfer_id:
        tags = dict(wire_spec.get("tags") or {})
        tags["aspera"] = {**dict(tags.get("aspera") or {}), "xfer_id": target.xfer_id}
        wire_spec = {**wire_spec, "tags": tags}
    async with FallbackClient(
        target.host, target.port, authorization=target.authorization, fingerprint=target.fingerprint
    ) as client:
        opened = await client.open_session(wire_spec)
        try:
            check_server_semantics(opened)
            emit(_session_start(spec, target, opened))
            pacer = Pacer(client_rate_kbps(spec, opened))
            job: _HttpJob
            if spec.direction == "send":
                options = SendOptions.from_spec(
                    spec, local=True, base_dir=base_dir, docroot=docroot
                )
                job = _Uploader(client, emit, pacer, options, sources())
            else:
                manifest = list(opened.get("manifest") or [])
                receive = ReceiveOptions.from_spec(spec)
                job = _Downloader(client, emit, pacer, destination(), receive, manifest)
            loop = asyncio.get_running_loop()
            progress = loop.create_task(job.report_progress(progress_interval))
            try:
                await job.run()
            finally:
                progress.cancel()
        except SlipstreamError as exc:
            with contextlib.suppress(SlipstreamError):
                await client.call("POST", "/close", {"error": exc.to_dict()})
            raise
        job.totals.finished = time.monotonic()
        await client.call("POST", "/close", job.totals.as_dict())
        return job.totals


def check_server_semantics(opened: dict[str, Any]) -> None:
    """Refuse a server whose fallback would ignore part of the spec's file semantics."""
    version = opened.get("semantics")
    if version != SEMANTICS_VERSION:
        raise UnsupportedError(
            "The server's HTTPS fallback is too old to apply this transfer's file rules "
            "(overwrite, filters, checksums, encryption): upgrade it, or open its UDP port",
            internal_message=f"fallback semantics {version!r}, needed {SEMANTICS_VERSION}",
        )


def client_rate_kbps(spec: TransferSpec, opened: dict[str, Any]) -> int | None:
    """What this client paces at: the rate the server granted (the spec's target under the
    user's and the aggregate caps), else the spec's own."""
    granted = opened.get("rate")
    if isinstance(granted, dict):
        return RateState.from_wire(granted).effective_target_kbps
    return initial_state(spec, RateLimits()).effective_target_kbps


def _session_start(
    spec: TransferSpec, target: FallbackTarget, opened: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "session_start",
        "direction": spec.direction,
        "host": target.host,
        "user": spec.remote_user,
        "transport": "http",
        "https_fallback_port": target.port,
        "xfer_id": opened.get("xfer_id"),
        **session_metadata(spec),
    }


def prefix_record(partial: Path, source: FileIdentity) -> CheckpointRecord | None:
    """A partial without a checkpoint (small files, older versions): its length is the prefix.

    Trusted like a checkpoint of this very source, so ``resume`` still decides (the checksum
    policies compare its content first); the whole-file digest has the last word anyway. A
    partial as long as the file says nothing (the UDP path pre-sizes partials, with holes).
    """
    try:
        st = os.lstat(partial)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size < source.size:
        return None
    return CheckpointRecord(source.size, source.mtime_ns, st.st_size)


class _HttpJob:
    """What both directions share: the client, the pacer, totals and events."""

    def __init__(self, client: FallbackClient, emit: Emit, pacer: Pacer) -> None:
        self.client = client
        self.emit = emit
        self.pacer = pacer
        self.totals = SessionTotals()
        self.moved = 0  # payload bytes that crossed the network this session
        self.expected = 0

    async def run(self) -> None:
        raise NotImplementedError

    def _emit(self, event: dict[str, Any]) -> None:
        self.emit({**event, "transport": "http"})

    def _skipped(self, rel: str, size: int | None, reason: str, **extra: Any) -> None:
        self.totals.files_skipped += 1
        event: dict[str, Any] = {"type": "file_skipped", "path": rel, "reason": reason}
        if size is not None:
            event["size"] = size
        self._emit({**event, **extra})

    def _failed(self, rel: str, error: dict[str, Any]) -> None:
        self.totals.files_failed += 1
        self.totals.errors.append(error)
        self._emit({"type": "file_error", "path": rel, "error": error})

    async def _retrying(self, attempt: Callable[[], Any]) -> Any:
        """Run a byte transfer, retrying network failures with backoff."""
        failures = 0
        while True:
            try:
                return await attempt()
            except NetworkError:
                failures += 1
                if failures > RETRIES:
                    raise
                await asyncio.sleep(min(0.25 * 2**failures, 4.0))

    async def report_progress(self, interval: float) -> None:
        last_bytes, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            rate = (self.moved - last_bytes) * 8 / max(now - last_time, 1e-6)
            last_bytes, last_time = self.moved, now
            self._emit(
                {
                    "type": "progress",
                    "bytes": self.moved,
                    "rate_bps": rate,
                    "files_done": self.totals.files_done,
                    "files_skipped": self.totals.files_skipped,
                    "files_failed": self.totals.files_failed,
                    "bytes_expected": self.expected,
                    "elapsed_s": round(self.totals.elapsed, 3),
                }
            )


# --- uploads ---------------------------------------------------------------------------------


@dataclass
class _Sending:
    """One announced upload."""

    entry: SourceEntry
    stored_path: str  # the name the server sees (obfuscated, envelope extension)
    size: int  # bytes announced (the envelope's size when encrypting)
    # Envelope keys of what the server holds, by compare target ("final", "partial"): a
    # resumed envelope must continue under the header already on the server.
    headers: dict[str, tuple[EnvelopeHeader, bytes]] = field(default_factory=dict)

    def stored_field(self) -> dict[str, str]:
        return {"stored_path": self.stored_path} if self.stored_path != self.entry.rel_path else {}


class _Uploader(_HttpJob):
    """Sends the selected sources; the server decides skip, overwrite and resume."""

    def __init__(
        self,
        client: FallbackClient,
        emit: Emit,
        pacer: Pacer,
        options: SendOptions,
        items: Iterable[SourceEntry | LeftOut],
    ) -> None:
        super().__init__(client, emit, pacer)
        self.options = options
        self.items = items
        self.names = NameObfuscator() if options.obfuscate else None

    async def run(self) -> None:
        options = self.options
        prepared = (
            prepare_announcement(item, options) if isinstance(item, SourceEntry) else item
            for item in self.items
        )
        async for item in iterate_in_thread(prepared):
            if isinstance(item, LeftOut):
                self._left_out(item)
            elif isinstance(item, Announcement):
                await self._file(item)
            elif item.kind == "dir":
                await self._dir(item)
            elif item.kind == "link":
                await self._link(item)
        options.disposer.finish(self._emit)

    def _left_out(self, note: LeftOut) -> None:
        if note.excluded:
            self.totals.files_excluded += 1
            self._emit({"type": "file_excluded", "path": note.path, "reason": note.reason})
        else:
            self._skipped(note.path, None, note.reason)

    def _stored(self, rel: str, is_dir: bool) -> str:
        stored = self.names.stored(rel, is_dir) if self.names is not None else rel
        if not is_dir and self.options.keyring is not None:
            stored += self.options.extension
        return stored

    async def _dir(self, entry: SourceEntry) -> None:
        body = {"path": self._stored(entry.rel_path, True), "mode": entry.mode}
        answer = await self.client.call("POST", "/dirs", body)
        self.totals.dirs += 1
        if isinstance(answer.get("error"), dict):  # reported, as the UDP receiver does
            self.totals.errors.append(answer["error"])
            self._emit({"type": "file_error", "path": entry.rel_path, "error": answer["error"]})
        self.options.disposer.note_dir(entry)

    async def _link(self, entry: SourceEntry) -> None:
        path = self.names.stored(entry.rel_path, False) if self.names else entry.rel_path
        answer = await self.client.call(
            "POST", "/links", {"path": path, "target": entry.link_target}
        )
        status = answer.get("status")
        if status == "error":
            self._failed(entry.rel_path, answer.get("error") or {})
        elif status == "skipped":
            self._skipped(entry.rel_path, None, str(answer.get("reason", "")))
        else:
            self.totals.links += 1
            self._emit({"type": "link_done", "path": entry.rel_path, "target": entry.link_target})

    async def _file(self, item: Announcement) -> None:
        entry = item.entry
        sending = _Sending(
            entry, self._stored(entry.rel_path, False), announced_size(entry, self.options)
        )
        self.expected += sending.size
        announce: dict[str, Any] = {
            "path": sending.stored_path,
            "size": sending.size,
            "mtime_ns": entry.mtime_ns,
            "mode": entry.mode,
        }
        if item.atime_ns is not None:
            announce["atime_ns"] = item.atime_ns
        for attempt in range(2):
            answer = await self._negotiate(announce, sending)
            action = answer.get("action")
            if action == "skip":
                reason = str(answer.get("reason", ""))
                self._skipped(entry.rel_path, entry.size, reason, **sending.stored_field())
                self.options.disposer.file_done(entry, self._emit, skipped=True)
                return
            if action != "send":
                self._failed(entry.rel_path, answer.get("error") or {})
                return
            file_id, offset = int(answer["file"]), int(answer["offset"])
            try:
                digests = await self._send_bytes(sending, file_id, offset)
                body = {"digest": digests.digest, "checksum": digests.checksum}
                await self.client.call("POST", f"/files/{file_id}/commit", body)
            except ChecksumMismatch as exc:
                # A resumed partial that did not match: the server dropped it; once more
                # from zero, then give up on this file.
                if attempt == 0 and offset > 0:
                    continue
                self._failed(entry.rel_path, exc.to_dict())
                return
            except SlipstreamError as exc:
                if isinstance(exc, NetworkError):
                    raise
                self._failed(entry.rel_path, exc.to_dict())
                return
            self._done(sending, digests, offset)
            return

    def _done(self, sending: _Sending, digests: FileDigests, offset: int) -> None:
        entry = sending.entry
        self.totals.file_landed(entry.size, offset)
        event: dict[str, Any] = {
            "type": "file_done",
            "path": entry.rel_path,
            "size": entry.size,
            "digest": digests.digest,
            **sending.stored_field(),
        }
        add_checksum(event, self.options.checksum, digests.checksum)
        if offset:
            event["resumed_from"] = offset
        self._emit(event)
        self.options.disposer.file_done(entry, self._emit)

    # -- content comparisons ------------------------------------------------------------

    async def _negotiate(self, announce: dict[str, Any], sending: _Sending) -> dict[str, Any]:
        """Announce the file, answering the server's checksum requests until it decides."""
        sums: dict[str, Any] = {}
        for _ in range(MAX_COMPARE_ROUNDS):
            body = {**announce, "sums": sums} if sums else announce
            answer = await self.client.call("POST", "/files", body)
            if answer.get("action") != "compare":
                return answer
            target = str(answer.get("target"))
            sums[target] = await self._range_sums(sending, target, answer)
        raise ProtocolError("The fallback server kept asking for checksums", origin="remote")

    async def _range_sums(
        self, sending: _Sending, target: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        ranges = parse_ranges(request.get("ranges"), sending.size)
        wire = [list(r) for r in ranges]
        try:
            if self.options.keyring is not None:
                header = request.get("env_header")
                sums = await self._envelope_sums(sending, target, header, ranges)
            else:
                path = sending.entry.local_path
                sums = await asyncio.to_thread(range_sums_of_path, path, ranges)
        except (SlipstreamError, OSError, ValueError):
            # Cannot compare (unreadable, another passphrase): the server replaces.
            return {"ranges": wire, "error": True}
        return {"ranges": wire, "sums": sums}

    async def _envelope_sums(
        self, sending: _Sending, target: str, header_hex: Any, ranges: list[ByteRange]
    ) -> list[str]:
        """Checksums of the envelope we would send under the server's existing header: the
        same key makes it byte-identical, so content compares and a partial continues."""
        keyring = self.options.keyring
        assert keyring is not None
        header, key = await open_peer_envelope(
            keyring, header_hex, sending.entry, sending.stored_path, "server"
        )
        sending.headers[target] = (header, key)
        return await envelope_sums(sending.entry.local_path, header, key, ranges)

    # -- bytes --------------------------------------------------------------------------

    async def _reader(self, fd: int, sending: _Sending, offset: int) -> Reader:
        """The bytes the server stores: the file, or its envelope (sealed as it is read)."""
        keyring = self.options.keyring
        if keyring is None:
            return path_reader(fd)
        known = sending.headers.get("partial") if offset else None
        if offset and known is None:
            raise ProtocolError("The server resumed an envelope without checking its key")
        if known is None:
            known = await asyncio.to_thread(keyring.new_header, sending.entry.size)
        head, key = known
        name = sending.entry.local_path.name
        view = EnvelopeView(ChunkCipher(head, key), plain_file_reader(fd), name=name)
        if view.size != sending.size:
            raise FileIOError(f"{sending.entry.local_path} changed size while it was being sent")
        return view.read

    async def _send_bytes(self, sending: _Sending, file_id: int, offset: int) -> FileDigests:
        """Send from ``offset`` at the paced rate; returns the digests of the whole file."""
        path = sending.entry.local_path
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise as_error(exc, path, "read") from None
        try:
            read = await self._reader(fd, sending, offset)
            hashing = _Hashing(self.options.checksum)
            await hashing.prefix(read, offset)  # the server holds it; the digest covers it
            position, size = offset, sending.size
            chunk = self.pacer.chunk_size(CHUNK_BYTES)
            failures = 0
            while position < size:
                data = await asyncio.to_thread(read, position, min(chunk, size - position))
                if not data:
                    raise FileIOError(f"{path} shrank while it was being sent")
                hashing.update_at(position, data)
                await self.pacer.take(len(data))
                try:
                    position = await self.client.put_range(file_id, position, data, size)
                    self.moved += len(data)
                    failures = 0
                except NetworkError:
                    failures += 1
                    if failures > RETRIES:
                        raise
                    await asyncio.sleep(min(0.25 * 2**failures, 4.0))
                    status = await self.client.call("GET", f"/files/{file_id}/status")
                    position = int(status["received"])  # resume where the server is
        except OSError as exc:
            raise as_error(exc, path, "read") from None
        finally:
            os.close(fd)
        return hashing.result()


class _Hashing:
    """The digest (and ``file_checksum``) of a file sent in order, re-sent ranges once."""

    def __init__(self, algorithm: str | None) -> None:
        self._digest = new_digest()
        self._checksum = hashlib.new(algorithm) if algorithm else None
        self.upto = 0

    def update_at(self, position: int, data: bytes) -> None:
        if position + len(data) <= self.upto:
            return
        fresh = data[self.upto - position :]
        self._digest.update(fresh)
        if self._checksum is not None:
            self._checksum.update(fresh)
        self.upto = position + len(data)

    async def prefix(self, read: Reader, length: int) -> None:
        while self.upto < length:
            data = await asyncio.to_thread(read, self.upto, min(READ_CHUNK, length - self.upto))
            if not data:
                raise FileIOError("The source is shorter than what the server already holds")
            self.update_at(self.upto, data)

    def result(self) -> FileDigests:
        checksum = self._checksum.hexdigest() if self._checksum is not None else None
        return FileDigests(self._digest.hexdigest(), checksum)


# --- downloads -------------------------------------------------------------------------------


class _Downloader(_HttpJob):
    """Receives the server's manifest with the UDP receiver's rules (RecvDriver's)."""

    def __init__(
        self,
        client: FallbackClient,
        emit: Emit,
        pacer: Pacer,
        resolver: DestinationResolver,
        options: ReceiveOptions,
        manifest: list[dict[str, Any]],
    ) -> None:
        super().__init__(client, emit, pacer)
        self.resolver = resolver
        self.manifest = manifest
        self.options = options
        self.deferred_dirs: list[str] = []
        self.bad_passphrase = False
        self.mirror = (
            MirrorTracker(
                lambda rel: resolver.path_for(rel, kind="dir"),
                options.partial_suffix,
                lambda rel, is_dir: options.filters.excluding_rule(rel, is_dir) is not None,
                lambda rel, _path: self._emit({"type": "file_deleted", "path": rel}),
            )
            if options.mirror
            else None
        )

    async def run(self) -> None:
        files = (item for item in self.manifest if item.get("kind") == "file")
        self.expected = sum(int(item.get("size", 0)) for item in files)
        for item in self.manifest:
            kind = item.get("kind")
            if kind == "dir":
                self._dir(str(item["path"]))
            elif kind == "link":
                await self._link(item)
            elif kind == "file":
                await self._file(item)
        if not self.bad_passphrase:
            for rel in self.deferred_dirs:
                self._make_dir(rel)
        if self.mirror is not None:
            self.mirror.finish()

    # -- folders and links ----------------------------------------------------------------

    def _dir(self, rel: str) -> None:
        if self.mirror is not None:
            self.mirror.entry(rel, True)
        if self.options.keyring is not None:
            # Decrypting: a wrong passphrase leaves nothing behind, not even empty folders.
            self.deferred_dirs.append(rel)
            return
        self._make_dir(rel)

    def _make_dir(self, rel: str) -> None:
        try:
            self.resolver.path_for(rel, kind="dir").mkdir(parents=True, exist_ok=True)
            self.totals.dirs += 1
        except (SlipstreamError, OSError) as exc:
            error = as_error(exc, Path(rel), "create folder")
            self.totals.errors.append(error.to_dict())
            self._emit({"type": "file_error", "path": rel, "error": error.to_dict()})

    async def _link(self, item: dict[str, Any]) -> None:
        rel, target = str(item["path"]), str(item.get("target", ""))
        if self.mirror is not None:
            self.mirror.entry(rel, False)
        policy = self.options.symlink_policy
        try:
            link = self.resolver.link_path_for(rel)
            root = self.options.link_root or self.resolver.confinement_root()
            reason = place_link(link, target, root, policy if policy == "copy+force" else "copy")
        except (SlipstreamError, OSError) as exc:
            error = as_error(exc, Path(rel), "create link")
            self._failed(rel, error.to_dict())
            await self._report(item, {"status": "failed", "error": error.to_dict()})
            return
        if reason:
            self._skipped(rel, None, reason)
            await self._report(item, {"status": "skipped", "reason": reason})
            return
        if self.mirror is not None:
            self.mirror.created.add(link)
        self.totals.links += 1
        self._emit({"type": "link_done", "path": rel, "target": target})
        await self._report(item, {"status": "link_done"})

    # -- files ----------------------------------------------------------------------------

    async def _file(self, item: dict[str, Any]) -> None:
        incoming = self._incoming(item)
        if self.mirror is not None:
            self.mirror.entry(incoming.dest_rel, False)
        try:
            await self._receive(incoming, item)
        except (SlipstreamError, OSError) as exc:
            if isinstance(exc, NetworkError):
                raise
            error = as_error(exc, Path(incoming.dest_rel), "write")
            self._failed(incoming.dest_rel, error.to_dict())
            await self._report(item, {"status": "failed", "error": error.to_dict()})
            if isinstance(error, BadPassphrase):
                self.bad_passphrase = True
                if self.options.fail_bad_filepass:
                    raise error from None
        finally:
            if incoming.checkpoint is not None:
                incoming.checkpoint.close()

    def _incoming(self, item: dict[str, Any]) -> IncomingFile:
        rel, size = str(item["path"]), int(item["size"])
        if size < 0:
            raise ProtocolError(f"Negative size announced for {rel!r}", origin="remote")
        atime = item.get("atime_ns")
        incoming = IncomingFile(
            int(item["id"]),
            rel,
            rel,
            size,
            int(item.get("mtime_ns", 0)),
            int(atime) if atime else None,
        )
        ext = self.options.extension
        if self.options.keyring is not None and rel.endswith(ext) and len(rel) > len(ext):
            incoming.dest_rel = rel[: -len(ext)]
            try:
                incoming.env_header = bytes.fromhex(str(item.get("env_header") or ""))
            except ValueError:
                raise ProtocolError("Malformed envelope header", origin="remote") from None
        return incoming

    async def _receive(self, incoming: IncomingFile, item: dict[str, Any]) -> None:
        final = self.resolver.path_for(incoming.dest_rel, kind="file")
        incoming.final = final
        incoming.partial = final.with_name(final.name + self.options.partial_suffix)
        try:
            final_st: os.stat_result | None = os.lstat(final)
        except FileNotFoundError:
            final_st = None
        if final_st is not None and stat.S_ISDIR(final_st.st_mode):
            raise PathError(f"{incoming.dest_rel}: a folder is in the way of this file")
        if incoming.decrypt:
            await open_envelope_header(incoming, self.options.keyring)
        if final_st is not None:
            reason = await self._skip_reason(incoming, final_st)
            if reason:
                self._skipped(incoming.dest_rel, incoming.size, reason)
                await self._report(item, {"status": "skipped", "reason": reason})
                return
            if not self.options.allow_overwrite:
                raise overwrite_refused(incoming.dest_rel)
        offset = await self._resume_offset(incoming)
        if not incoming.final.parent.is_dir():
            incoming.final = self.resolver.ensure_parent(incoming.dest_rel)
            incoming.partial = incoming.final.with_name(
                incoming.final.name + self.options.partial_suffix
            )
        result = await self._fetch_and_finish(incoming, offset)
        self._finished(incoming, result)
        await self._report(item, {"status": "completed", "digest": result.digests.digest})

    async def _fetch_and_finish(self, incoming: IncomingFile, offset: int) -> FinishResult:
        for attempt in range(2):
            incoming.offset = offset
            await self._fetch(incoming, offset)
            remote = await self.client.call("GET", f"/files/{incoming.file_id}/digest")
            incoming.digest = str(remote.get("digest") or "")
            checksum = remote.get("checksum")
            incoming.checksum = str(checksum) if checksum else None
            try:
                return await asyncio.to_thread(finish_file, incoming, self.options)
            except (ChecksumMismatch, ContentProtectionError) as exc:
                discard_partial(incoming)  # its content is wrong: never resume from it
                if isinstance(exc, ChecksumMismatch) and attempt == 0 and offset > 0:
                    offset = 0  # a resumed prefix that was not what it claimed: once more
                    continue
                raise
        raise AssertionError("unreachable")

    async def _skip_reason(self, incoming: IncomingFile, final_st: os.stat_result) -> str:
        size = incoming.landed_size

        async def same(ranges: list[ByteRange]) -> bool:
            return await self._same_content(incoming, incoming.final, ranges)

        announced = FileIdentity(size, incoming.mtime_ns)
        return await skip_reason(self.options, final_st, announced, same, decrypt=incoming.decrypt)

    async def _resume_offset(self, incoming: IncomingFile) -> int:
        source = FileIdentity(incoming.size, incoming.mtime_ns)
        record = read_checkpoint(incoming.partial) or prefix_record(incoming.partial, source)

        async def same(ranges: list[ByteRange]) -> bool:
            return await self._same_content(incoming, incoming.partial, ranges)

        return await resume_offset(self.options, record, source, same)

    async def _same_content(
        self, incoming: IncomingFile, path: Path, ranges: list[ByteRange]
    ) -> bool:
        """Checksums of ``ranges`` of the server's file and of ``path``: equal?"""
        body = {"ranges": [list(r) for r in ranges]}
        answer = await self.client.call("POST", f"/files/{incoming.file_id}/sums", body)
        ours = await asyncio.to_thread(range_sums_of_path, path, ranges)
        return answer.get("sums") == ours

    async def _fetch(self, incoming: IncomingFile, offset: int) -> None:
        """Fetch from ``offset`` into the partial, keeping a checkpoint as the UDP path does
        (files of 1 MiB and more), so either transport can resume the other's partial."""
        partial, size = incoming.partial, incoming.size
        if size >= CHECKPOINT_MIN_SIZE:  # first: it also locks the partial
            incoming.checkpoint = CheckpointWriter(
                partial, FileIdentity(size, incoming.mtime_ns), offset
            )
        else:
            remove_checkpoint(partial)
        fd = open_nofollow(partial, os.O_WRONLY | os.O_CREAT, 0o644)
        position = offset
        try:
            os.ftruncate(fd, offset)  # anything past the trusted prefix goes
            if incoming.checkpoint is not None:
                # Written in order, never twice: hashed behind the writes, as over UDP.
                hash_while_arriving(incoming, self.options)

            async def write(chunk: bytes) -> None:
                nonlocal position
                if position + len(chunk) > size:
                    raise FileIOError(f"{incoming.rel_path}: the server sent more than its size")
                os.pwrite(fd, chunk, position)
                position += len(chunk)
                self.moved += len(chunk)
                if incoming.checkpoint is not None:
                    incoming.checkpoint.write(position)
                if incoming.prefix_hash is not None:
                    incoming.prefix_hash.request(position)  # hashed in a worker thread
                await self.pacer.take(len(chunk))

            chunk_size = self.pacer.chunk_size(READ_CHUNK)
            await self._retrying(
                lambda: self.client.download(incoming.file_id, position, write, chunk_size)
            )
        finally:
            os.close(fd)
            if incoming.checkpoint is not None:
                incoming.checkpoint.close()
            if incoming.prefix_hash is not None:
                incoming.prefix_hash.stop()  # the finish takes it over
        if position != size:
            raise FileIOError(
                f"{incoming.rel_path}: the server sent {position} of {size} bytes "
                "(the source changed during the transfer?)"
            )

    def _finished(self, incoming: IncomingFile, result: FinishResult) -> None:
        size = incoming.landed_size
        self.totals.file_landed(size, incoming.offset)
        if result.backup is not None and self.mirror is not None:
            self.mirror.created.add(result.backup)
        self._emit(file_done_event(incoming, result, size, self.options.checksum))

    async def _report(self, item: dict[str, Any], body: dict[str, Any]) -> None:
        """The result, for the server's records and its source disposition."""
        with contextlib.suppress(SlipstreamError):  # bookkeeping must not fail the file
            await self.client.call("POST", f"/files/{item['id']}/done", body)
