"""Whole-file digests, the user's per-file checksum, and checksums of byte ranges.

The *digest* (xxh3-128, :func:`slipstream.engine.blockio.new_digest`) is what both ends compare
before a file gets its final name. The *checksum* is the spec's ``file_checksum`` (md5, sha1,
sha256, sha384, sha512): reported per file, computed on both ends in the same pass as the
digest so a file is read once for both.

Readers are plain callables ``read(offset, length) -> bytes`` so the same code checksums a
file on disk, a partial file, or the envelope a content-protected upload would produce.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from slipstream.engine.blockio import new_digest

READ_CHUNK = 1 << 20
CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha256", "sha384", "sha512")

Reader = Callable[[int, int], bytes]


def checksum_algorithm(spec_value: str | None) -> str | None:
    """The hashlib name for the spec's ``file_checksum`` (None when off)."""
    return spec_value if spec_value in CHECKSUM_ALGORITHMS else None


@dataclass(frozen=True)
class FileDigests:
    digest: str
    checksum: str | None = None  # hex, when a checksum algorithm was asked for


class RunningDigests:
    """The digest (and checksum) of a file's bytes from ``start`` on, fed in order.

    ``position`` is the file offset hashed up to. :func:`digest_reader` is this fed in one
    pass; a receiver feeds it piecewise while the file arrives (engine/prefix_hash.py).
    Either way the bytes and their order are the same, so the digests are too.
    """

    def __init__(self, algorithm: str | None, start: int = 0) -> None:
        self.position = start
        self._hasher = new_digest()
        self._extra = hashlib.new(algorithm) if algorithm else None

    def feed(self, read: Reader, upto: int, stop: Callable[[], bool] | None = None) -> None:
        """Hash ``[position, upto)`` served by ``read`` (file offsets), a chunk at a time;
        ``stop`` is asked between chunks and ends the pass early when true."""
        while self.position < upto:
            if stop is not None and stop():
                return
            data = read(self.position, min(READ_CHUNK, upto - self.position))
            if not data:
                raise OSError(f"short read at {self.position} of {upto}")
            self._hasher.update(data)
            if self._extra is not None:
                self._extra.update(data)
            self.position += len(data)

    def result(self) -> FileDigests:
        checksum = self._extra.hexdigest() if self._extra is not None else None
        return FileDigests(self._hasher.hexdigest(), checksum)


def digest_reader(read: Reader, size: int, algorithm: str | None) -> FileDigests:
    """Digest (and checksum) of ``size`` bytes served by ``read``, in one sequential pass."""
    running = RunningDigests(algorithm)
    running.feed(read, size)
    return running.result()


def digest_path(path: Path, algorithm: str | None) -> FileDigests:
    """Digest (and checksum) of a whole file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return digest_reader(lambda offset, length: os.pread(fd, length, offset), size, algorithm)
    finally:
        os.close(fd)


def range_sums(read: Reader, ranges: list[tuple[int, int]]) -> list[str]:
    """An xxh3-128 hex digest per ``(offset, length)`` range (for resume comparisons)."""
    sums: list[str] = []
    for offset, length in ranges:
        hasher = xxhash.xxh3_128()
        position, end = offset, offset + length
        while position < end:
            data = read(position, min(READ_CHUNK, end - position))
            if not data:
                break  # shorter than asked: the digest then differs from the peer's
            hasher.update(data)
            position += len(data)
        sums.append(hasher.hexdigest())
    return sums


def path_reader(fd: int) -> Reader:
    return lambda offset, length: os.pread(fd, length, offset)


def range_sums_of_path(path: Path, ranges: list[tuple[int, int]]) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return range_sums(path_reader(fd), ranges)
    finally:
        os.close(fd)


def total_length(ranges: list[tuple[int, int]]) -> int:
    return sum(length for _, length in ranges)
