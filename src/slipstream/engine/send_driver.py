"""The sending side of a session's data phase: announce files, answer the receiver.

:class:`SendDriver` runs on whichever host holds the files (the client for an upload, the
server for a download). It streams FILE announcements ahead of the data within a window of
:data:`MANIFEST_WINDOW` files, appends each file's block run when its READY arrives, sends
FILE_END with the whole file's digest, and reports what the receiver confirms. The parts that
need no control channel (announcements, envelopes, digest jobs) are in engine/outgoing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from slipstream.engine.blockio import FileBlockSource, FileSlot
from slipstream.engine.control_stream import ControlStream
from slipstream.engine.driver import Driver, Emit, as_error, until_done_or_failed
from slipstream.engine.events import add_checksum, range_event, span_fields
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
from slipstream.engine.paths import SourceEntry
from slipstream.engine.selection import LeftOut, iterate_in_thread
from slipstream.engine.sums import envelope_sums, open_peer_envelope, parse_ranges, sums_of_path
from slipstream.engine.totals import SessionTotals
from slipstream.errors import (
    PeerAborted,
    ProtocolError,
    SlipstreamError,
    error_from_dict,
)
from slipstream.protocol import control

__all__ = ["ANNOUNCE_DRAIN_EVERY", "MANIFEST_WINDOW", "SendDriver", "rate_change_kwargs"]

log = logging.getLogger("slipstream.engine")

MANIFEST_WINDOW = 2048  # files announced but not yet confirmed
ANNOUNCE_DRAIN_EVERY = 256  # FILE messages written between two waits for the SSH window


def _listing_error(exc: Exception) -> SlipstreamError:
    """A failure while listing the sources that is not one of ours: still a typed error."""
    log.exception("listing the sources failed")
    return SlipstreamError(f"Could not list the sources: {exc}", internal_message=repr(exc))


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


class SendDriver(Driver):
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
            await until_done_or_failed(self._read_control(), self._watch)
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
        self.totals.file_landed(out.entry.size, out.offset)
        event: dict[str, Any] = {
            "type": "file_done",
            "path": out.entry.rel_path,
            "size": out.entry.size,
            "digest": out.digest,
            **self._stored_field(out),
        }
        add_checksum(event, self._options.checksum, out.checksum)
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
            kind = "file_error" if whole else "range_error"
            span = span_fields(out.start, out.end)
            self._emit({"type": kind, "path": path, **span, "error": msg["error"]})
            return
        self.totals.bytes_files += out.end - out.start
        self.totals.bytes_resumed += out.offset - out.start
        self._emit(range_event(path, out.size, out.start, out.end, out.digest, out.offset))
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
        ranges = parse_ranges(msg["ranges"], out.size)
        self._spawn(self._answer_sums(int(msg["id"]), out, ranges, msg.get("env_header")))

    async def _answer_sums(
        self, file_id: int, out: _Outgoing, ranges: list[tuple[int, int]], header_hex: Any
    ) -> None:
        try:
            if self._options.keyring is not None:
                sums = await self._envelope_sums(file_id, out, ranges, header_hex)
            else:
                sums = await sums_of_path(out.entry.local_path, ranges)
        except (SlipstreamError, OSError, ValueError) as exc:
            error = as_error(exc, out.entry.local_path, "read")
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
        header, key = await open_peer_envelope(
            keyring, header_hex, out.entry, out.stored_path, "receiver"
        )
        self._peer_headers.put(file_id, (header, key))
        return await envelope_sums(out.entry.local_path, header, key, ranges)


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
