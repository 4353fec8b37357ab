"""A received file's digest, computed over its good prefix while the rest still arrives.

Verifying a file means hashing all of it; done only once the last block is in, that is a
second full read of a big file with the progress at 99 %. Instead, the receiver's checkpoint
loop (engine/recv_checkpoints.py) hands each big file's *good prefix* (every byte below it
is written) to its :class:`PrefixHash`, which reads those bytes back (from the page cache) and
hashes them in a worker thread. The finish then hashes only the tail.

This is sound because nothing below the good prefix is written again in a session: the
receiver core hands each block to the sink exactly once (duplicates are dropped before the
sink, protocol/receiver.py), and a resumed file's prefix ``[0, offset)`` is not written at
all. The digests are those of :func:`~slipstream.engine.digests.digest_path` (or of a split
file's range): the same bytes, in the same order, through the same hashers.

One owner at a time: a lock is held by a background pass or by the finish. The finish
first stops background passes (one in flight ends after its current chunk), then takes
the lock and hashes the rest itself, so it never waits for more than a chunk of someone
else's work, and never races it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from slipstream.engine.digests import FileDigests, RunningDigests, path_reader

__all__ = ["HASH_STEP", "PrefixHash"]

HASH_STEP = 4 << 20  # the good prefix must have moved this far for a background pass


class PrefixHash:
    """The running digests of ``[start, good prefix)`` of one file in flight.

    ``algorithm`` is the user's ``file_checksum`` (hashlib name), or None.
    """

    def __init__(self, path: Path, algorithm: str | None, start: int = 0) -> None:
        self._path = path
        self._algorithm = algorithm
        self._start = start
        self._running = RunningDigests(algorithm, start)
        self._lock = threading.Lock()
        self._stopped = False  # no more background passes; one in flight ends soon
        self._broken = False  # a pass failed: the finish hashes from the start
        self._pending = False  # a pass is queued or running (touched on the loop only)

    @property
    def hashed_upto(self) -> int:
        """The file offset hashed so far (a hint: a pass may be moving it)."""
        return self._running.position

    def request(self, good: int) -> None:
        """On the event loop: hash up to ``good`` in a worker thread, once it moved enough.

        Never blocks: at most one pass is queued or running per file.
        """
        if self._pending or self._stopped or self._broken:
            return
        if good - self._running.position < HASH_STEP:
            return
        self._pending = True
        future = asyncio.get_running_loop().run_in_executor(None, self.advance, good)
        future.add_done_callback(self._pass_ended)

    def _pass_ended(self, future: asyncio.Future[None]) -> None:
        self._pending = False
        if not future.cancelled():
            future.exception()  # advance() keeps its errors; nothing to report here

    def advance(self, good: int) -> None:
        """Blocking (a worker thread): hash the prefix up to ``good``, unless stopped.

        A failed read only costs the head start: the finish then hashes everything.
        """
        with self._lock:
            if self._stopped or self._broken:
                return
            try:
                fd = os.open(self._path, os.O_RDONLY)
            except OSError:
                self._broken = True
                return
            try:
                self._running.feed(path_reader(fd), good, lambda: self._stopped)
            except OSError:
                self._broken = True
            finally:
                os.close(fd)

    def stop(self) -> None:
        """No more background passes (the file is finishing, failed, or the session ends)."""
        self._stopped = True

    def finish(self, end: int | None = None) -> FileDigests:
        """Blocking: the digests of ``[start, end)`` (None: to the file's current end),
        reading only what background passes have not hashed."""
        self._stopped = True
        with self._lock:
            fd = os.open(self._path, os.O_RDONLY)
            try:
                if end is None:
                    end = os.fstat(fd).st_size
                if self._broken or self._running.position > end:
                    self._running = RunningDigests(self._algorithm, self._start)
                    self._broken = False
                self._running.feed(path_reader(fd), end)
                return self._running.result()
            finally:
                os.close(fd)
