import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slipstream.protocol import wire
from slipstream.protocol.crypto import PacketProtector, derive_protectors

SECRET = bytes(range(32))
SID = b"sess0001"
U64 = st.integers(0, 2**64 - 1)


def protectors(cipher: str = "aes-128") -> tuple[PacketProtector, PacketProtector]:
    sender = derive_protectors(cipher, SECRET, SID, "initiator")
    receiver = derive_protectors(cipher, SECRET, SID, "responder")
    return sender.outbound, receiver.inbound


class Numbers:
    """Fresh increasing packet numbers (the protector refuses reuse)."""

    def __init__(self) -> None:
        self.value = -1

    def __call__(self) -> int:
        self.value += 1
        return self.value


def test_sizes() -> None:
    assert wire.HEADER_SIZE == 20
    assert wire.payload_size_for(1500) == 1500 - 20 - 8 - 20 - 16 - 16
    assert wire.payload_size_for(1500, ipv6=True) == wire.payload_size_for(1500) - 20
    assert wire.payload_size_for() == 1420
    with pytest.raises(ValueError):
        wire.payload_size_for(80)


@pytest.mark.parametrize("cipher", ["aes-128", "aes-256", "none"])
@settings(max_examples=40, deadline=None)
@given(block=U64, send_time=U64, payload=st.binary(max_size=1500), flags=st.integers(0, 255))
def test_data_round_trip(
    cipher: str, block: int, send_time: int, payload: bytes, flags: int
) -> None:
    seal, open_ = protectors(cipher)
    datagram = wire.encode_data(
        seal, SID, 7, block=block, send_time_us=send_time, payload=payload, flags=flags
    )
    assert len(datagram) == len(payload) + wire.DATA_OVERHEAD
    packet = wire.decode(datagram, open_)
    assert isinstance(packet, wire.DataPacket)
    assert (packet.block, packet.send_time_us, packet.payload) == (block, send_time, payload)
    assert (packet.flags, packet.session_id, packet.packet_number) == (flags, SID, 7)
    assert wire.peek_data(datagram) == (7, block, send_time)


def test_control_round_trips() -> None:
    seal, open_ = protectors()
    hello = wire.decode(wire.encode_hello(seal, SID, 0, time_us=123, max_datagram=1500), open_)
    assert isinstance(hello, wire.HelloPacket) and hello.time_us == 123
    assert hello.max_datagram == 1500
    ack = wire.decode(wire.encode_hello_ack(seal, SID, 1, echo_time_us=9, max_datagram=9000), open_)
    assert isinstance(ack, wire.HelloAckPacket) and ack.echo_time_us == 9
    close = wire.decode(wire.encode_close(seal, SID, 2, 513), open_)
    assert isinstance(close, wire.ClosePacket) and close.code == 513
    assert close.type is wire.PacketType.CLOSE


range_lists = st.lists(st.tuples(st.integers(1, 70_000), st.integers(1, 70_000)), max_size=600)


@settings(max_examples=60, deadline=None)
@given(cum=st.integers(0, 2**40), pairs=range_lists, budget=st.integers(200, 1436))
def test_report_round_trip_and_slicing(cum: int, pairs: list[tuple[int, int]], budget: int) -> None:
    seal, open_ = protectors()
    ranges, cursor = [], cum
    for gap, length in pairs:
        ranges.append((cursor + gap, cursor + gap + length))
        cursor += gap + length
    fields = wire.ReportFields(cum, 11, 22, 33, 44, 55)
    numbers = Numbers()
    base, remaining, seen = cum, ranges, []
    while True:
        datagram, used = wire.encode_report(
            seal,
            SID,
            numbers(),
            fields,
            base=base,
            ranges=remaining,
            final_horizon=wire.HORIZON_ALL,
            body_budget=budget,
        )
        assert len(datagram) <= wire.HEADER_SIZE + budget + 16
        packet = wire.decode(datagram, open_)
        assert isinstance(packet, wire.ReportPacket)
        assert (packet.cum, packet.echo_time_us, packet.hold_us) == (cum, 11, 22)
        assert (packet.received_bytes, packet.received_datagrams) == (33, 44)
        assert packet.report_time_us == 55 and packet.base == base
        assert packet.ranges == list(remaining[:used])
        seen.extend(packet.ranges)
        if used == len(remaining):
            assert packet.horizon == wire.HORIZON_ALL
            break
        assert used > 0
        assert packet.horizon == remaining[used][0]  # complete up to the next range
        base, remaining = remaining[used][0], remaining[used:]
    assert seen == ranges


def test_report_rejects_unsorted_ranges() -> None:
    seal, _ = protectors()
    fields = wire.ReportFields(0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        wire.encode_report(
            seal, SID, 0, fields, base=10, ranges=[(5, 6)], final_horizon=7, body_budget=1400
        )


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_decode_error(garbage: bytes) -> None:
    _, open_ = protectors()
    with pytest.raises(wire.DecodeError):
        wire.decode(garbage, open_)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["data", "report", "hello", "close"]), data=st.data())
def test_mutated_packets_raise_only_decode_error(kind: str, data: st.DataObject) -> None:
    seal, open_ = protectors(data.draw(st.sampled_from(["aes-128", "none"])))
    if kind == "data":
        datagram = wire.encode_data(seal, SID, 1, block=3, send_time_us=4, payload=b"p" * 50)
    elif kind == "report":
        datagram, _ = wire.encode_report(
            seal,
            SID,
            1,
            wire.ReportFields(1, 2, 3, 4, 5, 6),
            base=1,
            ranges=[(3, 9)],
            final_horizon=wire.HORIZON_ALL,
            body_budget=1400,
        )
    elif kind == "hello":
        datagram = wire.encode_hello(seal, SID, 1, time_us=5, max_datagram=1500)
    else:
        datagram = wire.encode_close(seal, SID, 1, 0)
    mutated = bytearray(datagram)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip":
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    else:
        mutated += data.draw(st.binary(min_size=1, max_size=20))
    with pytest.raises(wire.DecodeError):
        wire.decode(bytes(mutated), open_)


def test_specific_rejections() -> None:
    seal, open_ = protectors()
    good = wire.encode_close(seal, SID, 1, 0)
    with pytest.raises(wire.DecodeError, match="magic"):
        wire.decode(b"\x00" + good[1:], open_)
    with pytest.raises(wire.DecodeError, match="unknown"):
        wire.decode(good[:2] + b"\x09" + good[3:], open_)
    with pytest.raises(wire.DecodeError):
        wire.decode(good[:10], open_)
    wrong_key = derive_protectors("aes-128", bytes(32), SID, "responder").inbound
    with pytest.raises(wire.DecodeError):
        wire.decode(good, wrong_key)
