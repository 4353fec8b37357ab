"""The datagram codec: every Slipstream packet on the wire, big-endian.

Layout (docs/protocol.md has the prose)::

    common header, 20 bytes, always authenticated as associated data
      magic u8 = 0x53 | version u8 = 1 | type u8 | flags u8 | session_id 8 bytes | packet_number u64
    DATA      header | block u64 | send_time_us u64 | AEAD(payload) | tag 16
              (block and send time are cleartext associated data, so a receiver can drop a
              duplicate block before paying for decryption)
    REPORT    header | AEAD(report body) | tag 16
    HELLO     header | AEAD(time_us u64, max_datagram u16 [, zero padding]) | tag 16
    HELLO_ACK header | AEAD(echo_time_us u64, max_datagram u16 [, zero padding]) | tag 16
    CLOSE     header | AEAD(error code u16) | tag 16

:func:`decode` raises only :class:`DecodeError`. The sessions use the split helpers
(:func:`peek_data`, :func:`open_data`) on the hot path so a duplicate costs no decryption.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from .crypto import TAG_SIZE, AuthenticationFailed, PacketProtector

MAGIC = 0x53
VERSION = 1
SESSION_ID_SIZE = 8

HEADER = struct.Struct(">BBBB8sQ")
HEADER_SIZE = HEADER.size  # 20
DATA_PREFIX = struct.Struct(">BBBB8sQQQ")  # header + block + send_time_us
DATA_PREFIX_SIZE = DATA_PREFIX.size  # 36
DATA_OVERHEAD = DATA_PREFIX_SIZE + TAG_SIZE  # 52 bytes of ours around every payload
UDP_HEADER_SIZE = 8
IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40

_HELLO = struct.Struct(">QH")
_CLOSE = struct.Struct(">H")
# cum, echo_time_us, hold_us, received_bytes, received_datagrams, report_time_us,
# base, horizon, range count
_REPORT = struct.Struct(">QQIQQQQQH")
REPORT_FIXED_SIZE = _REPORT.size
# A REPORT whose range list is complete everywhere above ``base`` says so with this horizon.
HORIZON_ALL = 2**64 - 1
NO_BLOCK = 2**64 - 1  # the block field of a PROBE, which carries no block
_U32_MAX = 2**32 - 1
_U16_MAX = 2**16 - 1

FLAG_RETRANSMISSION = 0x01  # DATA: this block was sent before (diagnostics only)
FLAG_PROBE = 0x02  # DATA: empty keep-alive that asks for a prompt REPORT
FLAG_SHORT_RANGES = 0x04  # REPORT: range pairs are u16 instead of u32
FLAG_PADDED = 0x08  # HELLO / HELLO_ACK: padded to the session's full datagram size


class PacketType(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    DATA = 3
    REPORT = 4
    CLOSE = 5


class DecodeError(Exception):
    """Garbage, truncation, an unknown type, or a packet that failed authentication."""


@dataclass(slots=True)
class Packet:
    type: PacketType
    flags: int
    session_id: bytes
    packet_number: int


@dataclass(slots=True)
class HelloPacket(Packet):
    time_us: int = 0
    max_datagram: int = 0


@dataclass(slots=True)
class HelloAckPacket(Packet):
    echo_time_us: int = 0
    max_datagram: int = 0


@dataclass(slots=True)
class DataPacket(Packet):
    block: int = 0
    send_time_us: int = 0
    payload: bytes = b""


@dataclass(slots=True)
class ReportPacket(Packet):
    """What the receiver has: ``cum`` (all blocks below it), plus ``ranges`` above it.

    ``ranges`` lists, as absolute half-open ``(start, end)`` pairs, every received range in
    ``[base, horizon)``; a block in that window and not in a range is missing. The first
    REPORT of a round has ``base == cum``; when the list does not fit one datagram the
    receiver sends more, each starting where the previous one's horizon ended.
    """

    cum: int = 0
    echo_time_us: int = 0
    hold_us: int = 0
    received_bytes: int = 0
    received_datagrams: int = 0
    report_time_us: int = 0
    base: int = 0
    horizon: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class ClosePacket(Packet):
    code: int = 0


def payload_size_for(dgram_size: int = 1500, ipv6: bool = False) -> int:
    """Block payload bytes that fit an IP datagram of ``dgram_size`` bytes (Aspera's sense)."""
    ip_header = IPV6_HEADER_SIZE if ipv6 else IPV4_HEADER_SIZE
    size = dgram_size - ip_header - UDP_HEADER_SIZE - DATA_OVERHEAD
    if size <= 0:
        raise ValueError(f"datagram size {dgram_size} leaves no room for a payload")
    return size


def report_body_budget(dgram_size: int = 1500, ipv6: bool = False) -> int:
    """REPORT body bytes (before the tag) that fit an IP datagram of ``dgram_size``."""
    ip_header = IPV6_HEADER_SIZE if ipv6 else IPV4_HEADER_SIZE
    return dgram_size - ip_header - UDP_HEADER_SIZE - HEADER_SIZE - TAG_SIZE


def _header(ptype: int, flags: int, session_id: bytes, packet_number: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ptype, flags, session_id, packet_number)


def _seal(
    protector: PacketProtector, ptype: int, flags: int, session_id: bytes, pn: int, body: bytes
) -> bytes:
    header = _header(ptype, flags, session_id, pn)
    return header + protector.seal(pn, header, body)


# --- encoders ----------------------------------------------------------------------------


HELLO_SIZE = HEADER_SIZE + _HELLO.size + TAG_SIZE  # an unpadded HELLO / HELLO_ACK


def _hello_body(time_us: int, max_datagram: int, pad_to: int) -> tuple[bytes, int]:
    """The body, padded (zeros, encrypted like the rest) so the datagram is ``pad_to``."""
    body = _HELLO.pack(time_us, max_datagram)
    if pad_to <= HELLO_SIZE:
        return body, 0
    return body + bytes(pad_to - HELLO_SIZE), FLAG_PADDED


def encode_hello(
    protector: PacketProtector,
    session_id: bytes,
    packet_number: int,
    *,
    time_us: int,
    max_datagram: int,
    pad_to: int = 0,
) -> bytes:
    """A HELLO; with ``pad_to`` (UDP payload bytes) it proves the path carries that size."""
    body, flags = _hello_body(time_us, max_datagram, pad_to)
    return _seal(protector, PacketType.HELLO, flags, session_id, packet_number, body)


def encode_hello_ack(
    protector: PacketProtector,
    session_id: bytes,
    packet_number: int,
    *,
    echo_time_us: int,
    max_datagram: int,
    pad_to: int = 0,
) -> bytes:
    body, flags = _hello_body(echo_time_us, max_datagram, pad_to)
    return _seal(protector, PacketType.HELLO_ACK, flags, session_id, packet_number, body)


def encode_close(
    protector: PacketProtector, session_id: bytes, packet_number: int, code: int = 0
) -> bytes:
    return _seal(protector, PacketType.CLOSE, 0, session_id, packet_number, _CLOSE.pack(code))


def encode_data(
    protector: PacketProtector,
    session_id: bytes,
    packet_number: int,
    *,
    block: int,
    send_time_us: int,
    payload: bytes | memoryview,
    flags: int = 0,
) -> bytes:
    prefix = DATA_PREFIX.pack(
        MAGIC, VERSION, PacketType.DATA, flags, session_id, packet_number, block, send_time_us
    )
    return prefix + protector.seal(packet_number, prefix, payload)


@dataclass(slots=True)
class ReportFields:
    """The fixed part of a REPORT, as the receiver fills it."""

    cum: int
    echo_time_us: int
    hold_us: int
    received_bytes: int
    received_datagrams: int
    report_time_us: int


def report_ranges_capacity(body_budget: int, short: bool) -> int:
    return max(0, (body_budget - REPORT_FIXED_SIZE) // (4 if short else 8))


def encode_report(
    protector: PacketProtector,
    session_id: bytes,
    packet_number: int,
    fields: ReportFields,
    *,
    base: int,
    ranges: Sequence[tuple[int, int]],
    final_horizon: int,
    body_budget: int,
) -> tuple[bytes, int]:
    """Encode one REPORT carrying as many of ``ranges`` (sorted, all ``>= base``) as fit.

    Returns the datagram and how many ranges it consumed. If all fit, the horizon is
    ``final_horizon``; otherwise it is the start of the first range left out, so the
    window stays exact and the next REPORT can start there.
    """
    short_capacity = report_ranges_capacity(body_budget, short=True)
    chosen = list(ranges[:short_capacity])
    flat = _range_deltas(base, chosen)
    short = not flat or max(flat) <= _U16_MAX
    if not short:
        chosen = chosen[: report_ranges_capacity(body_budget, short=False)]
        flat = flat[: 2 * len(chosen)]
        if flat and max(flat) > _U32_MAX:
            raise ValueError("range delta does not fit 32 bits")
    horizon = final_horizon if len(chosen) == len(ranges) else ranges[len(chosen)][0]
    body = _REPORT.pack(
        fields.cum,
        fields.echo_time_us,
        fields.hold_us,
        fields.received_bytes,
        fields.received_datagrams,
        fields.report_time_us,
        base,
        horizon,
        len(chosen),
    ) + struct.pack(f">{len(flat)}{'H' if short else 'I'}", *flat)
    flags = FLAG_SHORT_RANGES if short else 0
    return _seal(protector, PacketType.REPORT, flags, session_id, packet_number, body), len(chosen)


def _range_deltas(base: int, ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Ranges as (gap from the previous end, length) pairs: small numbers, so they pack."""
    flat: list[int] = []
    previous_end = base
    for start, end in ranges:
        if start < previous_end or end <= start:
            raise ValueError("ranges must be sorted, disjoint and not below base")
        flat.append(start - previous_end)
        flat.append(end - start)
        previous_end = end
    return flat


# --- decoders ----------------------------------------------------------------------------


def peek_header(datagram: bytes | memoryview) -> tuple[int, int, bytes, int]:
    """``(type, flags, session_id, packet_number)`` without authenticating anything."""
    if len(datagram) < HEADER_SIZE:
        raise DecodeError("shorter than the header")
    magic, version, ptype, flags, session_id, pn = HEADER.unpack_from(datagram)
    if magic != MAGIC or version != VERSION:
        raise DecodeError("bad magic or version")
    return ptype, flags, session_id, pn


def peek_data(datagram: bytes | memoryview) -> tuple[int, int, int]:
    """``(packet_number, block, send_time_us)`` of a DATA datagram, unauthenticated."""
    if len(datagram) < DATA_OVERHEAD:
        raise DecodeError("truncated DATA")
    _m, _v, _t, _f, _sid, pn, block, send_time_us = DATA_PREFIX.unpack_from(datagram)
    return pn, block, send_time_us


def open_data(
    datagram: bytes | memoryview, packet_number: int, protector: PacketProtector
) -> bytes:
    """Authenticate and decrypt a DATA datagram's payload."""
    view = memoryview(datagram)
    try:
        return protector.open(packet_number, view[:DATA_PREFIX_SIZE], view[DATA_PREFIX_SIZE:])
    except AuthenticationFailed as exc:
        raise DecodeError(str(exc)) from None


def decode(datagram: bytes | memoryview, protector: PacketProtector) -> Packet:
    """Parse and authenticate any datagram. Raises only :class:`DecodeError`."""
    try:
        return _decode(memoryview(datagram), protector)
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, TypeError) as exc:
        raise DecodeError(f"malformed datagram: {exc}") from None


def _decode(view: memoryview, protector: PacketProtector) -> Packet:
    ptype, flags, session_id, pn = peek_header(view)
    if ptype == PacketType.DATA:
        _pn, block, send_time_us = peek_data(view)
        payload = open_data(view, pn, protector)
        return DataPacket(PacketType.DATA, flags, session_id, pn, block, send_time_us, payload)
    decoder = _BODY_DECODERS.get(ptype)
    if decoder is None:
        raise DecodeError(f"unknown packet type {ptype}")
    try:
        body = protector.open(pn, view[:HEADER_SIZE], view[HEADER_SIZE:])
    except AuthenticationFailed as exc:
        raise DecodeError(str(exc)) from None
    return decoder(flags, session_id, pn, body)


def _hello_fields(flags: int, body: bytes) -> tuple[int, int]:
    # A padded body may be longer (the padding is ignored); an unpadded one is exact.
    if flags & FLAG_PADDED:
        if len(body) < _HELLO.size:
            raise DecodeError("truncated HELLO")
    else:
        _expect_size(body, _HELLO.size)
    time_us, max_datagram = _HELLO.unpack_from(body)
    return int(time_us), int(max_datagram)


def _decode_hello(flags: int, session_id: bytes, pn: int, body: bytes) -> Packet:
    time_us, max_datagram = _hello_fields(flags, body)
    return HelloPacket(PacketType.HELLO, flags, session_id, pn, time_us, max_datagram)


def _decode_hello_ack(flags: int, session_id: bytes, pn: int, body: bytes) -> Packet:
    echo, max_datagram = _hello_fields(flags, body)
    return HelloAckPacket(PacketType.HELLO_ACK, flags, session_id, pn, echo, max_datagram)


def _decode_close(flags: int, session_id: bytes, pn: int, body: bytes) -> Packet:
    _expect_size(body, _CLOSE.size)
    (code,) = _CLOSE.unpack(body)
    return ClosePacket(PacketType.CLOSE, flags, session_id, pn, code)


def _decode_report(flags: int, session_id: bytes, pn: int, body: bytes) -> Packet:
    if len(body) < REPORT_FIXED_SIZE:
        raise DecodeError("truncated REPORT")
    (cum, echo, hold, rbytes, rdgrams, rtime, base, horizon, count) = _REPORT.unpack_from(body)
    item = "H" if flags & FLAG_SHORT_RANGES else "I"
    _expect_size(body, REPORT_FIXED_SIZE + count * 2 * struct.calcsize(item))
    flat = struct.unpack_from(f">{2 * count}{item}", body, REPORT_FIXED_SIZE)
    ranges: list[tuple[int, int]] = []
    cursor = base
    for index in range(0, 2 * count, 2):
        start = cursor + flat[index]
        cursor = start + flat[index + 1]
        ranges.append((start, cursor))
    if horizon < base or cum > base or (ranges and ranges[-1][1] > horizon):
        raise DecodeError("inconsistent REPORT window")
    return ReportPacket(
        PacketType.REPORT,
        flags,
        session_id,
        pn,
        cum,
        echo,
        hold,
        rbytes,
        rdgrams,
        rtime,
        base,
        horizon,
        ranges,
    )


def _expect_size(body: bytes, size: int) -> None:
    if len(body) != size:
        raise DecodeError("wrong body size")


_BODY_DECODERS: dict[int, Callable[[int, bytes, int, bytes], Packet]] = {
    PacketType.HELLO: _decode_hello,
    PacketType.HELLO_ACK: _decode_hello_ack,
    PacketType.REPORT: _decode_report,
    PacketType.CLOSE: _decode_close,
}
