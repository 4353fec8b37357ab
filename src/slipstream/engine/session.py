"""The file side of a session: the manifest, readiness, checksums and confirmations.

``SendDriver`` and ``RecvDriver`` run on whichever host holds the files or receives them
(the client for an upload, the server for a download). Each owns the control stream for the
session's data phase and a sans-IO core driven by an ``Endpoint``. The exchange, per file
(docs/protocol.md, "Control channel", has every field):

    sender   FILE(id, path, size, mtime)        -> receiver decides: skip, place, or resume
    receiver SUMS_REQ(id, ranges)               (only to compare content: resume, overwrite)
    sender   SUMS(id, sums)
    receiver READY(id, first_block, count, off) -> both append the same block run
      or     SKIP(id, reason)
    sender   FILE_END(id, digest)               (digest of the *whole* file, even resumed)
    receiver FILE_DONE(id, digest | error)      (after verifying and renaming)

A split file (multi_session_threshold) travels as one byte range per session: FILE carries
``range: [offset, length]`` besides the whole ``size``, READY's offset lies in the range,
FILE_END's digest covers the range, and SKIP / FILE_DONE say ``whole: true`` when the answer
settles the file as a whole (the one answer that counts it); the others concern their range.

The sender streams FILE messages ahead of the data within a window, the receiver answers
most of them at once, and both sides batch their messages into few SSH writes, so many
small files cost no round trip each. Only files that already exist at the destination
(or have a checkpointed partial) wait for a SUMS round trip, and those run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from slipstream.engine.blockio import (
    FileBlockSink,
    FileBlockSource,
    FileSlot,
    os_error_to_slipstream,
)
from slipstream.engine.digests import range_sums, range_sums_of_path, total_length
from slipstream.engine.disposition import MirrorTracker
from slipstream.engine.envelope import (
    HEADER_SIZE,
    ChunkCipher,
    EnvelopeHeader,
    EnvelopeView,
    plain_file_reader,
)
from slipstream.engine.incoming import (
    PARTIAL_SUFFIX,
    FinishResult,
    IncomingFile,
    ReceiveOptions,
    discard_partial,
    finish_file,
    finish_piece,
    place_link,
    size_shared_partial,
)
from slipstream.engine.multisession import PieceEntry
from slipstream.engine.outgoing import (
    Announcement,
    EnvelopeBlockSource,
    HashWorker,
    LruDict,
    NameObfuscator,
    SendOptions,
    announced_size,
    envelope_digest_job,
    plain_digest_job,
    prepare_announcement,
)
from slipstream.engine.overwrite import skip_reason
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.engine.resume import (
    CHECKPOINT_MIN_SIZE,
    CheckpointRecord,
    CheckpointWriter,
    FileIdentity,
    checkpoint_path,
    decide_partial,
    read_checkpoint,
    remove_split_sidecars,
)
from slipstream.engine.selection import LeftOut, iterate_in_thread
from slipstream.errors import (
    BadPassphrase,
    ChecksumMismatch,
    ContentProtectionError,
    DestinationExists,
    PathError,
    PeerAborted,
    ProtocolError,
    SlipstreamError,
    TransferTimeout,
    error_from_dict,
)
from slipstream.protocol import control

__all__ = [
    "MANIFEST_WINDOW",
    "PARTIAL_SUFFIX",
    "ControlStream",
    "ReceiveOptions",
    "RecvDriver",
    "SendDriver",
    "SendOptions",
    "SessionTotals",
    "rate_change_kwargs",
]

log = logging.getLogger("slipstream.engine")

MANIFEST_WINDOW = 2048  # files announced but not yet confirmed
PROGRESS_INTERVAL = 1.0
ANNOUNCE_DRAIN_EVERY = 256  # FILE messages written between two waits for the SSH window
INLINE_HASH_LIMIT = 256 << 10  # smaller files are finished on the event loop, no thread hop
CHECKPOINT_INTERVAL = 0.05  # how often the good prefix of big files is considered
CHECKPOINT_STEP = 256 << 10  # ...and how far it must have moved to be written
CONTROL_TCP_CONGESTION = b"bbr"

Emit = Callable[[dict[str, Any]], None]


class ControlStream:
    """JSON lines over the SSH channel.

    Messages sent with :meth:`send_nowait` are gathered and written once per event-loop
    iteration: a burst of READY or FILE_DONE for thousands of small files becomes a few SSH
    packets (each one encrypted once) instead of one per message.
    """

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[bytes] = []
        self._broken: PeerAborted | None = None
        _prefer_loss_tolerant_tcp(writer)

    def send_nowait(self, msg_type: str, **fields: Any) -> None:
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(control.encode(msg_type, **fields))

    def _flush(self) -> None:
        if not self._pending or self._broken is not None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._writer.write(data)
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            self._broken = PeerAborted(internal_message=f"control channel: {exc}")

    async def drain(self) -> None:
        """Write what is gathered and wait until the channel takes more."""
        self._flush()
        if self._broken is not None:
            raise self._broken
        try:
            await self._writer.drain()
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc

    async def send(self, msg_type: str, **fields: Any) -> None:
        self.send_nowait(msg_type, **fields)
        await self.drain()

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed the channel."""
        try:
            line = await self._reader.readline()
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc
        if not line:
            return None
        return control.decode(line)

    async def send_error(self, error: SlipstreamError) -> None:
        with contextlib.suppress(Exception):
            await self.send(control.ERROR, error=error.to_dict())


def _prefer_loss_tolerant_tcp(writer: Any) -> None:
    """Ask for BBR on the control connection's TCP socket (each end sets its own sending side).

    The per-file messages of a many-files session ride this connection. With a loss-based
    congestion control (cubic, reno), 1 % loss at 100 ms RTT caps it near 1.4 Mbit/s
    (Mathis), and a few MB of announcements then take longer than the data itself. BBR keeps
    it near the path's rate, as the UDP data path is. Best effort: where the kernel lacks it,
    the system default stays.
    """
    try:
        connection = writer.get_extra_info("connection")
        sock = connection.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CONTROL_TCP_CONGESTION)
    except (AttributeError, OSError):
        pass


@dataclass
class SessionTotals:
    """What a session did, reported in events and logs."""

    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_excluded: int = 0  # left out by filter rules or time windows
    dirs: int = 0
    links: int = 0
    bytes_files: int = 0  # bytes of completed files
    bytes_resumed: int = 0  # of those, bytes a resume did not need to send again
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(self.elapsed, 1e-9)
        return {
            "files_done": self.files_done,
            "files_skipped": self.files_skipped,
            "files_failed": self.files_failed,
            "files_excluded": self.files_excluded,
            "dirs": self.dirs,
            "links": self.links,
            "bytes": self.bytes_files,
            "bytes_resumed": self.bytes_resumed,
            "elapsed_s": round(self.elapsed, 6),
            "rate_bps": self.bytes_files * 8 / elapsed,
        }


