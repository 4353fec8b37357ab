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

A file split over the sessions of a multi_session job (engine/multisession.py) is received as
byte ranges into one shared partial. Each range keeps its own checkpoint,
``NAME.partial.slipstream-ckpt.OFFSET`` (the good prefix of ``[OFFSET, end)``), and the ranges
of a file meet in :class:`RangeRecord`, ``NAME.partial.ranges``: the verdict the first range
took, which ranges are verified, and who renames.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from slipstream.engine.blockio import open_nofollow, refuse_symlink
from slipstream.errors import FileIOError

CKPT_SUFFIX = ".slipstream-ckpt"
RANGES_SUFFIX = ".ranges"
RANGES_VERSION = 1
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
T = TypeVar("T")


@dataclass(frozen=True)
class FileIdentity:
    """What identifies a file's version without reading it."""

    size: int
    mtime_ns: int


# --- the checkpoint sidecar ---------------------------------------------------------------


def checkpoint_path(partial: Path, piece_offset: int | None = None) -> Path:
    """The sidecar of a whole file, or (``piece_offset``) of one range of a split file."""
    suffix = CKPT_SUFFIX if piece_offset is None else f"{CKPT_SUFFIX}.{piece_offset}"
    return partial.with_name(partial.name + suffix)


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


def read_checkpoint(partial: Path, piece_offset: int | None = None) -> CheckpointRecord | None:
    """The sidecar of ``partial`` if it is intact and the partial really holds its prefix.

    Every receiver asks this before it places a file, so it is also where a symbolic link
    in place of the partial or of the sidecar is refused: OSError ELOOP (DocrootViolation
    through ``os_error_to_slipstream``), before anything reads or writes through it.
    """
    refuse_symlink(partial)
    try:
        fd = open_nofollow(checkpoint_path(partial, piece_offset), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise
        return None
    try:
        record = CheckpointRecord.decode(os.read(fd, RECORD_SIZE * 2))
        partial_size = os.lstat(partial).st_size
    except OSError:
        return None
    finally:
        os.close(fd)
    if record is None or partial_size < record.good:
        return None  # the partial was cut short behind our back
    return record


def remove_checkpoint(partial: Path) -> None:
    checkpoint_path(partial).unlink(missing_ok=True)


def remove_split_sidecars(partial: Path) -> None:
    """Every range checkpoint of ``partial`` (whatever the layout was) and its range record."""
    prefix = checkpoint_path(partial).name + "."
    with contextlib.suppress(OSError):
        for name in os.listdir(partial.parent):
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                (partial.parent / name).unlink(missing_ok=True)
    ranges_path(partial).unlink(missing_ok=True)


class CheckpointWriter:
    """Keeps one file's sidecar up to date while it is being received.

    The descriptor stays open and the record is rewritten in place, so a checkpoint is one
    ``pwrite``. A process killed with -9 loses nothing the kernel already accepted, which is
    all a resume needs (a power failure is caught by the whole-file digest instead).
    """

    def __init__(
        self, partial: Path, source: FileIdentity, good: int, piece_offset: int | None = None
    ) -> None:
        self.path = checkpoint_path(partial, piece_offset)
        self._source = source
        self._fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o600)
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
    resume: str,
    record: CheckpointRecord | None,
    src: FileIdentity,
    start: int = 0,
    end: int | None = None,
) -> PartialDecision:
    """Trust the checkpointed prefix of a partial file, or start over (offset ``start``).

    The record must describe a source of the same size. attributes also needs the same
    mtime; the checksum policies instead compare the content of the prefix (sampled or
    whole) with the source, so a touched but unchanged source still resumes. A range
    ``[start, end)`` of a split file has its own record, whose prefix begins at ``start``.
    """
    end = src.size if end is None else end
    if resume == "none" or record is None or record.size != src.size:
        return PartialDecision(start)
    if not start < record.good <= end:
        return PartialDecision(start)
    if resume == "attributes":
        return PartialDecision(record.good if record.mtime_ns == src.mtime_ns else start)
    samples = sample_ranges(record.good - start, resume)
    return PartialDecision(record.good, tuple((start + o, n) for o, n in samples))


