"""Resume and overwrite decisions, and the checkpoint sidecar, without a network."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from slipstream.engine.resume import (
    RECORD_SIZE,
    SPARSE_SAMPLE_BYTES,
    SPARSE_SAMPLES,
    CheckpointRecord,
    CheckpointWriter,
    FileIdentity,
    Verdict,
    checkpoint_path,
    decide_existing,
    decide_partial,
    read_checkpoint,
    sample_ranges,
)
from slipstream.errors import FileIOError

RESUMES = ("none", "attributes", "sparse_checksum", "full_checksum")
OVERWRITES = ("never", "always", "diff", "older", "diff+older")
SRC = FileIdentity(size=5000, mtime_ns=2_000_000_000_000_000_000)
# Destination states, as the e2e matrix builds them on disk.
STATES = {
    "identical": FileIdentity(5000, SRC.mtime_ns),  # same content too
    "different": FileIdentity(5000, SRC.mtime_ns),  # same size and time, other content
    "older": FileIdentity(4000, SRC.mtime_ns - 10**12),
    "newer": FileIdentity(4000, SRC.mtime_ns + 10**12),
}


def expected_existing(overwrite: str, resume: str, state: str) -> str:
    """The outcome table, written from the Aspera semantics (not from the code)."""
    older = state == "older"
    if overwrite == "never":
        return "skip"
    if overwrite == "always":
        return "replace"
    if overwrite == "older":
        return "replace" if older else "skip"
    if overwrite == "diff+older" and not older:
        return "skip"
    # diff: "different by the resume test"
    if resume == "none":
        return "replace"
    if state in ("older", "newer"):  # sizes differ
        return "replace"
    if resume == "attributes":
        return "skip"  # same size and mtime: attributes cannot tell them apart
    return "compare"  # same size: the checksums decide (identical -> skip)


@pytest.mark.parametrize(
    ("overwrite", "resume", "state"), list(itertools.product(OVERWRITES, RESUMES, STATES))
)
def test_decide_existing_matrix(overwrite: str, resume: str, state: str) -> None:
    decision = decide_existing(overwrite, resume, STATES[state], SRC)
    assert decision.verdict.value == expected_existing(overwrite, resume, state)
    if decision.verdict is Verdict.SKIP:
        assert decision.reason
    if decision.verdict is Verdict.COMPARE:
        assert decision.ranges and decision.reason == "identical"


def test_attributes_tolerate_coarse_mtimes_but_not_older() -> None:
    dest = FileIdentity(SRC.size, SRC.mtime_ns - 400_000_000)  # 0.4 s: a 1 s file system
    assert decide_existing("diff", "attributes", dest, SRC).verdict is Verdict.SKIP
    assert decide_existing("older", "attributes", dest, SRC).verdict is Verdict.REPLACE


def test_two_empty_files_are_identical_without_reading() -> None:
    empty = FileIdentity(0, 1)
    decision = decide_existing("diff", "full_checksum", empty, FileIdentity(0, 2))
    assert decision.verdict is Verdict.SKIP


def test_sample_ranges() -> None:
    assert sample_ranges(0, "sparse_checksum") == []
    assert sample_ranges(1000, "attributes") == []
    assert sample_ranges(1000, "sparse_checksum") == [(0, 1000)]
    assert sample_ranges(10 << 30, "full_checksum") == [(0, 10 << 30)]
    size = 6 << 30  # beyond 4 GiB: offsets are plain ints
    samples = sample_ranges(size, "sparse_checksum")
    assert len(samples) == SPARSE_SAMPLES
    assert samples[0] == (0, SPARSE_SAMPLE_BYTES)
    assert samples[-1] == (size - SPARSE_SAMPLE_BYTES, SPARSE_SAMPLE_BYTES)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(samples))


def test_decide_partial() -> None:
    record = CheckpointRecord(SRC.size, SRC.mtime_ns, 3000)
    assert decide_partial("none", record, SRC).offset == 0
    assert decide_partial("attributes", None, SRC).offset == 0
    assert decide_partial("attributes", record, SRC).offset == 3000
    touched = FileIdentity(SRC.size, SRC.mtime_ns + 1)
    assert decide_partial("attributes", record, touched).offset == 0
    grown = FileIdentity(SRC.size + 1, SRC.mtime_ns)
    assert decide_partial("full_checksum", record, grown).offset == 0
    # Checksum policies ignore the time and compare the prefix's content instead.
    sparse = decide_partial("sparse_checksum", record, touched)
    assert sparse.offset == 3000 and sparse.ranges == ((0, 3000),)
    empty = CheckpointRecord(SRC.size, SRC.mtime_ns, 0)
    assert decide_partial("attributes", empty, SRC).offset == 0


def test_checkpoint_round_trip_and_damage(tmp_path: Path) -> None:
    partial = tmp_path / "f.partial"
    partial.write_bytes(bytes(100))
    writer = CheckpointWriter(partial, FileIdentity(6 << 30, 123), 0)
    writer.write(80)
    assert read_checkpoint(partial) == CheckpointRecord(6 << 30, 123, 80)
    assert checkpoint_path(partial).stat().st_size == RECORD_SIZE
    writer.write(120)  # more than the partial holds: someone cut it short
    assert read_checkpoint(partial) is None
    writer.close()
    data = bytearray(checkpoint_path(partial).read_bytes())
    data[20] ^= 0x01  # a flipped bit fails the record's checksum
    checkpoint_path(partial).write_bytes(bytes(data))
    assert read_checkpoint(partial) is None
    checkpoint_path(partial).write_bytes(b"garbage")
    assert read_checkpoint(partial) is None
    assert CheckpointRecord.decode(CheckpointRecord(10, 1, 11).encode()) is None  # good > size


def test_one_writer_per_partial(tmp_path: Path) -> None:
    partial = tmp_path / "f.partial"
    partial.touch()
    first = CheckpointWriter(partial, FileIdentity(10, 1), 0)
    with pytest.raises(FileIOError, match="another transfer"):
        CheckpointWriter(partial, FileIdentity(10, 1), 0)
    first.close()
    CheckpointWriter(partial, FileIdentity(10, 1), 0).remove()
    assert not checkpoint_path(partial).exists()
    assert os.path.exists(partial)