class _CoreWatch:
    """Turns core events into a failure future the drivers can wait on."""

    def __init__(self) -> None:
        self.failed: asyncio.Future[SlipstreamError] = asyncio.get_running_loop().create_future()
        self.handshake: asyncio.Event = asyncio.Event()

    def on_event(self, event: Any) -> None:
        name = type(event).__name__
        if name == "HandshakeComplete":
            self.handshake.set()
        elif name == "Timeout":
            self.fail(TransferTimeout("No data from the peer: the transfer timed out"))
        elif name == "PeerClosed" and getattr(event, "code", None):
            self.fail(PeerAborted(f"The peer closed the session (code {event.code})"))
        elif name == "PathMtuFailed":
            from slipstream.errors import PathMtuError

            self.fail(PathMtuError(internal_message=f"{event.dgram_size}-byte datagrams lost"))

    def fail(self, error: SlipstreamError) -> None:
        if not self.failed.done():
            self.failed.set_result(error)


async def _until_done_or_failed(work: Coroutine[Any, Any, None], watch: _CoreWatch) -> None:
    task = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[Any]] = {task, watch.failed}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise watch.failed.result()


def _as_error(exc: BaseException, path: Path, action: str) -> SlipstreamError:
    if isinstance(exc, SlipstreamError):
        return exc
    if isinstance(exc, OSError):
        error = os_error_to_slipstream(exc, path, action)
        if isinstance(error, SlipstreamError):
            return error
    return SlipstreamError(f"{action} {path.name}: {exc}")


