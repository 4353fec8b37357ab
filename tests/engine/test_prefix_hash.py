"""The receiver's running digest (engine/prefix_hash.py): advanced over the good prefix
while a file arrives, it ends with exactly the digests a full read of the file gives, and
the finish reads only the tail."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.engine import incoming as incoming_module
from slipstream.engine import prefix_hash as prefix_hash_module
from slipstream.engine.digests import (
    READ_CHUNK,
    FileDigests,
    Reader,
    RunningDigests,
    digest_path,
    digest_reader,
    path_reader,
)
from slipstream.engine.incoming import IncomingFile, ReceiveOptions, hash_while_arriving
from slipstream.engine.job import ClientOptions, transfer_sync
from slipstream.engine.prefix_hash import HASH_STEP, PrefixHash
from slipstream.engine.resume import CheckpointWriter, FileIdentity
from tests.conftest import ServerHandle, connection_spec, over_https

ALGORITHMS = [None, "md5", "sha256"]


def _data(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of every read a PrefixHash makes."""
    lengths: list[int] = []

    def counting(fd: int) -> Reader:
        read = path_reader(fd)

        def wrapped(offset: int, length: int) -> bytes:
            data = read(offset, length)
            lengths.append(len(data))
            return data

        return wrapped

    monkeypatch.setattr(prefix_hash_module, "path_reader", counting)
    return lengths


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 3 * READ_CHUNK + 17),
    cuts=st.lists(st.integers(0, 3 * READ_CHUNK + 17), max_size=6),
    algorithm=st.sampled_from(ALGORITHMS),
)
def test_running_digests_fed_piecewise_equal_one_pass(
    size: int, cuts: list[int], algorithm: str | None
) -> None:
    data = _data(size)

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    running = RunningDigests(algorithm)
    for cut in sorted(min(cut, size) for cut in cuts):
        running.feed(read, cut)
    running.feed(read, size)
    assert running.position == size
    assert running.result() == digest_reader(read, size, algorithm)


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 2 * READ_CHUNK + 999),
    resumed=st.floats(0, 1),
    steps=st.lists(st.floats(0, 1), max_size=5),
    algorithm=st.sampled_from(ALGORITHMS),
)
def test_arriving_file_matches_digest_path(
    tmp_path_factory: pytest.TempPathFactory,
    size: int,
    resumed: float,
    steps: list[float],
    algorithm: str | None,
) -> None:
    """A file written in order (after a resumed prefix already on disk), with background
    passes over whatever prefix is written, digests as the finished file does."""
    path = tmp_path_factory.mktemp("prefix") / "f.partial"
    data = _data(size, seed=size)
    offset = int(size * resumed)
    path.write_bytes(data[:offset])  # the resumed prefix: never written in this session
    prefix = PrefixHash(path, algorithm)
    written = offset
    for step in sorted(steps):
        good = max(written, int(size * step))
        with open(path, "r+b") as handle:
            handle.seek(written)
            handle.write(data[written:good])
        written = good
        prefix.advance(good)
        assert prefix.hashed_upto == good
    with open(path, "r+b") as handle:
        handle.seek(written)
        handle.write(data[written:])
    assert prefix.finish() == digest_path(path, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_finish_reads_only_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str | None
) -> None:
    path = tmp_path / "big.partial"
    size = 5 * READ_CHUNK + 123
    path.write_bytes(_data(size))
    prefix = PrefixHash(path, algorithm)
    prefix.advance(4 * READ_CHUNK)
    lengths = _counting_reads(monkeypatch)
    assert prefix.finish() == digest_path(path, algorithm)
    assert sum(lengths) == size - 4 * READ_CHUNK


def test_a_range_digests_the_range_alone(tmp_path: Path) -> None:
    path = tmp_path / "split.partial"
    data = _data(6 * READ_CHUNK)
    path.write_bytes(data)
    start, end = 2 * READ_CHUNK, 5 * READ_CHUNK - 77
    prefix = PrefixHash(path, None, start)
    prefix.advance(start + READ_CHUNK + 5)
    whole = digest_reader(
        lambda offset, n: data[start + offset : start + offset + n], end - start, None
    )
    assert prefix.finish(end) == whole


