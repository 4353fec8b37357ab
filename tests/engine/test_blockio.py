"""Block <-> file mapping on both ends, including offsets beyond 4 GiB (sparse files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from slipstream.engine.blockio import (
    CHUNK_BLOCKS,
    FileBlockSink,
    FileBlockSource,
    FileSlot,
    SlotIndex,
    file_digest,
)
from slipstream.errors import FileIOError, SourceNotFound

PAYLOAD = 1000


def blocks_of(size: int) -> int:
    return -(-size // PAYLOAD)


def test_slot_index_finds_blocks_and_skips_empty_files() -> None:
    index = SlotIndex()
    index.add(FileSlot(0, 0, 3, 0, 2500))
    index.add(FileSlot(1, 3, 0, 0, 0))
    index.add(FileSlot(2, 3, 2, 0, 1200))
    assert index.find(0).file_id == 0  # type: ignore[union-attr]
    assert index.find(2).file_id == 0  # type: ignore[union-attr]
    assert index.find(3).file_id == 2  # type: ignore[union-attr]
    assert index.find(5) is None
    with pytest.raises(ValueError):
        index.add(FileSlot(3, 4, 1, 0, 10))


def test_source_to_sink_round_trip_out_of_order(tmp_path: Path) -> None:
    sizes = [0, 1, PAYLOAD, PAYLOAD + 1, CHUNK_BLOCKS * PAYLOAD * 2 + 17]
    hashed: dict[int, str] = {}
    completed: list[int] = []
    source = FileBlockSource(PAYLOAD, lambda fid, digest: hashed.__setitem__(fid, digest))
    sink = FileBlockSink(PAYLOAD, completed.append)
    first = 0
    for file_id, size in enumerate(sizes):
        src = tmp_path / f"src{file_id}"
        src.write_bytes(os.urandom(size))
        slot = FileSlot(file_id, first, blocks_of(size), 0, size)
        source.register(slot, src)
        sink.register(slot, tmp_path / f"dst{file_id}.partial")
        first += slot.count
    order = list(range(first))
    # First pass in order (as the sender reads new data), then delivery shuffled.
    payloads = {block: bytes(source.read_block(block)) for block in order}
    for block in reversed(order):
        sink.write_block(block, memoryview(payloads[block]))
    assert sorted(completed) == list(range(len(sizes)))
    for file_id in range(len(sizes)):
        original = (tmp_path / f"src{file_id}").read_bytes()
        assert (tmp_path / f"dst{file_id}.partial").read_bytes() == original
        assert hashed[file_id] == xxhash.xxh3_128(original).hexdigest()
        assert file_digest(tmp_path / f"src{file_id}") == hashed[file_id]


def test_retransmission_reads_do_not_disturb_the_hash(tmp_path: Path) -> None:
    data = os.urandom(PAYLOAD * CHUNK_BLOCKS * 3)
    (tmp_path / "f").write_bytes(data)
    hashed: dict[int, str] = {}
    source = FileBlockSource(PAYLOAD, hashed.__setitem__)
    source.register(FileSlot(0, 0, blocks_of(len(data)), 0, len(data)), tmp_path / "f")
    for block in range(blocks_of(len(data))):
        source.read_block(block)
        if block % 50 == 0:
            source.read_block(max(0, block - 70))  # an older block, read again
    assert hashed[0] == xxhash.xxh3_128(data).hexdigest()


def test_offsets_beyond_4_gib(tmp_path: Path) -> None:
    size = (5 << 30) + 123  # sparse: only the tail holds data
    src, dst = tmp_path / "huge", tmp_path / "huge.partial"
    with open(src, "wb") as handle:
        handle.truncate(size)
        handle.seek(size - 5000)
        tail = os.urandom(5000)
        handle.write(tail)
    count = blocks_of(size)
    slot = FileSlot(0, 10, count, 0, size)
    source = FileBlockSource(PAYLOAD, lambda *_: None)
    source.register(slot, src)
    completed: list[int] = []
    sink = FileBlockSink(PAYLOAD, completed.append)
    sink.register(slot, dst)
    last_blocks = range(slot.end_block - 6, slot.end_block)
    for block in last_blocks:
        sink.write_block(block, source.read_block(block))
    sink.flush()
    with open(dst, "rb") as handle:
        handle.seek(size - 5000)
        assert handle.read() == tail
    assert not completed  # the rest of the file is still missing


def test_missing_and_shrunken_sources_are_typed_errors(tmp_path: Path) -> None:
    source = FileBlockSource(PAYLOAD, lambda *_: None)
    source.register(FileSlot(0, 0, 3, 0, 2500), tmp_path / "gone")
    with pytest.raises(SourceNotFound):
        source.read_block(0)
    (tmp_path / "short").write_bytes(b"x" * 100)
    source.register(FileSlot(1, 3, 3, 0, 2500), tmp_path / "short")
    with pytest.raises(FileIOError, match="shrank"):
        source.read_block(3)


def test_in_order_runs_never_cross_into_the_next_file(tmp_path: Path) -> None:
    completed: list[int] = []
    sink = FileBlockSink(PAYLOAD, completed.append)
    contents = [os.urandom(2500), os.urandom(3000), os.urandom(10)]
    first = 0
    for file_id, data in enumerate(contents):
        slot = FileSlot(file_id, first, blocks_of(len(data)), 0, len(data))
        sink.register(slot, tmp_path / f"f{file_id}")
        first += slot.count
    block = 0
    for data in contents:
        for offset in range(0, len(data), PAYLOAD):
            sink.write_block(block, memoryview(data[offset : offset + PAYLOAD]))
            block += 1
    assert completed == [0, 1, 2]
    for file_id, data in enumerate(contents):
        assert (tmp_path / f"f{file_id}").read_bytes() == data
