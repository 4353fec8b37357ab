"""multi_session_threshold without a network: the range split, the shares, and the range
record that lets the sessions of a job finish one split file exactly once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slipstream.engine.blockio import FileBlockSource, FileSlot, file_digest
from slipstream.engine.incoming import (
    IncomingFile,
    ReceiveOptions,
    finish_piece,
    size_shared_partial,
)
from slipstream.engine.multisession import (
    INDEX_FIELD,
    JOB_FIELD,
    SPLIT_ALIGN,
    PieceEntry,
    check_split,
    select_share,
    share_specs,
    split_ranges,
)
from slipstream.engine.paths import SourceEntry
from slipstream.engine.resume import (
    CheckpointRecord,
    FileIdentity,
    RangeRecord,
    checkpoint_path,
    decide_partial,
    ranges_path,
)
from slipstream.errors import UsageError
from slipstream.spec import load_transfer_spec

MiB = 1 << 20


# --- split_ranges -------------------------------------------------------------------------


@given(
    size=st.integers(0, 1 << 44),
    parts=st.integers(1, 128),
    align=st.sampled_from([1, 2, 4096, 1420, 8920, SPLIT_ALIGN]) | st.integers(1, 1 << 22),
)
def test_ranges_cover_the_file_exactly(size: int, parts: int, align: int) -> None:
    ranges = split_ranges(size, parts, align)
    units = -(-size // align)
    assert len(ranges) == (max(1, min(parts, units)) if size else 1)
    position = 0
    for offset, length in ranges:
        assert offset == position  # contiguous: no gap, no overlap, in order
        assert offset % align == 0
        assert length > 0 or size == 0
        position += length
    assert position == size
    # Balanced: all but the last are within one alignment unit of each other.
    full = [length for _, length in ranges[:-1]]
    assert not full or max(full) - min(full) <= align
    assert all(length <= max(full, default=size) for _, length in ranges)


# --- shares -------------------------------------------------------------------------------


def _entry(rel: str, size: int, kind: str = "file") -> SourceEntry:
    return SourceEntry(Path("/src") / rel, rel, kind, size, 1, 0o644)  # type: ignore[arg-type]


def _spec(count: int | None, threshold: int | None, index: int | None, **extra: Any) -> Any:
    body: dict[str, Any] = {"direction": "send", "paths": [{"source": "src"}], **extra}
    if count is not None:
        body["multi_session"] = count
    if threshold is not None:
        body["multi_session_threshold"] = threshold
    if index is not None:
        body[INDEX_FIELD] = index
    return load_transfer_spec(body)


@given(
    sizes=st.lists(st.integers(0, 40 * MiB), min_size=1, max_size=12),
    count=st.integers(2, 6),
    threshold=st.integers(1, 20 * MiB),
)
def test_every_byte_is_sent_by_exactly_one_session(
    sizes: list[int], count: int, threshold: int
) -> None:
    entries = [_entry("d", 0, "dir")] + [_entry(f"d/f{i}", s) for i, s in enumerate(sizes)]
    sent: dict[str, list[tuple[int, int]]] = {}
    for index in range(count):
        for item in select_share(entries, _spec(count, threshold, index)):
            if item.kind == "dir":
                assert index == 0
                continue
            span = (item.offset, item.length) if isinstance(item, PieceEntry) else (0, item.size)
            sent.setdefault(item.rel_path, []).append(span)
    for i, size in enumerate(sizes):
        spans = sorted(sent[f"d/f{i}"])
        position = 0
        for offset, length in spans:
            assert offset == position
            position += length
        assert position == size
        split = size >= threshold and size > SPLIT_ALIGN
        assert (len(spans) > 1) == split
        assert len(spans) <= count


def test_threshold_zero_none_or_one_session_keeps_whole_files() -> None:
    entries = [_entry(f"f{i}", size) for i, size in enumerate([50 * MiB, 3, 9 * MiB, 0])]

    def shares(count: int, threshold: int | None) -> list[list[Any]]:
        return [list(select_share(entries, _spec(count, threshold, i))) for i in range(count)]

    plain = shares(3, None)
    assert shares(3, 0) == plain
    assert not any(isinstance(e, PieceEntry) for share in plain for e in share)
    assert list(select_share(entries, _spec(1, MiB, 0))) == entries
    assert list(select_share(entries, _spec(3, MiB, None))) == entries  # the parent job
    # The HTTPS fallback never splits: the same whole-file shares as without a threshold.
    split_off = [list(select_share(entries, _spec(3, MiB, i), split=False)) for i in range(3)]
    assert split_off == plain


def test_share_specs_carry_one_job_id() -> None:
    parts = share_specs(_spec(3, MiB, None))
    assert [p[INDEX_FIELD] for p in parts] == [0, 1, 2]
    assert len({p[JOB_FIELD] for p in parts}) == 1 and parts[0][JOB_FIELD]
    assert all(JOB_FIELD not in p for p in share_specs(_spec(3, 0, None)))  # as before


@pytest.mark.parametrize(
    "field",
    [
        {"content_protection": "encrypt", "content_protection_passphrase": "x" * 12},
        {"file_checksum": "sha256"},
        {"obfuscate_file_names": True},
    ],
)
def test_combinations_a_split_file_cannot_honour(field: dict[str, Any]) -> None:
    with pytest.raises(UsageError) as caught:
        check_split(_spec(2, MiB, None, **field))
    assert caught.value.code == 53 and "multi_session_threshold" in caught.value.user_message
    check_split(_spec(1, MiB, None, **field))  # nothing is split: nothing to refuse
    check_split(_spec(2, 0, None, **field))


# --- the sender digests its range ------------------------------------------------------------


def test_source_digests_only_its_range(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    start, end, payload = MiB, 2 * MiB + 7, 1420
    hashed: list[str] = []
    source = FileBlockSource(payload, lambda _id, digest: hashed.append(digest))
    count = -(-(end - start) // payload)
    source.register(FileSlot(0, 0, count, start, end), path, hash_from=start)
    got = b"".join(bytes(source.read_block(b)) for b in range(count))
    assert got == data[start:end]
    (tmp_path / "r").write_bytes(data[start:end])
    assert hashed == [file_digest(tmp_path / "r")]


# --- per-range resume ----------------------------------------------------------------------


def test_a_range_resumes_from_its_own_checkpoint() -> None:
    src = FileIdentity(10 * MiB, 5)
    record = CheckpointRecord(10 * MiB, 5, 6 * MiB)
    assert decide_partial("attributes", record, src, 4 * MiB, 8 * MiB).offset == 6 * MiB
    sparse = decide_partial("sparse_checksum", record, src, 4 * MiB, 8 * MiB)
    assert sparse.offset == 6 * MiB and sparse.ranges == ((4 * MiB, 2 * MiB),)
    # A record whose prefix does not lie in the range is of another layout: start over.
    assert decide_partial("attributes", record, src, 7 * MiB, 8 * MiB).offset == 7 * MiB
    assert decide_partial("attributes", record, src, 0, 4 * MiB).offset == 0
    assert decide_partial("none", record, src, 4 * MiB, 8 * MiB).offset == 4 * MiB


# --- the range record ------------------------------------------------------------------------


def test_first_verdict_wins_within_a_job(tmp_path: Path) -> None:
    partial = tmp_path / "f.partial"
    source = FileIdentity(100, 1)
    first = RangeRecord(partial, "job1", source)
    assert first.stamp("identical") == ("identical", True)
    assert RangeRecord(partial, "job1", source).stamp("") == ("identical", False)
    # Another job (a rerun) decides afresh.
    assert RangeRecord(partial, "job2", source).stamp("") == ("", True)
    assert RangeRecord(partial, "job2", source).note_failure() is True
    assert RangeRecord(partial, "job2", source).note_failure() is False


def test_settling_in_any_order_finishes_once(tmp_path: Path) -> None:
    record = RangeRecord(tmp_path / "f.partial", "j", FileIdentity(30, 1))
    assert not record.settle(10, 10, "b").last
    assert not record.settle(10, 10, "b").last  # the same range again changes nothing
    assert not record.settle(20, 10, "c").last
    done = record.settle(0, 10, "a")
    assert done.last and done.ranges == ((0, 10, "a"), (10, 10, "b"), (20, 10, "c"))
    assert not record.settle(0, 10, "a").last  # never twice


def _finish_range(partial: str, final: str, start: int, length: int, job: str) -> bool:
    """One receiving process: write its range into the shared partial, then finish it."""
    data = Path(final).with_suffix(".src").read_bytes()
    size_shared_partial(Path(partial), len(data))
    fd = os.open(partial, os.O_WRONLY)
    try:
        os.pwrite(fd, data[start : start + length], start)
    finally:
        os.close(fd)
    (Path(final).parent / f"go-{start}").touch()
    deadline = time.monotonic() + 30
    while len(list(Path(final).parent.glob("go-*"))) < 4 and time.monotonic() < deadline:
        pass  # all ranges written: finish them at the same moment
    incoming = IncomingFile(0, "f", "f", len(data), 7, final=Path(final), partial=Path(partial))
    incoming.piece = (start, length)
    incoming.digest = _range_digest(data[start : start + length])
    return finish_piece(incoming, ReceiveOptions(job=job)).whole


def _range_digest(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


@pytest.mark.parametrize("attempt", range(5))
def test_concurrent_processes_rename_exactly_once(tmp_path: Path, attempt: int) -> None:
    data = os.urandom(4 * MiB + 123)
    final = tmp_path / "f"
    final.with_suffix(".src").write_bytes(data)
    partial = tmp_path / "f.partial"
    ranges = split_ranges(len(data), 4)
    assert len(ranges) == 4
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        wholes = pool.starmap(
            _finish_range, [(str(partial), str(final), o, n, f"job{attempt}") for o, n in ranges]
        )
    assert wholes.count(True) == 1
    assert final.read_bytes() == data
    assert not partial.exists() and not ranges_path(partial).exists()


def test_a_failed_range_leaves_partial_and_record(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    partial, final = tmp_path / "f.partial", tmp_path / "f"
    size_shared_partial(partial, len(data))
    checkpoint_path(partial, MiB).write_text("x")
    incoming = IncomingFile(0, "f", "f", len(data), 7, final=final, partial=partial)
    incoming.piece = (0, MiB)
    incoming.digest = "0" * 32  # the zeros in the partial do not match
    with pytest.raises(Exception, match="differ"):
        finish_piece(incoming, ReceiveOptions(job="j"))
    assert partial.stat().st_size == len(data) and not final.exists()
    assert checkpoint_path(partial, MiB).exists()  # the other range's resume state stays