def test_a_failed_pass_costs_only_the_head_start(tmp_path: Path) -> None:
    path = tmp_path / "late.partial"
    prefix = PrefixHash(path, "md5")
    prefix.advance(READ_CHUNK)  # no file yet: the pass gives up, the finish starts over
    path.write_bytes(_data(3 * READ_CHUNK))
    prefix.advance(2 * READ_CHUNK)
    assert prefix.hashed_upto == 0
    assert prefix.finish() == digest_path(path, "md5")


def test_a_file_grown_short_is_hashed_again(tmp_path: Path) -> None:
    """Defensive: a partial shorter than what was hashed (never in a session) is read whole."""
    path = tmp_path / "short.partial"
    path.write_bytes(_data(3 * READ_CHUNK))
    prefix = PrefixHash(path, None)
    prefix.advance(3 * READ_CHUNK)
    os.truncate(path, READ_CHUNK)
    assert prefix.finish() == digest_path(path, None)


def test_stopped_passes_do_nothing_and_the_finish_still_hashes_all(tmp_path: Path) -> None:
    path = tmp_path / "f.partial"
    path.write_bytes(_data(2 * READ_CHUNK))
    prefix = PrefixHash(path, "sha256")
    prefix.stop()
    prefix.advance(2 * READ_CHUNK)
    assert prefix.hashed_upto == 0
    assert prefix.finish() == digest_path(path, "sha256")


def test_the_finish_takes_over_a_pass_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One owner at a time: a pass that is reading when the finish comes stops after its
    chunk, and the finish continues from there; nothing is hashed twice or skipped."""
    path = tmp_path / "f.partial"
    size = 8 * READ_CHUNK
    path.write_bytes(_data(size))
    prefix = PrefixHash(path, "md5")
    reading, release = threading.Event(), threading.Event()

    def slow(fd: int) -> Callable[[int, int], bytes]:
        read = path_reader(fd)

        def wrapped(offset: int, length: int) -> bytes:
            if threading.current_thread() is not threading.main_thread():
                reading.set()
                release.wait(5)
            return read(offset, length)

        return wrapped

    monkeypatch.setattr(prefix_hash_module, "path_reader", slow)
    worker = threading.Thread(target=prefix.advance, args=(size,))
    worker.start()
    assert reading.wait(5)
    results = []
    finisher = threading.Thread(target=lambda: results.append(prefix.finish()))
    finisher.start()
    release.set()
    worker.join(5)
    finisher.join(5)
    assert results == [digest_path(path, "md5")]


async def test_requests_run_in_a_worker_only_when_the_prefix_moved_enough(tmp_path: Path) -> None:
    path = tmp_path / "f.partial"
    size = 3 * HASH_STEP
    path.write_bytes(_data(size))
    prefix = PrefixHash(path, None)
    prefix.request(HASH_STEP - 1)  # not far enough yet
    assert not prefix._pending
    prefix.request(2 * HASH_STEP)
    prefix.request(3 * HASH_STEP)  # one pass at a time: this one is dropped
    while prefix._pending:
        await asyncio.sleep(0.01)
    assert prefix.hashed_upto == 2 * HASH_STEP
    prefix.request(3 * HASH_STEP)
    while prefix._pending:
        await asyncio.sleep(0.01)
    assert prefix.hashed_upto == size
    assert prefix.finish() == digest_path(path, None)


class FinishWatch:
    """In process: every whole-file digest_path a finish makes, and each PrefixHash
    finish as (position the background passes reached, end)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.whole_reads: list[Path] = []
        self.tails: list[tuple[int, int]] = []
        real_digest_path, real_finish = incoming_module.digest_path, PrefixHash.finish

        def watched_digest_path(path: Path, algorithm: str | None) -> FileDigests:
            self.whole_reads.append(path)
            return real_digest_path(path, algorithm)

        def watched_finish(prefix: PrefixHash, end: int | None = None) -> FileDigests:
            prefix.stop()
            with prefix._lock:  # where a pass in flight stopped
                start = prefix.hashed_upto
            result = real_finish(prefix, end)
            self.tails.append((start, prefix.hashed_upto))
            return result

        monkeypatch.setattr(incoming_module, "digest_path", watched_digest_path)
        monkeypatch.setattr(PrefixHash, "finish", watched_finish)


