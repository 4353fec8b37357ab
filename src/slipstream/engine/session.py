"""The file side of a session: the manifest, readiness, checksums and confirmations.

``SendDriver`` and ``RecvDriver`` run on whichever host holds the files or receives them
(the client for an upload, the server for a download). Each owns the control stream for the
session's data phase and a sans-IO core driven by an ``Endpoint``. The exchange, per file:

    sender   FILE(id, path, size, mtime)        -> receiver decides: skip, or place it
    receiver READY(id, first_block, count, off) -> both append the same block run
    sender   FILE_END(id, digest)               (after its first sequential read)
    receiver FILE_DONE(id, digest | error)      (after verifying and renaming)

The sender streams FILE messages ahead of the data within a window, so many small files
cost no round trip each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from slipstream.engine.blockio import FileBlockSink, FileBlockSource, FileSlot, file_digest
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.errors import (
    ChecksumMismatch,
    PeerAborted,
    SlipstreamError,
    TransferTimeout,
    error_from_dict,
)
from slipstream.protocol import control
from slipstream.spec import TransferSpec

log = logging.getLogger("slipstream.engine")

MANIFEST_WINDOW = 2048  # files announced but not yet confirmed
PARTIAL_SUFFIX = ".partial"
PROGRESS_INTERVAL = 1.0

Emit = Callable[[dict[str, Any]], None]


class ControlStream:
    """JSON lines over the SSH channel."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer

    def send_nowait(self, msg_type: str, **fields: Any) -> None:
        try:
            self._writer.write(control.encode(msg_type, **fields))
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc

    async def send(self, msg_type: str, **fields: Any) -> None:
        self.send_nowait(msg_type, **fields)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc

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


@dataclass
class SessionTotals:
    """What a session did, reported in events and logs."""

    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    dirs: int = 0
    bytes_files: int = 0  # bytes of completed files
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
            "dirs": self.dirs,
            "bytes": self.bytes_files,
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
        elif name == "PeerClosed" and getattr(event, "code", 0):
            self.fail(PeerAborted(f"The peer closed the session (code {event.code})"))

    def fail(self, error: SlipstreamError) -> None:
        if not self.failed.done():
            self.failed.set_result(error)


async def _until_done_or_failed(work: Coroutine[Any, Any, None], watch: _CoreWatch) -> None:
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watch.failed}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise watch.failed.result()


class _Driver:
    """What both drivers share: the core they feed and the endpoint step that sends."""

    _core: Any
    _step: Callable[[], None]
    _watch: _CoreWatch

    def attach(self, core: Any, step: Callable[[], None], watch: _CoreWatch) -> None:
        self._core = core
        self._step = step
        self._watch = watch


