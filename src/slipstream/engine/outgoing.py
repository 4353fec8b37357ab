"""The sending side's file semantics: what a FILE announcement carries, envelopes made on the
fly, whole-file digests computed off the event loop, and names hidden from the server.

:class:`SendDriver` (engine/send_driver.py) runs the control exchange; this module holds the
parts that do not need the control channel, so they can be tested alone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream.engine.blockio import FileSlot, SlotIndex, new_digest, os_error_to_slipstream
from slipstream.engine.digests import FileDigests, checksum_algorithm, digest_reader, path_reader
from slipstream.engine.disposition import SourceDisposer, archive_root
from slipstream.engine.envelope import (
    DEFAULT_EXTENSION,
    HEADER_SIZE,
    ChunkCipher,
    EnvelopeHeader,
    EnvelopeView,
    Keyring,
    envelope_size,
    plain_file_reader,
)
from slipstream.engine.paths import SourceEntry
from slipstream.errors import FileIOError, SlipstreamError
from slipstream.spec import TransferSpec

OnHashed = Callable[..., None]  # (file_id, digest, checksum=None)
READ_AHEAD = 4 << 20  # bytes of each file the scanning thread asks the kernel to preload


@dataclass
class SendOptions:
    """What the sender does besides reading bytes (all off by default)."""

    checksum: str | None = None  # file_checksum algorithm
    preserve_atime: bool = False  # announce the source's access time
    keyring: Keyring | None = None  # encrypt every file on the fly (client uploads)
    extension: str = DEFAULT_EXTENSION
    attach_headers: bool = False  # download + decrypt: FILE carries each envelope's header
    obfuscate: bool = False  # upload under random names (client uploads)
    disposer: SourceDisposer = field(default_factory=SourceDisposer)

    @classmethod
    def from_spec(
        cls, spec: TransferSpec, *, local: bool, base_dir: Path, docroot: Path | None = None
    ) -> SendOptions:
        """``local``: this process is the client (an upload), which alone holds secrets."""
        encrypt = local and spec.content_protection == "encrypt"
        passphrase = spec.content_protection_passphrase
        delete_source = bool(spec.delete_source)
        archive = spec.move_after_transfer
        return cls(
            checksum=checksum_algorithm(spec.file_checksum),
            preserve_atime=bool(spec.preserve_times or spec.preserve_access_time),
            keyring=Keyring(passphrase or "") if encrypt else None,
            extension=envelope_extension(spec),
            attach_headers=spec.content_protection == "decrypt",
            obfuscate=local and bool(spec.obfuscate_file_names),
            disposer=SourceDisposer(
                remove=bool(spec.remove_after_transfer) or delete_source,
                archive=archive_root(archive, base_dir, docroot) if archive else None,
                remove_empty_dirs=bool(spec.remove_empty_directories) or delete_source,
                remove_top_dirs=bool(spec.remove_empty_source_directory) or delete_source,
                remove_skipped=bool(spec.remove_skipped),
            ),
        )


def envelope_extension(spec: TransferSpec) -> str:
    from slipstream.engine.envelope import check_extension

    value = getattr(spec, "content_protection_extension", None)
    return check_extension(value) if value else DEFAULT_EXTENSION


@dataclass(frozen=True)
class Announcement:
    """One source file, ready to be announced (prepared in the scanning thread)."""

    entry: SourceEntry
    atime_ns: int | None = None
    env_header: bytes | None = None  # the envelope header of a file sent for decryption


def prepare_announcement(entry: SourceEntry, options: SendOptions) -> SourceEntry | Announcement:
    """What a FILE message needs beyond the listing, done in the scanning thread."""
    if entry.kind != "file":
        return entry
    atime = None
    header = None
    try:
        if options.preserve_atime:
            atime = os.stat(entry.local_path).st_atime_ns  # before anything reads it
        fd = os.open(entry.local_path, os.O_RDONLY)
        try:
            # Start the disk read now, in this thread: when the event loop reads the file
            # to send it, the data is (being) loaded. Opening overlaps with sending.
            os.posix_fadvise(fd, 0, min(entry.size, READ_AHEAD), os.POSIX_FADV_WILLNEED)
            if options.attach_headers and entry.rel_path.endswith(options.extension):
                header = os.pread(fd, HEADER_SIZE, 0)
        finally:
            os.close(fd)
    except OSError:
        pass  # the read for sending reports a vanished or unreadable file properly
    return Announcement(entry, atime, header if header and len(header) == HEADER_SIZE else None)


class NameObfuscator:
    """Random names for uploads, consistent within a session; the mapping stays with us."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def _random(self) -> str:
        return secrets.token_hex(12)

    def stored(self, rel: str, is_dir: bool) -> str:
        parent, _, _name = rel.rpartition("/")
        prefix = self._dirs.get(parent, "") if parent else ""
        if parent and not prefix:
            prefix = self.stored(parent, True)
        name = self._random()
        stored = f"{prefix}/{name}" if prefix else name
        if is_dir:
            self._dirs[rel] = stored
        return stored


# --- envelopes made on the fly -------------------------------------------------------------------


@dataclass
class _EnvelopeFile:
    slot: FileSlot
    fd: int
    view: EnvelopeView
    hasher: Any = None
    checksum: Any = None
    hashed_upto: int = 0


