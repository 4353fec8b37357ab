"""Session behaviour that needs no long transfer: handshake, forgeries, nonces, pacing."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from netsim import Link, LinkConfig, Simulator, make_pair
from slipstream.protocol import wire
from slipstream.protocol.crypto import PacketProtector
from slipstream.protocol.events import HandshakeComplete, PathMtuFailed
from slipstream.protocol.session import SessionState

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "src" / "slipstream" / "protocol"
FORBIDDEN = {"asyncio", "socket", "time", "selectors", "threading", "io", "pathlib"}


def test_protocol_package_is_sans_io() -> None:
    for path in PROTOCOL_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = {node.module.split(".")[0]}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                pytest.fail(f"{path.name} opens a file")
            else:
                continue
            assert not names & FORBIDDEN, f"{path.name} imports {names & FORBIDDEN}"


def test_initiator_repeats_hello_until_answered() -> None:
    pair = make_pair(b"x" * 10_000)
    sim = Simulator(pair, LinkConfig(delay=0.01, loss=1.0))  # every HELLO is lost
    sim.sent_by_sender = []
    sim.run(1.0, until=lambda s: False)
    hellos = [t for t, d in sim.sent_by_sender if d[2] == wire.PacketType.HELLO]
    assert hellos == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-6)
    assert pair.sender.state is SessionState.HANDSHAKE
    assert all(d[2] == wire.PacketType.HELLO for _, d in sim.sent_by_sender)


def test_responder_sends_nothing_before_a_hello() -> None:
    pair = make_pair(b"x" * 10_000, sender_is_initiator=False)
    sender = pair.sender
    assert sender.get_timer() == pytest.approx(20.0)  # only the idle deadline
    assert sender.datagrams_to_send(0.5) == []
    # Garbage and forgeries do not complete the handshake either.
    sender.receive_datagram(b"\x53\x01\x01\x00netsim01" + bytes(30), 0.6)
    assert sender.datagrams_to_send(0.7) == []
    hello = pair.receiver.datagrams_to_send(0.8)
    assert len(hello) == 1
    sender.receive_datagram(hello[0], 0.9)
    assert sender.next_event() == HandshakeComplete()
    out = sender.datagrams_to_send(0.9)
    assert out[0][2] == wire.PacketType.HELLO_ACK
    assert any(d[2] == wire.PacketType.DATA for d in out)


class ForgingLink(Link):
    """Before each genuine datagram, delivers forged variants of it: flipped payload
    bits, a flipped header bit, and a datagram spliced from another packet's tag."""

    def __init__(self, config: LinkConfig, rng: random.Random) -> None:
        super().__init__(config, rng)
        self.forged = 0
        self.previous: bytes | None = None

    def send(self, now: float, datagram: bytes) -> list[tuple[float, bytes]]:
        delivered = super().send(now, datagram)
        forged: list[tuple[float, bytes]] = []
        for arrival, genuine in delivered:
            variants = [bytearray(genuine), bytearray(genuine)]
            variants[0][-20] ^= 0x40  # payload (or body) byte
            variants[1][3] ^= 0x80  # flags, authenticated as associated data
            if self.previous is not None and len(self.previous) == len(genuine):
                variants.append(bytearray(genuine[:-16] + self.previous[-16:]))
            for variant in variants:
                forged.append((arrival - 1e-7, bytes(variant)))
            self.previous = genuine
        self.forged += len(forged)
        return forged + delivered


@pytest.mark.parametrize("cipher", ["aes-128", "none"])
def test_forged_and_tampered_datagrams_are_dropped(cipher: str) -> None:
    data = random.Random(5).randbytes(600_000)
    pair = make_pair(data, cipher=cipher, target_bps=100e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01, loss=0.02))
    sim.forward = ForgingLink(sim.forward.config, random.Random(2))
    sim.backward = ForgingLink(sim.backward.config, random.Random(3))
    result = sim.run(10)
    assert result.completed
    assert bytes(pair.sink.data) == data  # no forged payload ever reached the sink
    assert sim.forward.forged > 1000 and sim.backward.forged > 10


def test_injected_garbage_does_not_disturb_a_transfer() -> None:
    data = random.Random(6).randbytes(300_000)
    pair = make_pair(data, target_bps=100e6)
    rng = random.Random(9)

    def inject(now: float, sim: Simulator) -> None:
        for session in (sim.pair.sender, sim.pair.receiver):
            for _ in range(50):
                header = wire.HEADER.pack(
                    wire.MAGIC,
                    wire.VERSION,
                    rng.randrange(1, 6),
                    rng.randrange(256),
                    b"netsim01",
                    rng.randrange(2**64),
                )
                session.receive_datagram(header + rng.randbytes(rng.randrange(60)), now)
                session.receive_datagram(rng.randbytes(rng.randrange(100)), now)

    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01))
    sim.hooks = [(t / 100, inject) for t in range(0, 30)]
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data


