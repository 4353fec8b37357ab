"""Resume and overwrite decisions, and the checkpoint sidecar that makes resuming possible.

A file in flight is written as ``NAME.partial``. For files of at least
:data:`CHECKPOINT_MIN_SIZE` the receiver keeps ``NAME.partial.slipstream-ckpt`` next to it: one
fixed-size record naming the source the partial belongs to (size and mtime) and how many bytes
from the start are known good. "Known good" means every block below that offset arrived
authenticated and was written; it is the contiguous received prefix, so it is one number and
cheap to update (one ``pwrite`` into an open descriptor).

When the same file is announced again, :func:`decide_partial` says whether that prefix can be
trusted under the spec's ``resume`` policy, and :func:`decide_existing` applies the
``overwrite`` policy to a complete file already at the destination. Both are pure functions
of what was announced and what is on disk; where the answer needs checksums of both ends
they return ``COMPARE`` with the byte ranges to compare, and the session asks the sender.

Trusting a prefix never replaces verification: the receiver renames a file only when the
digest of the *whole* file matches the sender's, resumed or not.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import xxhash

from slipstream.errors import FileIOError

CKPT_SUFFIX = ".slipstream-ckpt"
CHECKPOINT_MIN_SIZE = 1 << 20  # smaller files are cheaper to re-send than to checkpoint
RECORD_SIZE = 256  # the record is padded to this size and rewritten in place
CHECKPOINT_VERSION = 1
# Sparse checksums: below this size the whole range is compared (it costs about as much
# as the samples); above it, SPARSE_SAMPLES ranges of SPARSE_SAMPLE_BYTES spread evenly.
SPARSE_WHOLE_LIMIT = 4 << 20
SPARSE_SAMPLES = 16
SPARSE_SAMPLE_BYTES = 64 << 10
# Complete files compare modification times to the second: some file systems keep no more.
MTIME_TOLERANCE_NS = 1_000_000_000

ByteRange = tuple[int, int]  # (offset, length)


@dataclass(frozen=True)
class FileIdentity:
    """What identifies a file's version without reading it."""

    size: int
    mtime_ns: int


# --- the checkpoint sidecar ---------------------------------------------------------------


def checkpoint_path(partial: Path) -> Path:
    return partial.with_name(partial.name + CKPT_SUFFIX)


@dataclass(frozen=True)
class CheckpointRecord:
    """The sidecar's content: the source's identity and the good prefix of the partial."""

    size: int
    mtime_ns: int
    good: int

    def encode(self) -> bytes:
        body = {"v": CHECKPOINT_VERSION, "size": self.size, "mtime_ns": self.mtime_ns}
        body["good"] = self.good
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        # The checksum makes a torn or hand-edited record read as "no checkpoint", which
        # costs a re-send, never a wrong file.
        line = json.dumps({"rec": text, "sum": xxhash.xxh3_64_hexdigest(text.encode())})
        data = line.encode()
        if len(data) >= RECORD_SIZE:
            raise ValueError("checkpoint record too long")
        return data + b"\n" + b" " * (RECORD_SIZE - len(data) - 1)

    @classmethod
    def decode(cls, data: bytes) -> CheckpointRecord | None:
        """The record, or None for anything that is not an intact record of this version."""
        try:
            outer = json.loads(data.decode().strip())
            text = outer["rec"]
            if xxhash.xxh3_64_hexdigest(text.encode()) != outer["sum"]:
                return None
            body = json.loads(text)
            if body.get("v") != CHECKPOINT_VERSION:
                return None
            record = cls(int(body["size"]), int(body["mtime_ns"]), int(body["good"]))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            return None
        if record.size < 0 or not 0 <= record.good <= record.size:
            return None
        return record


def read_checkpoint(partial: Path) -> CheckpointRecord | None:
    """The sidecar of ``partial`` if it is intact and the partial really holds its prefix."""
    try:
        with open(checkpoint_path(partial), "rb") as handle:
            record = CheckpointRecord.decode(handle.read(RECORD_SIZE * 2))
        partial_size = partial.stat().st_size
    except OSError:
        return None
    if record is None or partial_size < record.good:
        return None  # the partial was cut short behind our back
    return record


def remove_checkpoint(partial: Path) -> None:
    checkpoint_path(partial).unlink(missing_ok=True)


