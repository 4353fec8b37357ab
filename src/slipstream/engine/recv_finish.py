"""The receiver's last steps for a file: once every block is in and FILE_END's digest is
known, verify and rename it (engine/incoming.py, on the loop for small files, in a thread
for the others), count it, and answer FILE_DONE; or answer why it failed.

:class:`RecvFinisher` is the base of :class:`~slipstream.engine.recv_driver.RecvDriver`,
which owns the state declared here and calls :meth:`RecvFinisher._maybe_finalize` when
FILE_END arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from slipstream.engine.control_stream import ControlStream
from slipstream.engine.disposition import MirrorTracker
from slipstream.engine.driver import INLINE_HASH_LIMIT, Driver, Emit, as_error
from slipstream.engine.events import file_done_event, range_event, span_fields
from slipstream.engine.incoming import (
    FinishResult,
    IncomingFile,
    ReceiveOptions,
    discard_partial,
    finish_file,
    finish_piece,
)
from slipstream.engine.recv_checkpoints import Checkpoints
from slipstream.engine.totals import SessionTotals
from slipstream.errors import ChecksumMismatch, ContentProtectionError, SlipstreamError
from slipstream.protocol import control

__all__ = ["RecvFinisher"]


class RecvFinisher(Driver):
    """Finishing received files and answering for them (FILE_DONE), for the receiver."""

    totals: SessionTotals
    _ctl: ControlStream
    _emit: Emit
    _options: ReceiveOptions
    _files: dict[int, IncomingFile]  # placed (READY sent), not finished yet
    _checkpoints: Checkpoints
    _mirror: MirrorTracker | None
    _answered: int  # files skipped, failed or done
    _expected: int | None  # from EOF
    _all_done: asyncio.Event

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
        self._checkpoints.close(incoming)
        finish = finish_piece if incoming.piece is not None else finish_file
        try:
            result = await asyncio.to_thread(finish, incoming, self._options)
        except Exception as exc:
            self._finish_failed(incoming, exc)
            return
        self._finished(incoming, result)

    def _finish_failed(self, incoming: IncomingFile, exc: Exception) -> None:
        self._files.pop(incoming.file_id, None)
        self._checkpoints.close(incoming)
        error = as_error(exc, incoming.final, "finish")
        if isinstance(error, ChecksumMismatch | ContentProtectionError):
            # The partial's content is wrong (or undecryptable): never resume from it.
            discard_partial(incoming)
        self._file_failed(incoming, error)

    def _finished(self, incoming: IncomingFile, result: FinishResult) -> None:
        self._files.pop(incoming.file_id, None)
        self._checkpoints.close(incoming)
        self._answered += 1
        if incoming.piece is not None:
            self._piece_finished(incoming, result)
            return
        size = incoming.landed_size
        self.totals.file_landed(size, incoming.offset)
        if result.backup is not None and self._mirror is not None:
            self._mirror.created.add(result.backup)
        self._emit(file_done_event(incoming, result, size, self._options.checksum))
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
            range_event(incoming.dest_rel, incoming.size, start, end, digest, incoming.offset)
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
            event |= span_fields(incoming.start, incoming.end)
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
