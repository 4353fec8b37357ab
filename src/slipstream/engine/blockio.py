"""File bytes <-> global block numbers, on both ends of a session.

Every file of a session occupies a contiguous run of the session's global block sequence
(``FileSlot``). The receiver fixes the run when it answers READY, and the sender appends the
same run to its stream in the same order, so both sides agree without ever sending the
mapping with the data (see docs/protocol.md).

The sender reads files in chunks of many blocks (one syscall per chunk instead of per block)
and hashes each file during its first, sequential read; the receiver writes each block where
it belongs and counts what is still missing.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from slipstream.errors import (
    DiskFull,
    DocrootViolation,
    FileIOError,
    PermissionDenied,
    SourceNotFound,
)

CHUNK_BLOCKS = 64  # blocks per read syscall on the sender; ~90 KB at the default size
CACHED_CHUNKS = 4
WRITE_RUN_BYTES = 1 << 20  # the receiver writes contiguous blocks in runs up to this size
MAX_OPEN_FILES = 64  # descriptors kept open per side; small files are many, fds are not


def new_digest() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def file_digest(path: Path, *, chunk: int = 1 << 20) -> str:
    """The end-to-end digest both sides compare before a file gets its final name."""
    hasher = new_digest()
    with open(path, "rb", buffering=0) as handle:
        while data := handle.read(chunk):
            hasher.update(data)
    return hasher.hexdigest()


@dataclass
class FileSlot:
    """One file's run in the global block sequence."""

    file_id: int
    first_block: int
    count: int
    offset: int  # file offset of the first block (non-zero when resuming)
    size: int

    @property
    def end_block(self) -> int:
        return self.first_block + self.count


class SlotIndex:
    """Find the slot holding a global block. Slots are appended in block order."""

    def __init__(self) -> None:
        self._firsts: list[int] = []
        self._slots: list[FileSlot] = []

    def add(self, slot: FileSlot) -> None:
        if self._slots and slot.first_block < self._slots[-1].end_block:
            raise ValueError("slots must be appended in block order")
        if slot.count:
            self._firsts.append(slot.first_block)
            self._slots.append(slot)

    def find(self, block: int) -> FileSlot | None:
        index = bisect.bisect_right(self._firsts, block) - 1
        if index < 0:
            return None
        slot = self._slots[index]
        return slot if block < slot.end_block else None


