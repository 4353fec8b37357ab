"""The receiving side of a session's data phase: decide, place, receive, and confirm files.

:class:`RecvDriver` runs on whichever host receives the files (the server for an upload,
the client for a download). For each FILE it decides: skip, place, or resume (asking the
sender for checksums when the policy compares content), answers READY or SKIP, and numbers
the file's blocks; its base (engine/recv_finish.py) verifies, renames and confirms each file.
Reading the announcement and the destination is engine/recv_inspect.py; the checkpoints of
big files in flight are engine/recv_checkpoints.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slipstream.engine.blockio import FileBlockSink, FileSlot, truncate_nofollow
from slipstream.engine.control_stream import ControlStream
from slipstream.engine.disposition import MirrorTracker
from slipstream.engine.driver import Emit, as_error, until_done_or_failed
from slipstream.engine.envelope import HEADER_SIZE
from slipstream.engine.incoming import (
    IncomingFile,
    ReceiveOptions,
    hash_while_arriving,
    place_link,
    size_shared_partial,
)
from slipstream.engine.overwrite import overwrite_refused, skip_reason
from slipstream.engine.paths import DestinationResolver
from slipstream.engine.recv_checkpoints import Checkpoints
from slipstream.engine.recv_finish import RecvFinisher
from slipstream.engine.recv_inspect import (
    OnDisk,
    inspect_destination,
    open_envelope_header,
    parse_file_message,
)
from slipstream.engine.resume import (
    CHECKPOINT_MIN_SIZE,
    CheckpointRecord,
    CheckpointWriter,
    FileIdentity,
    checkpoint_path,
    decide_partial,
    remove_split_sidecars,
)
from slipstream.engine.sums import SumsExchange
from slipstream.engine.totals import SessionTotals
from slipstream.errors import (
    BadPassphrase,
    PeerAborted,
    SlipstreamError,
    error_from_dict,
)
from slipstream.protocol import control

__all__ = ["RecvDriver"]


class RecvDriver(RecvFinisher):
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
        self._files = {}
        self._next_block = 0
        self.bytes_announced = 0  # bytes of the files placed so far (progress percentage)
        self._expected = None
        self._answered = 0  # files skipped, failed or done
        self._deciding = 0  # files waiting for a checksum comparison before READY/SKIP
        self._eof_seen = False
        self._stream_closed = False
        self._all_done = asyncio.Event()
        self._sums = SumsExchange(ctl, encrypted_upload=options.encrypted_upload)
        self._checkpoints = Checkpoints(self.sink, block_payload, self._cum)
        self._deferred_dirs: list[str] = []
        self._bad_passphrase = False
        self._tasks = set()
        # The sending server's answer to a live rate change (engine/livecontrol.py).
        self.rate_handler: Callable[[dict[str, Any]], None] | None = None
        self._mirror = self._new_mirror() if options.mirror else None

    def _new_mirror(self) -> MirrorTracker:
        options, resolver = self._options, self._resolver
        return MirrorTracker(
            lambda rel: resolver.path_for(rel, kind="dir"),
            options.partial_suffix,
            lambda rel, is_dir: options.filters.excluding_rule(rel, is_dir) is not None,
            self._on_mirror_delete,
        )

    def _cum(self) -> int:
        """The core's cumulative point (0 before it is attached)."""
        return int(getattr(getattr(self, "_core", None), "cum", 0))

    async def run(self) -> SessionTotals:
        checkpointer = asyncio.ensure_future(self._checkpoints.run())
        try:
            await until_done_or_failed(self._receive(), self._watch)
        finally:
            checkpointer.cancel()
            self._cancel_tasks()
            # However the session ends, record exactly what arrived: a rerun resumes there.
            self._checkpoints.flush(final=True)
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
            error = as_error(exc, Path(rel), "create folder")
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
            error = as_error(exc, Path(rel), "create link")
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
        incoming = parse_file_message(msg, self._options)
        if self._mirror is not None:
            self._mirror.entry(incoming.dest_rel, False)
        try:
            on_disk = inspect_destination(incoming, self._resolver, self._options.partial_suffix)
        except (SlipstreamError, OSError) as exc:
            self._file_failed(incoming, as_error(exc, Path(incoming.dest_rel), "write"))
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

    async def _decide(self, incoming: IncomingFile, on_disk: OnDisk) -> None:
        try:
            if incoming.decrypt:
                await open_envelope_header(incoming, self._options.keyring)
            if on_disk.final is not None:
                reason = await self._existing_verdict(incoming, on_disk.final)
                if reason:
                    self._skip(incoming, reason)
                    return
                if not self._options.allow_overwrite:
                    raise overwrite_refused(incoming.dest_rel)
            offset = await self._resume_offset(incoming, on_disk.record)
            self._start(incoming, offset, truncate=on_disk.partial and offset == 0)
        except (SlipstreamError, OSError) as exc:
            error = as_error(exc, Path(incoming.dest_rel), "write")
            if isinstance(error, BadPassphrase):
                self._bad_passphrase = True
                if self._options.fail_bad_filepass:
                    self._watch.fail(error)
            self._file_failed(incoming, error)
        finally:
            self._deciding -= 1
            self._maybe_close_stream()

    async def _decide_piece(self, incoming: IncomingFile, on_disk: OnDisk) -> None:
        """A range of a split file. The file's fate is the verdict the first of its ranges
        stamped in the range record (docs/protocol.md, "Split files"); this range follows it,
        whatever it found itself, so no range skips what another one is replacing."""
        try:
            proposal = ""  # transfer
            if on_disk.final is not None:
                proposal = await self._existing_verdict(incoming, on_disk.final)
                if not proposal and not self._options.allow_overwrite:
                    raise overwrite_refused(incoming.dest_rel)
            self._ensure_parent(incoming)
            record = incoming.range_record(self._options.job)
            verdict, ours = record.stamp(proposal)
            if verdict:
                self._skip_piece(incoming, verdict, whole=ours)
                return
            offset = await self._resume_offset(incoming, on_disk.record)
            self._start(incoming, offset, truncate=False)
        except (SlipstreamError, OSError) as exc:
            self._file_failed(incoming, as_error(exc, Path(incoming.dest_rel), "write"))
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

    async def _existing_verdict(self, incoming: IncomingFile, final_st: os.stat_result) -> str:
        """Why to skip the announced file ("" = replace what is there)."""
        size = incoming.size
        if incoming.decrypt and incoming.plain_size is not None:
            size = incoming.plain_size

        async def same(ranges: list[tuple[int, int]]) -> bool:
            return await self._sums.same_content(incoming.file_id, incoming.final, ranges)

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
            ranges = list(decision.ranges)
            same = await self._sums.same_content(incoming.file_id, incoming.partial, ranges)
            return decision.offset if same else start
        return decision.offset

    async def _on_sums(self, msg: dict[str, Any]) -> None:
        self._sums.on_sums(msg)

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
            self._file_failed(incoming, as_error(exc, Path(incoming.dest_rel), "write"))

    def _start(self, incoming: IncomingFile, offset: int, *, truncate: bool) -> None:
        """Place the partial file, fix the file's block run and answer READY.

        Everything that can fail happens before the block run is taken: a run assigned to
        a file that never gets its READY would shift every later file's blocks.
        """
        self._ensure_parent(incoming)
        self._place_partial(incoming, offset, truncate=truncate)
        if incoming.checkpoint is not None:
            hash_while_arriving(incoming, self._options)
            self._checkpoints.track(incoming)
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

    def _place_partial(self, incoming: IncomingFile, offset: int, *, truncate: bool) -> None:
        """Open the checkpoint of a big file and size the partial copy to continue at ``offset``.

        A range of a split file shares the partial with the file's other ranges (in other
        sessions, maybe other processes): it never truncates it, only sizes it to the whole
        file, and keeps its own checkpoint (``NAME.partial.slipstream-ckpt.OFFSET``).
        """
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
                truncate_nofollow(incoming.partial, incoming.size)  # drop anything past the end
            elif truncate:
                truncate_nofollow(incoming.partial, 0)  # a stale partial: content not trusted
                remove_split_sidecars(incoming.partial)  # nor are a split run's ranges
        except OSError:
            self._checkpoints.close(incoming)
            raise

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
            self._checkpoints.close(incoming)
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


_RECEIVER_HANDLERS: dict[str, Callable[[RecvDriver, dict[str, Any]], Any]] = {
    control.FILE: RecvDriver._on_file,
    control.DIR: RecvDriver._on_dir,
    control.LINK: RecvDriver._on_link,
    control.FILE_END: RecvDriver._on_file_end,
    control.SUMS: RecvDriver._on_sums,
    control.EOF: RecvDriver._on_eof,
    control.RATE: RecvDriver._on_rate,
}