def test_a_download_finish_hashes_only_the_tail(
    server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, the client receives a 64 MiB file: its finish never digests the whole
    partial, and hashes only what the background passes had not reached."""
    size = 64 << 20
    data = random.Random(3).randbytes(size)
    (server.docroot / "big.bin").write_bytes(data)
    watch = FinishWatch(monkeypatch)
    spec = connection_spec(
        server,
        direction="receive",
        paths=[{"source": "big.bin"}],
        destination_root=str(tmp_path),
        file_checksum="md5",
        target_rate_kbps=400_000,
    )
    transfer_sync(spec, options=ClientOptions(cwd=tmp_path))
    assert (tmp_path / "big.bin").read_bytes() == data
    assert watch.whole_reads == []
    [(hashed_before, end)] = watch.tails
    assert end == size
    assert hashed_before >= size // 2, f"the finish hashed {size - hashed_before} bytes"


@pytest.mark.parametrize("transport", ["udp", "http"])
def test_a_resumed_download_hashes_its_prefix_in_the_background(
    server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """The prefix a rerun keeps is hashed too (from byte 0), and the file verifies."""
    size, offset = 24 << 20, 12 << 20
    data = random.Random(5).randbytes(size)
    source = server.docroot / "resumed.bin"
    source.write_bytes(data)
    partial = tmp_path / "resumed.bin.partial"
    partial.write_bytes(data[:offset])
    CheckpointWriter(partial, FileIdentity(size, source.stat().st_mtime_ns), offset).close()
    watch = FinishWatch(monkeypatch)
    events: list[dict[str, Any]] = []
    via = over_https if transport == "http" else connection_spec
    spec = via(
        server,
        direction="receive",
        paths=[{"source": "resumed.bin"}],
        destination_root=str(tmp_path),
        file_checksum="sha256",
        target_rate_kbps=400_000,
    )
    transfer_sync(spec, on_event=events.append, options=ClientOptions(cwd=tmp_path))
    assert (tmp_path / "resumed.bin").read_bytes() == data
    [done] = [event for event in events if event["type"] == "file_done"]
    assert done["resumed_from"] == offset
    assert done["file_checksum"] == hashlib.sha256(data).hexdigest()
    assert watch.whole_reads == []
    [(hashed_before, end)] = watch.tails
    assert end == size and hashed_before > 0


@pytest.mark.parametrize("hashed_ahead", [False, True])
def test_finish_piece_digests_the_range_with_or_without_a_head_start(
    tmp_path: Path, hashed_ahead: bool
) -> None:
    """finish_piece's digest is the range's alone, whether the range was hashed while it
    arrived or not (a small last range)."""
    data = _data(4 * READ_CHUNK)
    start, length = READ_CHUNK, 2 * READ_CHUNK + 5
    incoming = IncomingFile(1, "f.bin", "f.bin", len(data), 0, piece=(start, length))
    incoming.partial = tmp_path / "f.bin.partial"
    incoming.partial.write_bytes(data)
    if hashed_ahead:
        hash_while_arriving(incoming, ReceiveOptions(checksum="md5"))
        assert incoming.prefix_hash is not None
        incoming.prefix_hash.advance(start + READ_CHUNK)
    expected = digest_reader(
        lambda offset, n: data[start + offset : start + offset + n], length, None
    )
    assert incoming_module._range_digests(incoming) == expected