class _FdCache:
    """A bounded LRU of open file descriptors keyed by file id."""

    def __init__(self, opener: Callable[[int], int]) -> None:
        self._opener = opener
        self._fds: OrderedDict[int, int] = OrderedDict()

    def get(self, file_id: int) -> int:
        fd = self._fds.get(file_id)
        if fd is not None:
            self._fds.move_to_end(file_id)
            return fd
        if len(self._fds) >= MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        fd = self._opener(file_id)
        self._fds[file_id] = fd
        return fd

    def close(self, file_id: int) -> None:
        fd = self._fds.pop(file_id, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- the receiver's files: never through a symbolic link -------------------------------------


def open_nofollow(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symbolic link as the last component of ``path``.

    Every file a receiver creates, writes or truncates (``NAME.partial``, the checkpoint
    sidecars, a split file's ``.ranges`` record, decrypted temporaries) is opened through
    this, so a link left in the destination under one of those names (``X.partial`` -> a
    file outside the docroot) fails the open with ELOOP instead of being written through;
    :func:`os_error_to_slipstream` turns that ELOOP into :class:`DocrootViolation` naming
    the link. The folders above are the resolver's business (engine/paths.py keeps them
    inside the docroot, links followed only while they stay inside).
    """
    return os.open(path, flags | os.O_NOFOLLOW, mode)


def truncate_nofollow(path: Path | str, size: int) -> None:
    """``os.truncate`` (which follows links) for a receiver's file: the same refusal as
    :func:`open_nofollow`. The file must exist."""
    fd = open_nofollow(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def refuse_symlink(path: Path) -> None:
    """Raise the ELOOP :func:`open_nofollow` would if ``path`` is a symbolic link (for a
    receiver's file that is looked at, or read, before it is opened for writing)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))


def symlink_refused(name: str, action: str = "write") -> DocrootViolation:
    """The error for a receiver's file that turned out to be a symbolic link. Only the
    file's name appears: on a server the message goes to the peer, which must not learn
    the server's layout."""
    return DocrootViolation(
        f"{name} is a symbolic link: refused to {action} through it",
        internal_message=f"{name}: a symbolic link where a receiver's own file belongs "
        "(opened with O_NOFOLLOW)",
    )


def os_error_to_slipstream(exc: OSError, path: Path, action: str) -> Exception:
    """Turn an OSError into the typed error a user can act on.

    ELOOP (a symbolic link refused by :func:`open_nofollow`) names the link itself, from
    the error's file name, whatever ``path`` the caller reports the file under."""
    where = f"{action} {path}"
    if exc.errno == errno.ELOOP:
        named = isinstance(exc.filename, str | bytes) and exc.filename
        name = os.path.basename(os.fsdecode(exc.filename)) if named else path.name
        return symlink_refused(name, action)
    if exc.errno == errno.ENOENT:
        return SourceNotFound(f"No such file: {path}", internal_message=f"{where}: {exc}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"Permission denied: {path}", internal_message=f"{where}: {exc}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"No space left on device while writing {path}", internal_message=f"{where}: {exc}"
        )
    return FileIOError(f"Could not {action} {path}: {exc.strerror}", internal_message=str(exc))


@dataclass
class _SourceFile:
    slot: FileSlot
    path: Path
    hasher: xxhash.xxh3_128 | None = field(default_factory=new_digest)
    hashed_upto: int = 0  # bytes of the file hashed so far (sequential first pass)


class FileBlockSource:
    """The sender's view of the files: payload bytes for any registered block."""

    def __init__(self, block_payload: int, on_hashed: Callable[[int, str], None]) -> None:
        self._payload = block_payload
        self._on_hashed = on_hashed
        self._index = SlotIndex()
        self._files: dict[int, _SourceFile] = {}
        self._fds = _FdCache(self._open)
        # The latest chunks read, keyed by (file id, first block of the chunk): one for new
        # data and a few for retransmissions, which cluster in recent chunks.
        self._chunks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        # The chunk read last, as (first block, end block, bytes): most reads land in it.
        self._hot: tuple[int, int, memoryview] = (0, 0, memoryview(b""))

    def _open(self, file_id: int) -> int:
        path = self._files[file_id].path
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error_to_slipstream(exc, path, "read") from exc

    def register(self, slot: FileSlot, path: Path, hash_from: int = 0) -> None:
        """Make a file's blocks readable; a zero-block file is hashed at once.

        ``hash_from``: where the bytes to digest begin (a split file's range sends and
        digests ``[hash_from, slot.size)``)."""
        source = _SourceFile(slot, path, hashed_upto=hash_from)
        if slot.offset != hash_from:
            source.hasher = None  # resumed: the receiver hashes the whole file itself
        self._files[slot.file_id] = source
        self._index.add(slot)
        if slot.count == 0:
            self._finish_hash(source)

    def read_block(self, block: int) -> memoryview:
        start, end, view = self._hot
        if start <= block < end:  # the common case: the next block of the current chunk
            offset = (block - start) * self._payload
            return view[offset : offset + self._payload]
        return self._read_cold(block)

    def _read_cold(self, block: int) -> memoryview:
        slot = self._index.find(block)
        if slot is None:
            raise KeyError(f"block {block} belongs to no registered file")
        # Chunks are aligned to the file's first block, so the first pass reads each chunk
        # exactly once, in order, whatever retransmissions read in between.
        start = slot.first_block + (block - slot.first_block) // CHUNK_BLOCKS * CHUNK_BLOCKS
        key = (slot.file_id, start)
        data = self._chunks.get(key)
        if data is None:
            data = self._read_chunk(slot, start)
            self._chunks[key] = data
            if len(self._chunks) > CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        view = memoryview(data)
        self._hot = (start, start + -(-len(data) // self._payload), view)
        offset = (block - start) * self._payload
        return view[offset : offset + self._payload]

    def _read_chunk(self, slot: FileSlot, start: int) -> bytes:
        source = self._files[slot.file_id]
        count = min(CHUNK_BLOCKS, slot.end_block - start)
        position = slot.offset + (start - slot.first_block) * self._payload
        length = min(count * self._payload, slot.size - position)
        try:
            data = os.pread(self._fds.get(slot.file_id), length, position)
        except OSError as exc:
            raise os_error_to_slipstream(exc, source.path, "read") from exc
        if len(data) != length:
            raise FileIOError(
                f"{source.path} shrank while it was being sent",
                internal_message=f"short read at {position}: {len(data)} of {length}",
            )
        self._hash_sequential(source, position, data)
        return data

    def _hash_sequential(self, source: _SourceFile, position: int, data: bytes) -> None:
        # New data is read in block order, so the first pass over a file hashes it whole
        # without a second read; retransmissions (position behind) are not hashed again.
        if source.hasher is None or position != source.hashed_upto:
            return
        source.hasher.update(data)
        source.hashed_upto += len(data)
        if source.hashed_upto >= source.slot.size:
            self._finish_hash(source)
            self._fds.close(source.slot.file_id)

    def _finish_hash(self, source: _SourceFile) -> None:
        digest = source.hasher.hexdigest() if source.hasher is not None else ""
        source.hasher = None
        self._on_hashed(source.slot.file_id, digest)

    def release(self, file_id: int) -> None:
        """The receiver confirmed the file: no more retransmissions will need it."""
        self._fds.close(file_id)

    def close(self) -> None:
        self._fds.close_all()


@dataclass
class _SinkFile:
    slot: FileSlot
    partial: Path
    missing: int


class FileBlockSink:
    """The receiver's view: writes each block at its offset in the file's partial copy."""

    def __init__(self, block_payload: int, on_complete: Callable[[int], None]) -> None:
        self._payload = block_payload
        self._on_complete = on_complete
        self._index = SlotIndex()
        self._files: dict[int, _SinkFile] = {}
        self._fds = _FdCache(self._open)
        self.bytes_written = 0
        # The contiguous run being gathered: its file, file offset, bytes and next block.
        self._run_sink: _SinkFile | None = None
        self._run_position = 0
        self._run = bytearray()
        self._run_next = -1
        self._run_end = -1

    def _open(self, file_id: int) -> int:
        path = self._files[file_id].partial
        try:
            return open_nofollow(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error_to_slipstream(exc, path, "write") from exc

    def register(self, slot: FileSlot, partial: Path) -> None:
        """Start receiving a file. Its partial copy is created by the first write (O_CREAT),
        or now when no block will come: opening thousands of small files here only for
        the descriptor cache to evict them before their data arrives costs a second open."""
        self._files[slot.file_id] = _SinkFile(slot, partial, slot.count)
        self._index.add(slot)
        if slot.count == 0:
            self._fds.get(slot.file_id)
            self._complete(slot.file_id)

    def write_block(self, block: int, payload: memoryview) -> None:
        # Blocks mostly arrive in order: gather a contiguous run in memory and write it with
        # one pwrite, instead of one syscall per 1.4 KB block.
        if block == self._run_next and len(self._run) < WRITE_RUN_BYTES:
            self._run += payload
            self._run_next = block + 1 if block + 1 < self._run_end else -1
        else:
            self._start_run(block, payload)
        self.bytes_written += len(payload)
        sink = self._run_sink
        assert sink is not None
        sink.missing -= 1
        if sink.missing == 0:
            self.flush()
            self._complete(sink.slot.file_id)

    def _start_run(self, block: int, payload: memoryview) -> None:
        self.flush()
        slot = self._index.find(block)
        if slot is None:
            raise KeyError(f"block {block} belongs to no registered file")
        self._run_sink = self._files[slot.file_id]
        self._run_position = slot.offset + (block - slot.first_block) * self._payload
        self._run = bytearray(payload)
        # A run never crosses into the next file's blocks.
        self._run_end = slot.end_block
        self._run_next = block + 1 if block + 1 < slot.end_block else -1

    def flush(self) -> None:
        """Write the gathered run (before a file is verified, and before closing)."""
        if not self._run:
            return
        sink = self._run_sink
        assert sink is not None
        data, self._run = self._run, bytearray()
        try:
            os.pwrite(self._fds.get(sink.slot.file_id), data, self._run_position)
        except OSError as exc:
            raise os_error_to_slipstream(exc, sink.partial, "write") from exc
        self._run_position += len(data)

    def _complete(self, file_id: int) -> None:
        self._fds.close(file_id)
        self._on_complete(file_id)

    def forget(self, file_id: int) -> None:
        if self._run_sink is not None and self._run_sink.slot.file_id == file_id:
            self._run, self._run_next = bytearray(), -1
        self._fds.close(file_id)
        self._files.pop(file_id, None)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._fds.close_all()