class SendDriver(_Driver):
    """Sends the files of ``entries`` to the peer's receiver."""

    def __init__(
        self,
        ctl: ControlStream,
        entries: Iterable[SourceEntry],
        emit: Emit,
        block_payload: int,
    ) -> None:
        self._ctl = ctl
        self._entries = entries
        self._emit = emit
        self._payload = block_payload
        self.source = FileBlockSource(block_payload, self._on_hashed)
        self.totals = SessionTotals()
        self._announced: dict[int, SourceEntry] = {}
        self._unanswered = 0  # FILE messages without READY/SKIP yet
        self._window = asyncio.Semaphore(MANIFEST_WINDOW)
        self._eof_sent = False
        self._files_announced = 0
        self.bytes_announced = 0

    def _on_hashed(self, file_id: int, digest: str) -> None:
        # Called from inside the core's send path: no awaiting here.
        self._ctl.send_nowait(control.FILE_END, id=file_id, digest=digest)

    async def run(self) -> SessionTotals:
        announcer = asyncio.ensure_future(self._announce())
        try:
            await _until_done_or_failed(self._read_control(), self._watch)
            if announcer.done() and announcer.exception():
                raise announcer.exception()  # type: ignore[misc]
        finally:
            announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await announcer
            self.source.close()
        self.totals.finished = time.monotonic()
        return self.totals

    async def _announce(self) -> None:
        file_id = 0
        try:
            for entry in self._entries:
                if entry.kind == "dir":
                    await self._ctl.send(control.DIR, path=entry.rel_path, mode=entry.mode)
                    self.totals.dirs += 1
                    continue
                await self._window.acquire()
                self._announced[file_id] = entry
                self._unanswered += 1
                self.bytes_announced += entry.size
                await self._ctl.send(
                    control.FILE,
                    id=file_id,
                    path=entry.rel_path,
                    size=entry.size,
                    mtime_ns=entry.mtime_ns,
                    mode=entry.mode,
                )
                file_id += 1
        except SlipstreamError as exc:
            await self._ctl.send_error(exc)
            self._watch.fail(exc)
            return
        self._files_announced = file_id
        self._eof_sent = True
        await self._ctl.send(control.EOF, files=file_id)
        self._maybe_close_stream()

    def _maybe_close_stream(self) -> None:
        if self._eof_sent and self._unanswered == 0:
            self._core.close_stream()
            self._step()

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

    def _on_ready(self, msg: dict[str, Any]) -> None:
        entry = self._announced[int(msg["id"])]
        slot = FileSlot(
            int(msg["id"]),
            int(msg["first_block"]),
            int(msg["count"]),
            int(msg["offset"]),
            entry.size,
        )
        self.source.register(slot, entry.local_path)
        first = self._core.add_blocks(slot.count)
        if first != slot.first_block:
            raise PeerAborted(
                "Block numbering diverged between sender and receiver",
                internal_message=f"file {slot.file_id}: ours {first}, theirs {slot.first_block}",
            )
        self._unanswered -= 1
        self._maybe_close_stream()
        self._step()

    def _on_skip(self, msg: dict[str, Any]) -> None:
        entry = self._announced.pop(int(msg["id"]))
        self.totals.files_skipped += 1
        self._unanswered -= 1
        self._window.release()
        self._emit(
            {
                "type": "file_skipped",
                "path": entry.rel_path,
                "size": entry.size,
                "reason": msg["reason"],
            }
        )
        self._maybe_close_stream()

    def _on_file_done(self, msg: dict[str, Any]) -> None:
        file_id = int(msg["id"])
        entry = self._announced.pop(file_id)
        self.source.release(file_id)
        self._window.release()
        if "error" in msg:
            self.totals.files_failed += 1
            self.totals.errors.append(msg["error"])
            self._emit({"type": "file_error", "path": entry.rel_path, "error": msg["error"]})
            return
        self.totals.files_done += 1
        self.totals.bytes_files += entry.size
        self._emit(
            {
                "type": "file_done",
                "path": entry.rel_path,
                "size": entry.size,
                "digest": msg.get("digest", ""),
            }
        )


_SENDER_HANDLERS: dict[str, Callable[[SendDriver, dict[str, Any]], None]] = {
    control.READY: SendDriver._on_ready,
    control.SKIP: SendDriver._on_skip,
    control.FILE_DONE: SendDriver._on_file_done,
}


@dataclass
class ReceiveOptions:
    """What the receiver decides on its own (overwrite policy, timestamps, ...)."""

    overwrite: str = "diff"
    preserve_times: bool = False
    partial_suffix: str = PARTIAL_SUFFIX

    @classmethod
    def from_spec(cls, spec: TransferSpec) -> ReceiveOptions:
        return cls(overwrite=spec.overwrite, preserve_times=bool(spec.preserve_times))


