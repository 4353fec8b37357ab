"""The control stream's deflate codec (engine/compressed_lines.py): round trips however the
bytes are cut, bounded memory, clear errors."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slipstream.engine.compressed_lines import LineDeflater, LineInflater
from slipstream.errors import ProtocolError

line_text = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"."))


def inflate_all(inflater: LineInflater, data: bytes, cuts: list[int]) -> list[bytes]:
    lines: list[bytes] = []
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        inflater.feed(data[start:cut])
        start = cut
        while (line := inflater.next_line()) is not None:
            lines.append(line)
    return lines


@given(
    batches=st.lists(st.lists(line_text, max_size=20), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_batches_round_trip_however_the_stream_is_cut(
    batches: list[list[bytes]], cuts: list[int]
) -> None:
    deflater = LineDeflater()
    stream = b"".join(deflater.pack(b"".join(line + b"\n" for line in batch)) for batch in batches)
    expected = [line for batch in batches for line in batch]
    assert inflate_all(LineInflater(), stream, cuts) == expected


def test_each_batch_is_readable_on_its_own_arrival() -> None:
    # Z_SYNC_FLUSH: the peer acts on a batch without waiting for the next one.
    deflater, inflater = LineDeflater(), LineInflater()
    inflater.feed(deflater.pack(b'{"t":"ready","id":1}\n{"t":"ready","id":2}\n'))
    assert inflater.next_line() == b'{"t":"ready","id":1}'
    assert inflater.next_line() == b'{"t":"ready","id":2}'
    assert inflater.next_line() is None
    inflater.feed(deflater.pack(b'{"t":"eof","files":2}\n'))
    assert inflater.next_line() == b'{"t":"eof","files":2}'


def test_announcements_shrink_to_a_third_or_less() -> None:
    batch = b"".join(
        b'{"t":"file","id":%d,"path":"d%03d/f%03d.bin","size":10240,'
        b'"mtime_ns":17957821762780%05d,"mode":420}\n' % (i, i // 100, i % 100, i)
        for i in range(2000)
    )
    assert len(LineDeflater().pack(batch)) < len(batch) / 3


def test_a_small_input_standing_for_a_huge_line_is_refused_without_inflating_it_all() -> None:
    bomb = LineDeflater().pack(b"x" * (64 << 20))  # 64 MiB of one line, ~64 KiB deflated
    inflater = LineInflater(max_line=1 << 20)
    inflater.feed(bomb)
    with pytest.raises(ProtocolError, match="too long"):
        inflater.next_line()


def test_corrupt_data_is_a_protocol_error() -> None:
    inflater = LineInflater()
    inflater.feed(b"\xff" * 64)
    with pytest.raises(ProtocolError) as info:
        inflater.next_line()
    assert "corrupt deflate" in (info.value.internal_message or "")


def test_the_stream_is_raw_deflate() -> None:
    # No zlib header or trailer: what an implementation in another language must speak.
    packed = LineDeflater().pack(b"hello\n")
    assert zlib.decompressobj(-15).decompress(packed) == b"hello\n"
