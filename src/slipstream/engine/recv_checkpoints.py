"""The receiver's checkpoints: how far each big file in flight has arrived, kept on disk.

Files of ``CHECKPOINT_MIN_SIZE`` (engine/resume.py) or more keep a sidecar next to their
partial copy while in flight. :class:`Checkpoints` tracks them for one session, advances
their records as the receiver's cumulative point moves, and writes the exact state once more
when the session ends, however it ends, so a rerun resumes there. The same good prefix feeds
each file's running digest (engine/prefix_hash.py), so the finish hashes only the tail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from slipstream.engine.blockio import FileBlockSink
from slipstream.engine.incoming import IncomingFile
from slipstream.errors import SlipstreamError

__all__ = ["CHECKPOINT_INTERVAL", "CHECKPOINT_STEP", "Checkpoints"]

log = logging.getLogger("slipstream.engine")

CHECKPOINT_INTERVAL = 0.05  # how often the good prefix of big files is considered
CHECKPOINT_STEP = 256 << 10  # ...and how far it must have moved to be written


class Checkpoints:
    """The files in flight with a checkpoint sidecar, and the loop that keeps them current.

    ``cum`` tells the receiver core's cumulative point: every block below it arrived.
    """

    def __init__(self, sink: FileBlockSink, payload: int, cum: Callable[[], int]) -> None:
        self._sink = sink
        self._payload = payload
        self._cum = cum
        self._files: dict[int, IncomingFile] = {}

    def track(self, incoming: IncomingFile) -> None:
        """Keep ``incoming``'s checkpoint current from now on (it has a writer)."""
        self._files[incoming.file_id] = incoming

    def close(self, incoming: IncomingFile) -> None:
        """Stop tracking ``incoming`` and close its checkpoint, if it has one; its running
        digest gets no more background passes (the finish takes it over)."""
        self._files.pop(incoming.file_id, None)
        if incoming.prefix_hash is not None:
            incoming.prefix_hash.stop()
        if incoming.checkpoint is not None:
            incoming.checkpoint.close()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        """Record each big file's good prefix: everything below the receiver's cumulative
        point arrived and was written, so it never has to travel again."""
        if not self._files:
            return
        if final:  # the session ends, however it ends: no more hashing behind the writes
            self._stop_hashing()
        try:
            # The sink gathers runs of blocks in memory: what a record claims must be on
            # disk first, or a kill -9 would leave a checkpoint ahead of the partial.
            self._sink.flush()
        except SlipstreamError as exc:
            log.warning("checkpoints not written: %s", exc.internal_message)
            return
        cum = self._cum()
        for incoming in list(self._files.values()):
            self._advance(incoming, cum, final)

    def _stop_hashing(self) -> None:
        for incoming in self._files.values():
            if incoming.prefix_hash is not None:
                incoming.prefix_hash.stop()

    def _advance(self, incoming: IncomingFile, cum: int, final: bool) -> None:
        writer, slot = incoming.checkpoint, incoming.slot
        if writer is None or slot is None:
            return
        received = min(max(cum - slot.first_block, 0), slot.count)
        good = min(slot.offset + received * self._payload, slot.size)
        try:
            if final or good - writer.good >= CHECKPOINT_STEP:
                writer.write(good)
            if final:
                writer.close()
        except OSError as exc:  # a checkpoint is an optimisation; the file goes on
            log.warning("checkpoint for %s not written: %s", incoming.dest_rel, exc)
        if incoming.prefix_hash is not None and not final:
            incoming.prefix_hash.request(good)  # hashed in a worker thread