class RecordingProtector(PacketProtector):
    """Logs every packet number it seals (the nonce is IV xor packet number)."""

    __slots__ = ("log",)
    log: list[tuple[int, int]]

    @classmethod
    def wrap(cls, inner: PacketProtector, log: list[tuple[int, int]]) -> PacketProtector:
        recorder = cls.__new__(cls)
        for slot in PacketProtector.__slots__:
            object.__setattr__(recorder, slot, getattr(inner, slot))
        recorder.log = log
        return recorder

    def seal(self, packet_number: int, aad: bytes, payload: bytes | memoryview) -> bytes:
        self.log.append((id(self._aead), packet_number))
        return super().seal(packet_number, aad, payload)


def test_nonces_are_never_reused_over_a_lossy_transfer() -> None:
    log: list[tuple[int, int]] = []
    data = random.Random(8).randbytes(1_500_000)
    pair = make_pair(
        data,
        target_bps=200e6,
        wrap_protector=lambda inner: RecordingProtector.wrap(inner, log),
    )
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.02, loss=0.05, duplicate=0.02))
    sim.sent_by_sender = []
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    assert pair.sender.bytes_retransmitted > 0  # retransmissions happened...
    assert len(set(log)) == len(log)  # ...yet no (key, nonce) pair was sealed twice
    assert len({key for key, _ in log}) == 2  # one key per direction
    numbers = [wire.peek_header(d)[3] for _, d in sim.sent_by_sender]
    assert numbers == sorted(set(numbers))  # on the wire too: strictly increasing


def test_pacing_timer_and_burst_cap() -> None:
    pair = make_pair(random.Random(1).randbytes(2_000_000), target_bps=80e6)  # 10 MB/s
    sender, receiver = pair.sender, pair.receiver
    for datagram in sender.datagrams_to_send(0.0):
        receiver.receive_datagram(datagram, 0.0)
    for datagram in receiver.datagrams_to_send(0.0):
        sender.receive_datagram(datagram, 0.0)
    # A long stall earns at most the burst cap (16 datagrams or 2 ms), not a line-rate flood.
    sent = sender.datagrams_to_send(1.0, max_datagrams=1000)
    assert 16 <= len(sent) <= 17
    timer = sender.get_timer()
    assert timer is not None and 1.0 < timer <= 1.0 + 0.0011  # ~1 ms of credit
    more = sender.datagrams_to_send(timer)
    assert 6 <= len(more) <= 8  # 1 ms at 10 MB/s is ~6.7 datagrams of 1500 bytes


# --- path MTU check ----------------------------------------------------------------------


@pytest.mark.parametrize("sender_is_initiator", [True, False])
def test_padded_handshake_passes_a_wide_path(sender_is_initiator: bool) -> None:
    data = random.Random(3).randbytes(300_000)
    pair = make_pair(
        data, dgram_size=9000, verify_mtu=True, sender_is_initiator=sender_is_initiator
    )
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01, mtu=9000))
    sim.sent_by_sender, sim.sent_by_receiver = [], []
    result = sim.run(5)
    assert result.completed and bytes(pair.sink.data) == data
    hellos = [d for _t, d in sim.sent_by_sender + sim.sent_by_receiver if d[2] in (1, 2)]
    assert hellos and all(len(d) + 28 == 9000 for d in hellos)  # padded to a full datagram


@pytest.mark.parametrize("sender_is_initiator", [True, False])
def test_narrow_path_fails_fast_instead_of_black_holing(sender_is_initiator: bool) -> None:
    data = random.Random(3).randbytes(300_000)
    pair = make_pair(
        data, dgram_size=9000, verify_mtu=True, sender_is_initiator=sender_is_initiator
    )
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01, mtu=1500))
    initiator = pair.sender if sender_is_initiator else pair.receiver
    events = sim.sender_events if sender_is_initiator else sim.receiver_events
    result = sim.run(5, until=lambda s: any(isinstance(e, PathMtuFailed) for e in events))
    assert PathMtuFailed(9000 - 28) in events
    assert result.duration < 2.5  # a few HELLO intervals, not the idle timeout
    assert not initiator.is_alive
    assert pair.receiver.received_count == 0  # no DATA went into the hole