class CheckpointWriter:
    """Keeps one file's sidecar up to date while it is being received.

    The descriptor stays open and the record is rewritten in place, so a checkpoint is one
    ``pwrite``. A process killed with -9 loses nothing the kernel already accepted, which is
    all a resume needs (a power failure is caught by the whole-file digest instead).
    """

    def __init__(self, partial: Path, source: FileIdentity, good: int) -> None:
        self.path = checkpoint_path(partial)
        self._source = source
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Two sessions writing one partial would interleave two sources: the second
            # one is refused (the kernel drops the lock when a process dies, even by -9).
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise FileIOError(
                f"{partial.name} is being received by another transfer right now"
            ) from None
        self.good = -1
        self.write(good)

    def write(self, good: int) -> None:
        if good == self.good or self._fd < 0:
            return
        record = CheckpointRecord(self._source.size, self._source.mtime_ns, good)
        os.pwrite(self._fd, record.encode(), 0)
        self.good = good

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


# --- comparisons ---------------------------------------------------------------------------


def sample_ranges(length: int, policy: str) -> list[ByteRange]:
    """The byte ranges of ``[0, length)`` whose checksums the ``policy`` compares."""
    if length <= 0 or policy not in ("sparse_checksum", "full_checksum"):
        return []
    if policy == "full_checksum" or length <= SPARSE_WHOLE_LIMIT:
        return [(0, length)]
    last_start = length - SPARSE_SAMPLE_BYTES
    starts = [last_start * index // (SPARSE_SAMPLES - 1) for index in range(SPARSE_SAMPLES)]
    return [(start, SPARSE_SAMPLE_BYTES) for start in starts]


class Verdict(Enum):
    REPLACE = "replace"  # transfer the file (over what is there)
    SKIP = "skip"  # leave the destination alone
    COMPARE = "compare"  # sizes agree: checksums of ``ranges`` decide identical or not


@dataclass(frozen=True)
class ExistingDecision:
    verdict: Verdict
    reason: str = ""  # why a file is skipped (reported in events)
    ranges: tuple[ByteRange, ...] = ()


def _same_attributes(dest: FileIdentity, src: FileIdentity) -> bool:
    return dest.size == src.size and abs(dest.mtime_ns - src.mtime_ns) < MTIME_TOLERANCE_NS


def decide_existing(
    overwrite: str, resume: str, dest: FileIdentity, src: FileIdentity
) -> ExistingDecision:
    """What to do with a complete file already at the destination.

    ``diff`` means "different by the resume policy's test": none never finds two files the
    same, attributes compares size and mtime, the checksum policies compare size and then
    content. ``older`` replaces only a destination strictly older than the source, and
    ``diff+older`` needs both. A COMPARE verdict resolves to SKIP("identical") when the
    checksums agree and REPLACE otherwise.
    """
    if overwrite == "never":
        return ExistingDecision(Verdict.SKIP, "exists")
    if overwrite == "always":
        return ExistingDecision(Verdict.REPLACE)
    older = dest.mtime_ns < src.mtime_ns
    if overwrite == "older":
        return ExistingDecision(
            Verdict.REPLACE if older else Verdict.SKIP, "" if older else "newer"
        )
    if overwrite == "diff+older" and not older:
        return ExistingDecision(Verdict.SKIP, "newer")
    return _diff_decision(resume, dest, src)


def _diff_decision(resume: str, dest: FileIdentity, src: FileIdentity) -> ExistingDecision:
    if resume == "none":
        return ExistingDecision(Verdict.REPLACE)
    if resume == "attributes":
        same = _same_attributes(dest, src)
        return (
            ExistingDecision(Verdict.SKIP, "identical")
            if same
            else ExistingDecision(Verdict.REPLACE)
        )
    if dest.size != src.size:
        return ExistingDecision(Verdict.REPLACE)
    ranges = tuple(sample_ranges(src.size, resume))
    if not ranges:  # two empty files
        return ExistingDecision(Verdict.SKIP, "identical")
    return ExistingDecision(Verdict.COMPARE, "identical", ranges)


@dataclass(frozen=True)
class PartialDecision:
    """Whether to continue a partial file: from ``offset`` (0 = start over)."""

    offset: int
    ranges: tuple[ByteRange, ...] = ()  # non-empty: resume only if these checksums agree


def decide_partial(
    resume: str, record: CheckpointRecord | None, src: FileIdentity
) -> PartialDecision:
    """Trust the checkpointed prefix of a partial file, or start over.

    The record must describe a source of the same size. attributes also needs the same
    mtime; the checksum policies instead compare the content of the prefix (sampled or
    whole) with the source, so a touched but unchanged source still resumes.
    """
    if resume == "none" or record is None or record.size != src.size or record.good <= 0:
        return PartialDecision(0)
    if resume == "attributes":
        return PartialDecision(record.good if record.mtime_ns == src.mtime_ns else 0)
    return PartialDecision(record.good, tuple(sample_ranges(record.good, resume)))