# --- the range record of a split file --------------------------------------------------------


def ranges_path(partial: Path) -> Path:
    return partial.with_name(partial.name + RANGES_SUFFIX)


@dataclass(frozen=True)
class Settled:
    """What :meth:`RangeRecord.settle` tells the range that called it."""

    last: bool  # this call completed the file: the caller renames it (exactly one does)
    ranges: tuple[tuple[int, int, str], ...] = ()  # (offset, length, digest), when last


class RangeRecord:
    """``NAME.partial.ranges``: where the ranges of one split file meet.

    A small JSON document, read and rewritten whole under ``flock`` by each range's receiver
    (sessions of one server process, or the processes of a downloading client; flock locks
    belong to the open file, so both cases exclude each other). It holds, for the job that
    wrote it (``job``: every session of a job shares the id):

    * ``verdict``: what the first range to decide chose, ``""`` (transfer) or the skip reason;
      every later range of the job follows it, whatever it would have decided itself;
    * ``settled``: ``[offset, length, digest]`` of each range verified (or skipped);
    * ``last``: set by the range whose settling made them cover the file, the one that renames;
    * ``failed``: a range of this job failed (the file is counted failed once).

    A record of another job (an interrupted earlier run) is reset on first touch: a rerun
    decides afresh, and its ranges resume from their checkpoints instead. Lock holders never
    wait for anything but the small file, so taking the lock on an event loop is fine.
    """

    def __init__(self, partial: Path, job: str, source: FileIdentity) -> None:
        self.path = ranges_path(partial)
        self._job = job
        self._source = source

    def stamp(self, proposal: str) -> tuple[str, bool]:
        """The verdict for the whole file, and whether it is ours (we decided first)."""

        def change(state: dict[str, Any]) -> tuple[str, bool]:
            if state["verdict"] is not None:
                return str(state["verdict"]), False
            state["verdict"] = proposal
            return proposal, True

        return self._transaction(change)

    def settle(self, offset: int, length: int, digest: str) -> Settled:
        """Record a verified (or skipped) range; ``last`` for the one that completes the file."""

        def change(state: dict[str, Any]) -> Settled:
            settled = [r for r in state["settled"] if r[0] != offset]
            settled.append([offset, length, digest])
            state["settled"] = sorted(settled)
            if state["last"] or not _covers(state["settled"], self._source.size):
                return Settled(False)
            state["last"] = True
            return Settled(True, tuple((int(o), int(n), str(d)) for o, n, d in state["settled"]))

        return self._transaction(change)

    def note_failure(self) -> bool:
        """Record that a range failed; True for the first failure of this job."""

        def change(state: dict[str, Any]) -> bool:
            first = not state["failed"]
            state["failed"] = True
            return first

        return self._transaction(change)

    def _fresh(self) -> dict[str, Any]:
        return {
            "v": RANGES_VERSION,
            "job": self._job,
            "size": self._source.size,
            "mtime_ns": self._source.mtime_ns,
            "verdict": None,
            "settled": [],
            "last": False,
            "failed": False,
        }

    def _load(self, data: bytes) -> dict[str, Any]:
        fresh = self._fresh()
        try:
            state = json.loads(data)
        except ValueError:
            return fresh
        same = isinstance(state, dict) and all(
            state.get(key) == fresh[key] for key in ("v", "job", "size", "mtime_ns")
        )
        return {**fresh, **state} if same else fresh

    def _transaction(self, change: Callable[[dict[str, Any]], T]) -> T:
        with self._locked() as fd:
            raw = b""
            while chunk := os.pread(fd, 1 << 16, len(raw)):
                raw += chunk
            state = self._load(raw)
            result = change(state)
            data = json.dumps(state, separators=(",", ":")).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock


def _covers(ranges: list[list[Any]], size: int) -> bool:
    position = 0
    for offset, length, _digest in sorted(ranges):
        if offset > position:
            return False
        position = max(position, offset + length)
    return position >= size