class EnvelopeBlockSource:
    """The sender's block source for content-protected uploads.

    Same role as :class:`~slipstream.engine.blockio.FileBlockSource`, but the bytes of a file's
    blocks are those of its envelope, sealed chunk by chunk as the blocks are asked for (a
    few sealed chunks are cached for retransmissions). The first, sequential pass also
    digests the envelope, as the plain source does for plain files.
    """

    def __init__(self, block_payload: int, on_hashed: OnHashed, keyring: Keyring) -> None:
        self._payload = block_payload
        self._on_hashed = on_hashed
        self._keyring = keyring
        self._index = SlotIndex()
        self._files: dict[int, _EnvelopeFile] = {}
        self.checksum: str | None = None  # set by the driver: file_checksum algorithm

    def register(
        self,
        slot: FileSlot,
        path: Path,
        plain_size: int,
        header: tuple[EnvelopeHeader, bytes] | None = None,
    ) -> None:
        """Start serving a file; ``header`` (and its key) continues an earlier envelope."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error_to_slipstream(exc, path, "read") from exc
        head, key = header if header is not None else self._keyring.new_header(plain_size)
        view = EnvelopeView(ChunkCipher(head, key), plain_file_reader(fd), name=path.name)
        if view.size != slot.size:
            os.close(fd)
            raise FileIOError(f"{path} changed size while it was being sent")
        record = _EnvelopeFile(slot, fd, view)
        if slot.offset == 0:  # resumed envelopes are digested whole by the hashing worker
            record.hasher = new_digest()
            record.checksum = _new_checksum(self.checksum)
        self._files[slot.file_id] = record
        self._index.add(slot)
        if slot.count == 0 and record.hasher is not None:
            self._finish(record)

    def read_block(self, block: int) -> bytes:
        slot = self._index.find(block)
        if slot is None:
            raise KeyError(f"block {block} belongs to no registered file")
        record = self._files[slot.file_id]
        position = slot.offset + (block - slot.first_block) * self._payload
        data = record.view.read(position, self._payload)
        if record.hasher is not None and position == record.hashed_upto:
            record.hasher.update(data)
            if record.checksum is not None:
                record.checksum.update(data)
            record.hashed_upto += len(data)
            if record.hashed_upto >= slot.size:
                self._finish(record)
        return data

    def _finish(self, record: _EnvelopeFile) -> None:
        digest = record.hasher.hexdigest()
        checksum = record.checksum.hexdigest() if record.checksum is not None else None
        record.hasher = record.checksum = None
        self._on_hashed(record.slot.file_id, digest, checksum)

    def release(self, file_id: int) -> None:
        record = self._files.pop(file_id, None)
        if record is not None:
            os.close(record.fd)

    def close(self) -> None:
        for record in self._files.values():
            os.close(record.fd)
        self._files.clear()


def _new_checksum(algorithm: str | None) -> Any:
    import hashlib

    return hashlib.new(algorithm) if algorithm else None


def announced_size(entry: SourceEntry, options: SendOptions) -> int:
    return envelope_size(entry.size) if options.keyring is not None else entry.size


# --- whole-file digests off the event loop ------------------------------------------------------


class HashWorker:
    """Digests whole files in one background thread (resumed files, file_checksum).

    A resumed file's digest must still cover the whole file, including the prefix the
    receiver already had, and file_checksum needs a second hash: both are a sequential read
    done here, while the event loop keeps sending.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(
        self,
        job: Callable[[], FileDigests],
        done: Callable[[FileDigests | None, SlipstreamError | None], None],
    ) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-hash")
        loop = asyncio.get_running_loop()
        future: Future[FileDigests] = self._pool.submit(job)

        def finished(result: Future[FileDigests]) -> None:
            error = result.exception()
            if error is None:
                loop.call_soon_threadsafe(done, result.result(), None)
                return
            if not isinstance(error, SlipstreamError):
                error = FileIOError(f"Could not read the source to digest it: {error}")
            loop.call_soon_threadsafe(done, None, error)

        future.add_done_callback(finished)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def plain_digest_job(
    path: Path, algorithm: str | None, span: tuple[int, int] | None = None
) -> Callable[[], FileDigests]:
    """The whole file's digests, or (``span`` = (start, end)) a split file's range's."""

    def job() -> FileDigests:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error_to_slipstream(exc, path, "read") from exc
        try:
            if span is None:
                return digest_reader(path_reader(fd), os.fstat(fd).st_size, algorithm)
            start, end = span
            read = path_reader(fd)
            return digest_reader(lambda at, n: read(start + at, n), end - start, algorithm)
        finally:
            os.close(fd)

    return job


def envelope_digest_job(
    path: Path, header: EnvelopeHeader, key: bytes, algorithm: str | None
) -> Callable[[], FileDigests]:
    def job() -> FileDigests:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error_to_slipstream(exc, path, "read") from exc
        try:
            view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd), name=path.name)
            return digest_reader(view.read, view.size, algorithm)
        finally:
            os.close(fd)

    return job


class LruDict(OrderedDict[int, Any]):
    """A small bounded mapping (peer-supplied envelope headers awaiting READY)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def put(self, key: int, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self._limit:
            self.popitem(last=False)