class _Driver:
    """What both drivers share: the core they feed, the endpoint step that sends, and the
    tasks they start (cancelled when the session ends)."""

    _core: Any
    _step: Callable[[], None]
    _watch: _CoreWatch
    _tasks: set[asyncio.Task[None]]

    def attach(self, core: Any, step: Callable[[], None], watch: _CoreWatch) -> None:
        self._core = core
        self._step = step
        self._watch = watch

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _parse_ranges(raw: Any, size: int) -> list[tuple[int, int]]:
    """Byte ranges from a peer: a short list of in-bounds (offset, length) pairs."""
    if not isinstance(raw, list) or len(raw) > 64:
        raise ProtocolError("Malformed checksum request", origin="remote")
    ranges: list[tuple[int, int]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
            raise ProtocolError("Malformed checksum range", origin="remote")
        offset, length = item
        if offset < 0 or length < 0 or offset + length > size:
            raise ProtocolError("Checksum range outside the file", origin="remote")
        ranges.append((offset, length))
    return ranges


def _listing_error(exc: Exception) -> SlipstreamError:
    """A failure while listing the sources that is not one of ours: still a typed error."""
    log.exception("listing the sources failed")
    return SlipstreamError(f"Could not list the sources: {exc}", internal_message=repr(exc))


# --- sending ----------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    entry: SourceEntry
    stored_path: str  # the name the receiver sees (obfuscated, envelope extension)
    size: int  # bytes announced (the envelope's size when encrypting)
    offset: int = 0
    start: int = 0  # what travels: [start, end) (a split file's range, else the whole file)
    end: int = 0
    digest: str = ""  # as sent in FILE_END (FILE_DONE confirms the receiver's matched it)
    checksum: str | None = None


class SendDriver(_Driver):
    """Sends the files of ``entries`` to the peer's receiver.

    ``entries`` are SourceEntry items, optionally interleaved with LeftOut notes (from
    engine.selection) that are reported instead of sent.
    """

    def __init__(
        self,
        ctl: ControlStream,
        entries: Iterable[SourceEntry | LeftOut],
        emit: Emit,
        block_payload: int,
        options: SendOptions | None = None,
    ) -> None:
        self._ctl = ctl
        self._entries = entries
        self._emit = emit
        self._payload = block_payload
        self._options = options or SendOptions()
        self.source: Any
        if self._options.keyring is not None:
            self.source = EnvelopeBlockSource(block_payload, self._on_hashed, self._options.keyring)
            self.source.checksum = self._options.checksum
        else:
            self.source = FileBlockSource(block_payload, self._on_hashed)
        self.totals = SessionTotals()
        self._announced: dict[int, _Outgoing] = {}
        self._links: dict[int, SourceEntry] = {}
        self._unanswered = 0  # FILE messages without READY/SKIP yet
        self._window = asyncio.Semaphore(MANIFEST_WINDOW)
        self._eof_sent = False
        self._files_announced = 0
        self.bytes_announced = 0
        self.rate_handler: Callable[[dict[str, Any]], None] | None = None
        self._worker = HashWorker()
        self._digested_by_worker: set[int] = set()
        self._peer_headers = LruDict(MANIFEST_WINDOW)  # envelope headers from SUMS_REQ
        self._names = NameObfuscator() if self._options.obfuscate else None
        self._tasks = set()

    def _on_hashed(self, file_id: int, digest: str, checksum: str | None = None) -> None:
        # Called from inside the core's send path: no awaiting here.
        if file_id in self._digested_by_worker:
            return  # resumed or checksummed: the hashing worker sends FILE_END
        self._send_file_end(file_id, digest, checksum)

    def _send_file_end(self, file_id: int, digest: str, checksum: str | None) -> None:
        out = self._announced.get(file_id)
        if out is None:
            return
        out.digest, out.checksum = digest, checksum
        fields: dict[str, Any] = {"id": file_id, "digest": digest}
        if checksum is not None:
            fields["checksum"] = checksum
        self._ctl.send_nowait(control.FILE_END, **fields)

    async def run(self) -> SessionTotals:
        announcer = asyncio.ensure_future(self._announce())
        try:
            await _until_done_or_failed(self._read_control(), self._watch)
            if announcer.done() and not announcer.cancelled() and announcer.exception():
                raise announcer.exception()  # type: ignore[misc]
        finally:
            announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await announcer
            self._cancel_tasks()
            self._worker.close()
            self.source.close()
        self._options.disposer.finish(self._emit)
        self.totals.finished = time.monotonic()
        return self.totals

    # -- announcing ------------------------------------------------------------------------

    async def _announce(self) -> None:
        file_id = link_id = written = 0
        options = self._options
        prepared = (
            prepare_announcement(item, options) if isinstance(item, SourceEntry) else item
            for item in self._entries
        )
        try:
            async for item in iterate_in_thread(prepared):
                if isinstance(item, LeftOut):
                    self._left_out(item)
                elif isinstance(item, Announcement):
                    await self._announce_file(file_id, item)
                    file_id += 1
                elif item.kind == "dir":
                    self._announce_dir(item)
                elif item.kind == "link":
                    self._announce_link(link_id, item)
                    link_id += 1
                written += 1
                if written % ANNOUNCE_DRAIN_EVERY == 0:
                    await self._ctl.drain()
        except Exception as exc:
            error = exc if isinstance(exc, SlipstreamError) else _listing_error(exc)
            await self._ctl.send_error(error)
            self._watch.fail(error)
            return
        self._files_announced = file_id
        self._eof_sent = True
        await self._ctl.send(control.EOF, files=file_id)
        self._maybe_close_stream()

    def _stored_path(self, rel: str, is_dir: bool) -> str:
        stored = self._names.stored(rel, is_dir) if self._names is not None else rel
        if not is_dir and self._options.keyring is not None:
            stored += self._options.extension
        return stored

    def _announce_dir(self, entry: SourceEntry) -> None:
        stored = self._stored_path(entry.rel_path, True)
        self._ctl.send_nowait(control.DIR, path=stored, mode=entry.mode)
        self.totals.dirs += 1
        self._options.disposer.note_dir(entry)

    def _announce_link(self, link_id: int, entry: SourceEntry) -> None:
        self._links[link_id] = entry
        path = self._names.stored(entry.rel_path, False) if self._names else entry.rel_path
        self._ctl.send_nowait(control.LINK, id=link_id, path=path, target=entry.link_target)

    async def _announce_file(self, file_id: int, item: Announcement) -> None:
        await self._window.acquire()
        entry = item.entry
        out = _Outgoing(entry, self._stored_path(entry.rel_path, False), 0)
        out.size = out.end = announced_size(entry, self._options)
        fields: dict[str, Any] = {
            "id": file_id,
            "path": out.stored_path,
            "size": out.size,
            "mtime_ns": entry.mtime_ns,
            "mode": entry.mode,
        }
        if isinstance(entry, PieceEntry):
            out.start, out.end = entry.offset, entry.offset + entry.length
            fields[control.RANGE_FIELD] = [entry.offset, entry.length]
        self._announced[file_id] = out
        self._unanswered += 1
        self.bytes_announced += out.end - out.start
        if item.atime_ns is not None:
            fields["atime_ns"] = item.atime_ns
        if item.env_header is not None:
            fields["env_header"] = item.env_header.hex()
        self._ctl.send_nowait(control.FILE, **fields)

    def _left_out(self, note: LeftOut) -> None:
        if note.excluded:
            self.totals.files_excluded += 1
            self._emit({"type": "file_excluded", "path": note.path, "reason": note.reason})
        else:
            self.totals.files_skipped += 1
            self._emit({"type": "file_skipped", "path": note.path, "reason": note.reason})

    def _maybe_close_stream(self) -> None:
        if self._eof_sent and self._unanswered == 0:
            self._core.close_stream()
            self._step()

    # -- answers from the receiver ---------------------------------------------------------

    async def _read_control(self) -> None:
        while True:
            msg = await self._ctl.recv()
            if msg is None:
                raise PeerAborted("The peer closed the control channel before the end")
            kind = msg["t"]
            if kind == control.DONE:
                return
            if kind == control.ERROR:
                raise error_from_dict(msg["error"])
            handler = _SENDER_HANDLERS.get(kind)
            if handler is None:
                raise PeerAborted(f"Unexpected control message {kind!r} from the receiver")
            handler(self, msg)

    def _outgoing(self, msg: dict[str, Any]) -> _Outgoing:
        out = self._announced.get(int(msg["id"]))
        if out is None:
            raise ProtocolError(f"The receiver named unknown file {msg['id']!r}", origin="remote")
        return out

    def _on_ready(self, msg: dict[str, Any]) -> None:
        file_id = int(msg["id"])
        out = self._outgoing(msg)
        offset, count = int(msg["offset"]), int(msg["count"])
        if not out.start <= offset <= out.end or count != -(-(out.end - offset) // self._payload):
            raise ProtocolError("READY does not fit the announced file", origin="remote")
        slot = FileSlot(file_id, int(msg["first_block"]), count, offset, out.end)
        out.offset = offset
        self.bytes_announced -= offset - out.start
        header = self._peer_headers.pop(file_id, None) if offset else None
        if offset > out.start or (self._options.checksum and self._options.keyring is None):
            # The whole file must still be digested (and checksummed): the worker does it.
            self._digested_by_worker.add(file_id)
        self._register(slot, out, header)
        if file_id in self._digested_by_worker:
            self._digest_in_worker(file_id, out, header)
        first = self._core.add_blocks(slot.count)
        if first != slot.first_block:
            raise PeerAborted(
                "Block numbering diverged between sender and receiver",
                internal_message=f"file {slot.file_id}: ours {first}, theirs {slot.first_block}",
            )
        self._unanswered -= 1
        self._maybe_close_stream()
        self._step()

    def _register(self, slot: FileSlot, out: _Outgoing, header: Any) -> None:
        if self._options.keyring is None:
            self.source.register(slot, out.entry.local_path, hash_from=out.start)
            return
        if out.start or out.end != out.size:
            raise ProtocolError("An envelope cannot be sent as a range", origin="local")
        if slot.offset and header is None:
            raise ProtocolError("Resumed an envelope without checking its key", origin="remote")
        self.source.register(slot, out.entry.local_path, out.entry.size, header)

    def _digest_in_worker(self, file_id: int, out: _Outgoing, header: Any) -> None:
        path, algorithm = out.entry.local_path, self._options.checksum
        if self._options.keyring is not None:
            head, key = header
            job = envelope_digest_job(path, head, key, algorithm)
        else:
            span = (out.start, out.end) if isinstance(out.entry, PieceEntry) else None
            job = plain_digest_job(path, algorithm, span)

        def done(digests: Any, error: SlipstreamError | None) -> None:
            if file_id not in self._announced:
                return
            if error is not None:
                self._ctl.send_nowait(
                    control.FILE_END, id=file_id, digest="", error=error.to_dict()
                )
                return
            self._send_file_end(file_id, digests.digest, digests.checksum)

        self._worker.submit(job, done)

    def _on_skip(self, msg: dict[str, Any]) -> None:
        out = self._outgoing(msg)
        self._announced.pop(int(msg["id"]))
        self._unanswered -= 1
        self._window.release()
        # A range of a split file is reported (and counted) by the range that took the
        # file's verdict, whose SKIP says ``whole``.
        if not isinstance(out.entry, PieceEntry) or msg.get(control.WHOLE_FIELD):
            self._report_skip(out, str(msg["reason"]))
        self._maybe_close_stream()

    def _report_skip(self, out: _Outgoing, reason: str) -> None:
        self.totals.files_skipped += 1
        self._emit(
            {
                "type": "file_skipped",
                "path": out.entry.rel_path,
                "size": out.entry.size,
                "reason": reason,
                **self._stored_field(out),
            }
        )
        self._options.disposer.file_done(out.entry, self._emit, skipped=True)

    def _stored_field(self, out: _Outgoing) -> dict[str, str]:
        return {"stored_path": out.stored_path} if out.stored_path != out.entry.rel_path else {}

    def _on_rate(self, msg: dict[str, Any]) -> None:
        # The receiver asked for a live rate change (the agent's modifyTransfer, or a
        # server's aggregate share). The owner's handler checks limits (engine/livecontrol).
        if self.rate_handler is not None:
            self.rate_handler(msg)
            return
        self._core.set_rate(**rate_change_kwargs(msg))

    def _on_file_done(self, msg: dict[str, Any]) -> None:
        file_id = int(msg["id"])
        out = self._outgoing(msg)
        self._announced.pop(file_id)
        self._digested_by_worker.discard(file_id)
        self.source.release(file_id)
        self._window.release()
        if isinstance(out.entry, PieceEntry):
            self._piece_done(out, msg)
            return
        if "error" in msg:
            self.totals.files_failed += 1
            self.totals.errors.append(msg["error"])
            self._emit({"type": "file_error", "path": out.entry.rel_path, "error": msg["error"]})
            return
        self.totals.files_done += 1
        self.totals.bytes_files += out.entry.size
        self.totals.bytes_resumed += out.offset
        event: dict[str, Any] = {
            "type": "file_done",
            "path": out.entry.rel_path,
            "size": out.entry.size,
            "digest": out.digest,
            **self._stored_field(out),
        }
        _add_checksum(event, self._options.checksum, out.checksum)
        if out.offset:
            event["resumed_from"] = out.offset
        self._emit(event)
        self._options.disposer.file_done(out.entry, self._emit)

    def _piece_done(self, out: _Outgoing, msg: dict[str, Any]) -> None:
        """A split file's range is confirmed (or failed); ``whole``: the file as a whole."""
        path, whole = out.entry.rel_path, bool(msg.get(control.WHOLE_FIELD))
        if "error" in msg:
            self.totals.errors.append(msg["error"])
            if whole:
                self.totals.files_failed += 1
            self._emit(
                {"type": "file_error" if whole else "range_error", "path": path, **_span(out)}
                | {"error": msg["error"]}
            )
            return
        self.totals.bytes_files += out.end - out.start
        self.totals.bytes_resumed += out.offset - out.start
        self._emit(_range_event(path, out.size, out.start, out.end, out.digest, out.offset))
        if whole:
            self.totals.files_done += 1
            self._emit({"type": "file_done", "path": path, "size": out.size, "split": True})
            self._options.disposer.file_done(out.entry, self._emit)

    def _on_link_done(self, msg: dict[str, Any]) -> None:
        entry = self._links.pop(int(msg["id"]), None)
        if entry is None:
            return
        if "error" in msg:
            self.totals.files_failed += 1
            self.totals.errors.append(msg["error"])
            self._emit({"type": "file_error", "path": entry.rel_path, "error": msg["error"]})
        elif msg.get("skipped"):
            self.totals.files_skipped += 1
            self._emit({"type": "file_skipped", "path": entry.rel_path, "reason": msg["skipped"]})
        else:
            self.totals.links += 1
            self._emit({"type": "link_done", "path": entry.rel_path, "target": entry.link_target})

    def _on_sums_req(self, msg: dict[str, Any]) -> None:
        out = self._outgoing(msg)
        ranges = _parse_ranges(msg["ranges"], out.size)
        self._spawn(self._answer_sums(int(msg["id"]), out, ranges, msg.get("env_header")))

    async def _answer_sums(
        self, file_id: int, out: _Outgoing, ranges: list[tuple[int, int]], header_hex: Any
    ) -> None:
        try:
            if self._options.keyring is not None:
                sums = await self._envelope_sums(file_id, out, ranges, header_hex)
            elif total_length(ranges) <= INLINE_HASH_LIMIT:
                sums = range_sums_of_path(out.entry.local_path, ranges)
            else:
                sums = await asyncio.to_thread(range_sums_of_path, out.entry.local_path, ranges)
        except (SlipstreamError, OSError, ValueError) as exc:
            error = _as_error(exc, out.entry.local_path, "read")
            self._ctl.send_nowait(control.SUMS, id=file_id, error=error.to_dict())
            return
        self._ctl.send_nowait(control.SUMS, id=file_id, sums=sums)

    async def _envelope_sums(
        self, file_id: int, out: _Outgoing, ranges: list[tuple[int, int]], header_hex: Any
    ) -> list[str]:
        """Checksums of the envelope we would send, under the receiver's existing header.

        Re-using the header (the passphrase opens its key) makes our envelope byte-identical
        to the one already there, so content can be compared and a partial continued.
        """
        keyring = self._options.keyring
        assert keyring is not None
        if not isinstance(header_hex, str):
            raise ContentProtectionError("The receiver sent no envelope header to compare with")
        header = EnvelopeHeader.decode(bytes.fromhex(header_hex), out.stored_path)
        if header.plain_size != out.entry.size:
            raise ContentProtectionError("The stored envelope is of another file version")
        key = await asyncio.to_thread(keyring.open_header, header, out.stored_path)
        self._peer_headers.put(file_id, (header, key))

        def compute() -> list[str]:
            fd = os.open(out.entry.local_path, os.O_RDONLY)
            try:
                view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd))
                return range_sums(view.read, ranges)
            finally:
                os.close(fd)

        return await asyncio.to_thread(compute)