@dataclass
class _Incoming:
    file_id: int
    rel_path: str
    final: Path
    partial: Path
    size: int
    mtime_ns: int
    digest: str | None = None
    blocks_done: bool = False


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
        self._files: dict[int, _Incoming] = {}
        self._next_block = 0
        self._expected: int | None = None
        self._answered = 0  # files skipped, failed or done
        self._all_done = asyncio.Event()
        self._finalizing: set[asyncio.Task[None]] = set()

    async def run(self) -> SessionTotals:
        try:
            await _until_done_or_failed(self._receive(), self._watch)
        finally:
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

    async def _on_dir(self, msg: dict[str, Any]) -> None:
        try:
            path = self._resolver.path_for(str(msg["path"]), kind="dir")
            path.mkdir(parents=True, exist_ok=True)
            self.totals.dirs += 1
        except SlipstreamError as exc:
            self.totals.errors.append(exc.to_dict())
            self._emit({"type": "file_error", "path": msg["path"], "error": exc.to_dict()})
        except OSError as exc:
            self._emit({"type": "file_error", "path": msg["path"], "error": {"message": str(exc)}})

    async def _on_file(self, msg: dict[str, Any]) -> None:
        file_id, size = int(msg["id"]), int(msg["size"])
        try:
            final = self._resolver.path_for(str(msg["path"]), kind="file")
            skip_reason = self._skip_reason(final, size, int(msg.get("mtime_ns", 0)))
            if skip_reason:
                self._answered += 1
                self.totals.files_skipped += 1
                await self._ctl.send(control.SKIP, id=file_id, reason=skip_reason)
                self._check_all_done()
                return
            incoming = self._place(file_id, msg, final, size)
        except SlipstreamError as exc:
            await self._fail_file(file_id, str(msg["path"]), exc)
            return
        except OSError as exc:
            from slipstream.engine.blockio import os_error_to_slipstream

            error = os_error_to_slipstream(exc, Path(str(msg["path"])), "write")
            assert isinstance(error, SlipstreamError)
            await self._fail_file(file_id, str(msg["path"]), error)
            return
        count = -(-size // self._payload)
        slot = FileSlot(file_id, self._next_block, count, 0, size)
        self._next_block += count
        self._files[file_id] = incoming
        self.sink.register(slot, incoming.partial)
        self._core.extend_known(self._next_block)
        await self._ctl.send(
            control.READY, id=file_id, first_block=slot.first_block, count=count, offset=0
        )

    def _skip_reason(self, final: Path, size: int, mtime_ns: int) -> str:
        try:
            existing = final.stat()
        except FileNotFoundError:
            return ""
        policy = self._options.overwrite
        if policy == "never":
            return "exists"
        same = existing.st_size == size and abs(existing.st_mtime_ns - mtime_ns) < 1_000_000_000
        if policy == "diff" and same:
            return "identical"
        if policy in ("older", "diff+older") and existing.st_mtime_ns >= mtime_ns:
            return "newer_or_same"
        return ""

    def _place(self, file_id: int, msg: dict[str, Any], final: Path, size: int) -> _Incoming:
        final = self._resolver.ensure_parent(str(msg["path"]))
        partial = final.with_name(final.name + self._options.partial_suffix)
        with open(partial, "wb") as handle:
            handle.truncate(size)
        return _Incoming(
            file_id, str(msg["path"]), final, partial, size, int(msg.get("mtime_ns", 0))
        )

    async def _fail_file(self, file_id: int, rel: str, error: SlipstreamError) -> None:
        self._answered += 1
        self.totals.files_failed += 1
        self.totals.errors.append(error.to_dict())
        self._emit({"type": "file_error", "path": rel, "error": error.to_dict()})
        await self._ctl.send(control.FILE_DONE, id=file_id, error=error.to_dict())
        self._check_all_done()

    async def _on_file_end(self, msg: dict[str, Any]) -> None:
        incoming = self._files.get(int(msg["id"]))
        if incoming is None:
            return
        incoming.digest = str(msg["digest"])
        self._maybe_finalize(incoming)

    async def _on_eof(self, msg: dict[str, Any]) -> None:
        self._expected = int(msg["files"])
        # Every FILE came before EOF on the ordered channel, so the block run is final.
        self._core.close_stream(self._next_block)
        self._step()
        self._check_all_done()

    def _on_blocks_complete(self, file_id: int) -> None:
        incoming = self._files[file_id]
        incoming.blocks_done = True
        self._maybe_finalize(incoming)

    def _maybe_finalize(self, incoming: _Incoming) -> None:
        if incoming.blocks_done and incoming.digest is not None:
            task = asyncio.get_running_loop().create_task(self._finalize(incoming))
            self._finalizing.add(task)
            task.add_done_callback(self._finalizing.discard)

    async def _finalize(self, incoming: _Incoming) -> None:
        self._files.pop(incoming.file_id, None)
        try:
            digest = await asyncio.to_thread(file_digest, incoming.partial)
            if incoming.digest and digest != incoming.digest:
                raise ChecksumMismatch(
                    f"{incoming.rel_path}: received bytes differ from the sender's",
                    internal_message=f"sender {incoming.digest}, receiver {digest}",
                )
            if self._options.preserve_times and incoming.mtime_ns:
                os.utime(incoming.partial, ns=(incoming.mtime_ns, incoming.mtime_ns))
            os.replace(incoming.partial, incoming.final)
        except SlipstreamError as exc:
            await self._fail_file(incoming.file_id, incoming.rel_path, exc)
            return
        except OSError as exc:
            from slipstream.engine.blockio import os_error_to_slipstream

            error = os_error_to_slipstream(exc, incoming.final, "finish")
            assert isinstance(error, SlipstreamError)
            await self._fail_file(incoming.file_id, incoming.rel_path, error)
            return
        self._answered += 1
        self.totals.files_done += 1
        self.totals.bytes_files += incoming.size
        self._emit(
            {
                "type": "file_done",
                "path": incoming.rel_path,
                "size": incoming.size,
                "digest": digest,
                "file": str(incoming.final),
            }
        )
        await self._ctl.send(control.FILE_DONE, id=incoming.file_id, digest=digest)
        self._check_all_done()

    def _check_all_done(self) -> None:
        if self._expected is not None and self._answered >= self._expected:
            self._all_done.set()


_RECEIVER_HANDLERS: dict[str, Callable[[RecvDriver, dict[str, Any]], Any]] = {
    control.FILE: RecvDriver._on_file,
    control.DIR: RecvDriver._on_dir,
    control.FILE_END: RecvDriver._on_file_end,
    control.EOF: RecvDriver._on_eof,
}
