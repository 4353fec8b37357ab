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


def digest_reader(read: Reader, size: int, algorithm: str | None) -> FileDigests:
    """Digest (and checksum) of ``size`` bytes served by ``read``, in one sequential pass."""
    hasher = new_digest()
    extra = hashlib.new(algorithm) if algorithm else None
    position = 0
    while position < size:
        data = read(position, min(READ_CHUNK, size - position))
        if not data:
            raise OSError(f"short read at {position} of {size}")
        hasher.update(data)
        if extra is not None:
            extra.update(data)
        position += len(data)
    return FileDigests(hasher.hexdigest(), extra.hexdigest() if extra is not None else None)


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