def _span(out: _Outgoing) -> dict[str, int]:
    return {"offset": out.start, "length": out.end - out.start}


def _range_event(
    path: str, size: int, start: int, end: int, digest: str | None, resumed: int
) -> dict[str, Any]:
    """One range of a split file verified (each session reports its own)."""
    event: dict[str, Any] = {"type": "range_done", "path": path, "size": size}
    event |= {"offset": start, "length": end - start, "digest": digest}
    if resumed > start:
        event["resumed_from"] = resumed
    return event


def _add_checksum(event: dict[str, Any], algorithm: str | None, value: Any) -> None:
    if algorithm and value:
        event["file_checksum"] = value
        event["file_checksum_type"] = algorithm


def rate_change_kwargs(change: dict[str, Any]) -> dict[str, Any]:
    """``SenderSession.set_rate`` arguments from a RATE message (spec names, kbit/s)."""
    kwargs: dict[str, Any] = {}
    if change.get("target_rate_kbps") is not None:
        kwargs["target_bps"] = float(change["target_rate_kbps"]) * 1000.0
    if change.get("min_rate_kbps") is not None:
        kwargs["min_bps"] = float(change["min_rate_kbps"]) * 1000.0
    if change.get("rate_policy") is not None:
        kwargs["policy"] = str(change["rate_policy"])
    return kwargs


_SENDER_HANDLERS: dict[str, Callable[[SendDriver, dict[str, Any]], None]] = {
    control.RATE: SendDriver._on_rate,
    control.READY: SendDriver._on_ready,
    control.SKIP: SendDriver._on_skip,
    control.FILE_DONE: SendDriver._on_file_done,
    control.LINK_DONE: SendDriver._on_link_done,
    control.SUMS_REQ: SendDriver._on_sums_req,
}


# --- receiving -------------------------------------------------------------------------------


@dataclass
class _OnDisk:
    """What the destination already holds for an announced file."""

    final: os.stat_result | None
    partial: bool
    record: CheckpointRecord | None


class RecvDriver(_Driver):
    """Receives files from the peer's sender into places chosen by ``resolver``."""

    def __init__(
        self,
        ctl: ControlStream,
        resolver: DestinationResolver,
        emit: Emit,
        block_payload: int,
        options: ReceiveOptions,
    ) -> None:
        self._ctl = ctl
        self._resolver = resolver
        self._emit = emit
        self._payload = block_payload
        self._options = options
        self.sink = FileBlockSink(block_payload, self._on_blocks_complete)
        self.totals = SessionTotals()
        self._files: dict[int, IncomingFile] = {}
        self._next_block = 0
        self.bytes_announced = 0  # bytes of the files placed so far (progress percentage)
        self._expected: int | None = None
        self._answered = 0  # files skipped, failed or done
        self._deciding = 0  # files waiting for a checksum comparison before READY/SKIP
        self._eof_seen = False
        self._stream_closed = False
        self._all_done = asyncio.Event()
        self._sums_waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._checkpointed: dict[int, IncomingFile] = {}  # files in flight with a sidecar
        self._deferred_dirs: list[str] = []
        self._bad_passphrase = False
        self._tasks = set()
        # The sending server's answer to a live rate change (engine/livecontrol.py).
        self.rate_handler: Callable[[dict[str, Any]], None] | None = None
        self._mirror = (
            MirrorTracker(
                lambda rel: resolver.path_for(rel, kind="dir"),
                options.partial_suffix,
                lambda rel, is_dir: options.filters.excluding_rule(rel, is_dir) is not None,
                self._on_mirror_delete,
            )
            if options.mirror
            else None
        )

    async def run(self) -> SessionTotals:
        checkpointer = asyncio.ensure_future(self._checkpoint_loop())
        try:
            await _until_done_or_failed(self._receive(), self._watch)
        finally:
            checkpointer.cancel()
            self._cancel_tasks()
            # However the session ends, record exactly what arrived: a rerun resumes there.
            self._flush_checkpoints(final=True)
            self.sink.close()
        self.totals.finished = time.monotonic()
        return self.totals

    async def _receive(self) -> None:
        reader = asyncio.ensure_future(self._read_control())
        waiter = asyncio.ensure_future(self._all_done.wait())
        try:
            done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises if the sender failed or vanished
        finally:
            reader.cancel()
            waiter.cancel()
        if not self._bad_passphrase:
            for rel in self._deferred_dirs:
                self._make_dir(rel)
        await self._ctl.send(control.DONE, **self.totals.as_dict())

    async def _read_control(self) -> None:
        while True:
            msg = await self._ctl.recv()
            if msg is None:
                raise PeerAborted("The sender closed the control channel before the end")
            kind = msg["t"]
            if kind == control.ERROR:
                raise error_from_dict(msg["error"])
            handler = _RECEIVER_HANDLERS.get(kind)
            if handler is None:
                raise PeerAborted(f"Unexpected control message {kind!r} from the sender")
            await handler(self, msg)

    # -- folders and links -----------------------------------------------------------------

    async def _on_dir(self, msg: dict[str, Any]) -> None:
        rel = str(msg["path"])
        if self._mirror is not None:
            self._mirror.entry(rel, True)
        if self._options.keyring is not None:
            # Decrypting: folders appear with their files (or at the end), so a wrong
            # passphrase leaves nothing behind, not even empty folders.
            self._deferred_dirs.append(rel)
            return
        self._make_dir(rel)

    def _make_dir(self, rel: str) -> None:
        try:
            path = self._resolver.path_for(rel, kind="dir")
            path.mkdir(parents=True, exist_ok=True)
            self.totals.dirs += 1
        except SlipstreamError as exc:
            self.totals.errors.append(exc.to_dict())
            self._emit({"type": "file_error", "path": rel, "error": exc.to_dict()})
        except OSError as exc:
            error = _as_error(exc, Path(rel), "create folder")
            self._emit({"type": "file_error", "path": rel, "error": error.to_dict()})

    async def _on_link(self, msg: dict[str, Any]) -> None:
        link_id, rel, target = int(msg["id"]), str(msg["path"]), str(msg["target"])
        if self._mirror is not None:
            self._mirror.entry(rel, False)
        policy = self._options.symlink_policy
        try:
            link = self._resolver.link_path_for(rel)
            root = self._options.link_root or self._resolver.confinement_root()
            reason = place_link(link, target, root, policy if policy == "copy+force" else "copy")
        except (SlipstreamError, OSError) as exc:
            error = _as_error(exc, Path(rel), "create link")
            self.totals.files_failed += 1
            self.totals.errors.append(error.to_dict())
            self._emit({"type": "file_error", "path": rel, "error": error.to_dict()})
            self._ctl.send_nowait(control.LINK_DONE, id=link_id, error=error.to_dict())
            return
        if reason:
            self.totals.files_skipped += 1
            self._emit({"type": "file_skipped", "path": rel, "reason": reason})
            self._ctl.send_nowait(control.LINK_DONE, id=link_id, skipped=reason)
            return
        if self._mirror is not None:
            self._mirror.created.add(link)
        self.totals.links += 1
        self._emit({"type": "link_done", "path": rel, "target": target})
        self._ctl.send_nowait(control.LINK_DONE, id=link_id)

    def _on_mirror_delete(self, rel: str, path: Path) -> None:
        self._emit({"type": "file_deleted", "path": rel})

    # -- deciding what to do with an announced file ----------------------------------------

    async def _on_file(self, msg: dict[str, Any]) -> None:
        incoming = self._incoming(msg)
        if self._mirror is not None:
            self._mirror.entry(incoming.dest_rel, False)
        try:
            on_disk = self._inspect(incoming)
        except (SlipstreamError, OSError) as exc:
            self._file_failed(incoming, _as_error(exc, Path(incoming.dest_rel), "write"))
            return
        if incoming.piece is not None:
            self._deciding += 1
            self._spawn(self._decide_piece(incoming, on_disk))
            return
        if on_disk.final is None and on_disk.record is None and not incoming.decrypt:
            # The common case (a new file): answered at once, no round trip.
            self._start_or_fail(incoming, 0, truncate=on_disk.partial)
            return
        self._deciding += 1
        self._spawn(self._decide(incoming, on_disk))

    def _incoming(self, msg: dict[str, Any]) -> IncomingFile:
        file_id, rel, size = int(msg["id"]), str(msg["path"]), int(msg["size"])
        if size < 0:
            raise ProtocolError(f"Negative size announced for {rel!r}", origin="remote")
        atime = msg.get("atime_ns")
        incoming = IncomingFile(
            file_id, rel, rel, size, int(msg.get("mtime_ns", 0)), int(atime) if atime else None
        )
        ext = self._options.extension
        if self._options.keyring is not None and rel.endswith(ext) and len(rel) > len(ext):
            incoming.dest_rel = rel[: -len(ext)]
            try:
                incoming.env_header = bytes.fromhex(str(msg.get("env_header") or ""))
            except ValueError:
                raise ProtocolError("Malformed envelope header", origin="remote") from None
        if msg.get(control.RANGE_FIELD) is not None:
            incoming.piece = self._parse_piece(msg[control.RANGE_FIELD], size)
        return incoming

    def _parse_piece(self, raw: Any, size: int) -> tuple[int, int]:
        """A split file's range from the peer: in bounds, not empty, not an envelope."""
        if self._options.keyring is not None or self._options.encrypted_upload:
            raise ProtocolError("An envelope cannot be received as a range", origin="remote")
        if not (isinstance(raw, list) and len(raw) == 2 and all(type(v) is int for v in raw)):
            raise ProtocolError("Malformed file range", origin="remote")
        offset, length = raw
        if offset < 0 or length <= 0 or offset + length > size:
            raise ProtocolError("File range outside the file", origin="remote")
        return offset, length

    def _inspect(self, incoming: IncomingFile) -> _OnDisk:
        final = self._resolver.path_for(incoming.dest_rel, kind="file")
        incoming.final = final
        incoming.partial = final.with_name(final.name + self._options.partial_suffix)
        try:
            final_st: os.stat_result | None = os.lstat(final)
        except FileNotFoundError:
            final_st = None
        if final_st is not None and final_st.st_mode & 0o170000 == 0o040000:
            raise PathError(f"{incoming.dest_rel}: a folder is in the way of this file")
        partial = os.path.lexists(incoming.partial)
        at = incoming.start if incoming.piece is not None else None
        record = read_checkpoint(incoming.partial, at) if partial else None
        return _OnDisk(final_st, partial, record)

    async def _decide(self, incoming: IncomingFile, on_disk: _OnDisk) -> None:
        try:
            if incoming.decrypt:
                await self._open_envelope_header(incoming)
            if on_disk.final is not None:
                reason = await self._existing_verdict(incoming, on_disk.final)
                if reason:
                    self._skip(incoming, reason)
                    return
                if not self._options.allow_overwrite:
                    raise DestinationExists(
                        f"{incoming.dest_rel}: exists, and this server does not allow overwriting"
                    )
            offset = await self._resume_offset(incoming, on_disk.record)
            self._start(incoming, offset, truncate=on_disk.partial and offset == 0)
        except (SlipstreamError, OSError) as exc:
            error = _as_error(exc, Path(incoming.dest_rel), "write")
            if isinstance(error, BadPassphrase):
                self._bad_passphrase = True
                if self._options.fail_bad_filepass:
                    self._watch.fail(error)
            self._file_failed(incoming, error)
        finally:
            self._deciding -= 1
            self._maybe_close_stream()

    async def _decide_piece(self, incoming: IncomingFile, on_disk: _OnDisk) -> None:
        """A range of a split file. The file's fate is the verdict the first of its ranges
        stamped in the range record (docs/protocol.md, "Split files"); this range follows it,
        whatever it found itself, so no range skips what another one is replacing."""
        try:
            proposal = ""  # transfer
            if on_disk.final is not None:
                proposal = await self._existing_verdict(incoming, on_disk.final)
                if not proposal and not self._options.allow_overwrite:
                    raise DestinationExists(
                        f"{incoming.dest_rel}: exists, and this server does not allow overwriting"
                    )
            self._ensure_parent(incoming)
            record = incoming.range_record(self._options.job)
            verdict, ours = record.stamp(proposal)
            if verdict:
                self._skip_piece(incoming, verdict, whole=ours)
                return
            offset = await self._resume_offset(incoming, on_disk.record)
            self._start(incoming, offset, truncate=False)
        except (SlipstreamError, OSError) as exc:
            self._file_failed(incoming, _as_error(exc, Path(incoming.dest_rel), "write"))
        finally:
            self._deciding -= 1
            self._maybe_close_stream()

    def _skip_piece(self, incoming: IncomingFile, reason: str, *, whole: bool) -> None:
        """Skip a range by the file's verdict; only the range that took it reports it."""
        if whole:
            self._skip(incoming, reason, whole=True)
        else:
            self._answered += 1
            self._ctl.send_nowait(control.SKIP, id=incoming.file_id, reason=reason)
            self._check_all_done()
        record = incoming.range_record(self._options.job)
        with contextlib.suppress(OSError):  # answered already; at worst the record stays
            if record.settle(incoming.start, incoming.end - incoming.start, "").last:
                record.path.unlink(missing_ok=True)  # every range skipped: nothing to meet

    async def _open_envelope_header(self, incoming: IncomingFile) -> None:
        """A file to decrypt: check the passphrase now, before any byte of it travels."""
        keyring = self._options.keyring
        assert keyring is not None and incoming.env_header is not None
        header = EnvelopeHeader.decode(incoming.env_header, incoming.rel_path)
        if header.envelope_size != incoming.size:
            raise ContentProtectionError(f"{incoming.rel_path}: size does not match its header")
        await asyncio.to_thread(keyring.open_header, header, incoming.rel_path)
        incoming.plain_size = header.plain_size

    async def _existing_verdict(self, incoming: IncomingFile, final_st: os.stat_result) -> str:
        """Why to skip the announced file ("" = replace what is there)."""
        size = incoming.size
        if incoming.decrypt and incoming.plain_size is not None:
            size = incoming.plain_size

        async def same(ranges: list[tuple[int, int]]) -> bool:
            return await self._same_content(incoming, incoming.final, ranges)

        # The one rule the HTTPS fallback applies too (engine/overwrite.py).
        announced = FileIdentity(size, incoming.mtime_ns)
        return await skip_reason(self._options, final_st, announced, same, decrypt=incoming.decrypt)

    async def _resume_offset(self, incoming: IncomingFile, record: CheckpointRecord | None) -> int:
        src = FileIdentity(incoming.size, incoming.mtime_ns)
        start = incoming.start
        decision = decide_partial(self._options.resume, record, src, start, incoming.end)
        if decision.offset == start:
            return start
        if self._options.encrypted_upload and decision.offset < HEADER_SIZE:
            return 0  # the sender must see the envelope's header to continue it
        if decision.ranges or self._options.encrypted_upload:
            same = await self._same_content(incoming, incoming.partial, list(decision.ranges))
            return decision.offset if same else start
        return decision.offset

    async def _same_content(
        self, incoming: IncomingFile, path: Path, ranges: list[tuple[int, int]]
    ) -> bool:
        """Ask the sender for checksums of ``ranges`` and compare them with ``path``'s.

        For an encrypted upload the request carries the stored envelope's header, so the
        sender produces the same envelope (and can continue it) if its passphrase opens it.
        """
        fields: dict[str, Any] = {"id": incoming.file_id, "ranges": [list(r) for r in ranges]}
        if self._options.encrypted_upload:
            with open(path, "rb") as handle:
                header = handle.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                return False
            fields["env_header"] = header.hex()
        reply = asyncio.get_running_loop().create_future()
        self._sums_waiting[incoming.file_id] = reply
        self._ctl.send_nowait(control.SUMS_REQ, **fields)
        if total_length(ranges) <= INLINE_HASH_LIMIT:
            ours = range_sums_of_path(path, ranges)
        else:
            ours = await asyncio.to_thread(range_sums_of_path, path, ranges)
        answer = await reply
        return "error" not in answer and answer.get("sums") == ours

    async def _on_sums(self, msg: dict[str, Any]) -> None:
        waiter = self._sums_waiting.pop(int(msg["id"]), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    def _skip(self, incoming: IncomingFile, reason: str, *, whole: bool = False) -> None:
        self._answered += 1
        self.totals.files_skipped += 1
        self._emit(
            {
                "type": "file_skipped",
                "path": incoming.dest_rel,
                "size": incoming.size,
                "reason": reason,
            }
        )
        extra = {control.WHOLE_FIELD: True} if whole else {}
        self._ctl.send_nowait(control.SKIP, id=incoming.file_id, reason=reason, **extra)
        self._check_all_done()

    # -- placing and receiving -------------------------------------------------------------

    def _start_or_fail(self, incoming: IncomingFile, offset: int, *, truncate: bool) -> None:
        try:
            self._start(incoming, offset, truncate=truncate)
        except (SlipstreamError, OSError) as exc:
            self._file_failed(incoming, _as_error(exc, Path(incoming.dest_rel), "write"))

    def _start(self, incoming: IncomingFile, offset: int, *, truncate: bool) -> None:
        """Place the partial file, fix the file's block run and answer READY.

        Everything that can fail happens before the block run is taken: a run assigned to
        a file that never gets its READY would shift every later file's blocks.

        A range of a split file shares the partial with the file's other ranges (in other
        sessions, maybe other processes): it never truncates it, only sizes it to the whole
        file, and keeps its own checkpoint (``NAME.partial.slipstream-ckpt.OFFSET``).
        """
        self._ensure_parent(incoming)
        piece_at = incoming.start if incoming.piece is not None else None
        if incoming.end - incoming.start >= CHECKPOINT_MIN_SIZE:  # first: it also locks
            source = FileIdentity(incoming.size, incoming.mtime_ns)
            incoming.checkpoint = CheckpointWriter(incoming.partial, source, offset, piece_at)
        elif truncate:
            checkpoint_path(incoming.partial).unlink(missing_ok=True)
        try:
            if piece_at is not None:
                size_shared_partial(incoming.partial, incoming.size)
            elif offset:
                os.truncate(incoming.partial, incoming.size)  # drop anything past the end
            elif truncate:
                os.truncate(incoming.partial, 0)  # a stale partial: its content is not trusted
                remove_split_sidecars(incoming.partial)  # nor are a split run's ranges
        except OSError:
            self._close_checkpoint(incoming)
            raise
        if incoming.checkpoint is not None:
            self._checkpointed[incoming.file_id] = incoming
        count = -(-(incoming.end - offset) // self._payload)
        slot = FileSlot(incoming.file_id, self._next_block, count, offset, incoming.end)
        self._next_block += count
        incoming.slot, incoming.offset = slot, offset
        self._files[incoming.file_id] = incoming
        self.bytes_announced += incoming.end - offset
        self.sink.register(slot, incoming.partial)
        self._core.extend_known(self._next_block)
        self._ctl.send_nowait(
            control.READY,
            id=incoming.file_id,
            first_block=slot.first_block,
            count=count,
            offset=offset,
        )

    def _ensure_parent(self, incoming: IncomingFile) -> None:
        if not incoming.final.parent.is_dir():
            incoming.final = self._resolver.ensure_parent(incoming.dest_rel)
            incoming.partial = incoming.final.with_name(
                incoming.final.name + self._options.partial_suffix
            )

    async def _on_file_end(self, msg: dict[str, Any]) -> None:
        incoming = self._files.get(int(msg["id"]))
        if incoming is None:
            return
        if "error" in msg:  # the sender could not digest its file; the partial stays
            self._files.pop(incoming.file_id, None)
            self._close_checkpoint(incoming)
            self._file_failed(incoming, error_from_dict(msg["error"]))
            return
        incoming.digest = str(msg["digest"])
        checksum = msg.get("checksum")
        incoming.checksum = str(checksum) if checksum else None
        self._maybe_finalize(incoming)

    async def _on_eof(self, msg: dict[str, Any]) -> None:
        self._expected = int(msg["files"])
        self._eof_seen = True
        if self._mirror is not None:
            self._mirror.finish()
        self._maybe_close_stream()

    def _maybe_close_stream(self) -> None:
        # Every FILE came before EOF on the ordered channel; once the last pending decision
        # is answered the block run is final.
        if not self._eof_seen or self._deciding or self._stream_closed:
            return
        self._stream_closed = True
        self._core.close_stream(self._next_block)
        self._step()
        self._check_all_done()

    async def _on_rate(self, msg: dict[str, Any]) -> None:
        if self.rate_handler is not None:
            self.rate_handler(msg)

    def _on_blocks_complete(self, file_id: int) -> None:
        incoming = self._files.get(file_id)
        if incoming is None:
            return  # the file already failed (its sender could not digest it)
        incoming.blocks_done = True
        if incoming.checkpoint is not None:
            incoming.checkpoint.write(incoming.end)
        self._maybe_finalize(incoming)

    def _maybe_finalize(self, incoming: IncomingFile) -> None:
        if not incoming.blocks_done or incoming.digest is None or incoming.finishing:
            return
        incoming.finishing = True
        if incoming.size <= INLINE_HASH_LIMIT and not incoming.decrypt and not incoming.piece:
            # Small files: finished on the loop, after the current batch of datagrams.
            asyncio.get_running_loop().call_soon(self._finish_inline, incoming)
        else:
            self._spawn(self._finish_in_thread(incoming))

    def _finish_inline(self, incoming: IncomingFile) -> None:
        try:
            result = finish_file(incoming, self._options)
        except Exception as exc:
            self._finish_failed(incoming, exc)
            return
        self._finished(incoming, result)

    async def _finish_in_thread(self, incoming: IncomingFile) -> None:
        self._close_checkpoint(incoming)
        finish = finish_piece if incoming.piece is not None else finish_file
        try:
            result = await asyncio.to_thread(finish, incoming, self._options)
        except Exception as exc:
            self._finish_failed(incoming, exc)
            return
        self._finished(incoming, result)

    def _close_checkpoint(self, incoming: IncomingFile) -> None:
        self._checkpointed.pop(incoming.file_id, None)
        if incoming.checkpoint is not None:
            incoming.checkpoint.close()

    def _finish_failed(self, incoming: IncomingFile, exc: Exception) -> None:
        self._files.pop(incoming.file_id, None)
        self._close_checkpoint(incoming)
        error = _as_error(exc, incoming.final, "finish")
        if isinstance(error, ChecksumMismatch | ContentProtectionError):
            # The partial's content is wrong (or undecryptable): never resume from it.
            discard_partial(incoming)
        self._file_failed(incoming, error)

    def _finished(self, incoming: IncomingFile, result: FinishResult) -> None:
        self._files.pop(incoming.file_id, None)
        self._close_checkpoint(incoming)
        self._answered += 1
        if incoming.piece is not None:
            self._piece_finished(incoming, result)
            return
        size = incoming.plain_size if incoming.plain_size is not None else incoming.size
        self.totals.files_done += 1
        self.totals.bytes_files += size
        self.totals.bytes_resumed += incoming.offset
        event: dict[str, Any] = {
            "type": "file_done",
            "path": incoming.dest_rel,
            "size": size,
            "digest": result.digests.digest,
            "file": str(incoming.final),
        }
        _add_checksum(event, self._options.checksum, result.digests.checksum)
        if incoming.offset:
            event["resumed_from"] = incoming.offset
        if result.backup is not None:
            event["saved_as"] = str(result.backup)
            if self._mirror is not None:
                self._mirror.created.add(result.backup)
        self._emit(event)
        # Just the id: the digest and checksum matched the sender's own (or this would be an
        # error), and the sender knows the offset; on a lossy path every byte here counts.
        self._ctl.send_nowait(control.FILE_DONE, id=incoming.file_id)
        self._check_all_done()

    def _piece_finished(self, incoming: IncomingFile, result: FinishResult) -> None:
        """A split file's range verified; ``result.whole``: and the file renamed by it."""
        start, end = incoming.start, incoming.end
        self.totals.bytes_files += end - start
        self.totals.bytes_resumed += incoming.offset - start
        digest = result.digests.digest
        self._emit(
            _range_event(incoming.dest_rel, incoming.size, start, end, digest, incoming.offset)
        )
        if not result.whole:
            self._ctl.send_nowait(control.FILE_DONE, id=incoming.file_id)
            self._check_all_done()
            return
        self.totals.files_done += 1
        event: dict[str, Any] = {"type": "file_done", "path": incoming.dest_rel}
        event |= {"size": incoming.size, "split": True, "ranges": [list(r) for r in result.ranges]}
        event["file"] = str(incoming.final)
        if result.backup is not None:
            event["saved_as"] = str(result.backup)
        self._emit(event)
        self._ctl.send_nowait(control.FILE_DONE, id=incoming.file_id, **{control.WHOLE_FIELD: True})
        self._check_all_done()

    def _file_failed(self, incoming: IncomingFile, error: SlipstreamError) -> None:
        self._answered += 1
        self.totals.errors.append(error.to_dict())
        whole = self._counts_failure(incoming)
        if whole:
            self.totals.files_failed += 1
        event: dict[str, Any] = {"type": "file_error" if whole else "range_error"}
        event["path"] = incoming.dest_rel
        reply: dict[str, Any] = {}
        if incoming.piece is not None:
            event |= {"offset": incoming.start, "length": incoming.end - incoming.start}
            reply = {control.WHOLE_FIELD: True} if whole else {}
        event["error"] = error.to_dict()
        self._emit(event)
        with contextlib.suppress(SlipstreamError):
            self._ctl.send_nowait(
                control.FILE_DONE, id=incoming.file_id, error=error.to_dict(), **reply
            )
        self._check_all_done()

    def _counts_failure(self, incoming: IncomingFile) -> bool:
        """Whether this failure counts the file as failed: always for a whole file; for a
        split file, only the first failing range of the job (noted in the range record)."""
        if incoming.piece is None:
            return True
        if incoming.partial.name:
            with contextlib.suppress(OSError):
                return incoming.range_record(self._options.job).note_failure()
        # No record possible (no place for it): every range fails alike here.
        return incoming.start == 0

    def _check_all_done(self) -> None:
        if self._expected is not None and self._answered >= self._expected:
            self._all_done.set()

    # -- checkpoints -----------------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            self._flush_checkpoints(final=False)

    def _flush_checkpoints(self, *, final: bool) -> None:
        """Record each big file's good prefix: everything below the receiver's cumulative
        point arrived and was written, so it never has to travel again."""
        if not self._checkpointed:
            return
        try:
            # The sink gathers runs of blocks in memory: what a record claims must be on
            # disk first, or a kill -9 would leave a checkpoint ahead of the partial.
            self.sink.flush()
        except SlipstreamError as exc:
            log.warning("checkpoints not written: %s", exc.internal_message)
            return
        cum = int(getattr(getattr(self, "_core", None), "cum", 0))
        for incoming in list(self._checkpointed.values()):
            writer, slot = incoming.checkpoint, incoming.slot
            if writer is None or slot is None:
                continue
            received = min(max(cum - slot.first_block, 0), slot.count)
            good = min(slot.offset + received * self._payload, slot.size)
            try:
                if final or good - writer.good >= CHECKPOINT_STEP:
                    writer.write(good)
                if final:
                    writer.close()
            except OSError as exc:  # a checkpoint is an optimisation; the file goes on
                log.warning("checkpoint for %s not written: %s", incoming.dest_rel, exc)


_RECEIVER_HANDLERS: dict[str, Callable[[RecvDriver, dict[str, Any]], Any]] = {
    control.FILE: RecvDriver._on_file,
    control.DIR: RecvDriver._on_dir,
    control.LINK: RecvDriver._on_link,
    control.FILE_END: RecvDriver._on_file_end,
    control.SUMS: RecvDriver._on_sums,
    control.EOF: RecvDriver._on_eof,
    control.RATE: RecvDriver._on_rate,
}
