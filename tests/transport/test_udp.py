"""DatagramSocket on real loopback sockets: batching, GSO/GRO, back-pressure, ICMP, asyncio."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slipstream.transport import udp
from slipstream.transport.udp import DatagramSocket


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HOSTS = [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not _ipv6_available(), reason="no ::1")),
]
OFFLOADS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.fixture
def sockets() -> Iterator[Callable[..., DatagramSocket]]:
    """Factory that binds sockets and closes them all afterwards."""
    opened: list[DatagramSocket] = []

    def make(host: str = "127.0.0.1", **kwargs: Any) -> DatagramSocket:
        sock = DatagramSocket.bind(host, 0, **kwargs)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


class SocketProxy:
    """Wraps the real socket so a test can count calls or inject kernel errors."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.calls: dict[str, int] = {}
        self.fail_on: dict[str, dict[int, int]] = {}  # method -> {call number: errno}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def call(*args: Any) -> Any:
            count = self.calls[name] = self.calls.get(name, 0) + 1
            code = self.fail_on.get(name, {}).get(count)
            if code is not None:
                raise OSError(code, os.strerror(code))
            return target(*args)

        return call


def proxy(sock: DatagramSocket) -> SocketProxy:
    wrapped = SocketProxy(sock._sock)
    sock._sock = wrapped  # type: ignore[assignment]
    return wrapped


def make_datagrams(rng: random.Random, count: int) -> list[bytes]:
    """Runs of equal sizes (what GSO groups), some closed by a shorter one, plus odd sizes."""
    out: list[bytes] = []
    while len(out) < count:
        size = rng.choice([1, 17, 500, 1200, 1472, 8000, rng.randint(1, 1472)])
        for _ in range(rng.randint(1, 70)):
            out.append(rng.randbytes(size))
        if rng.random() < 0.5:
            out.append(rng.randbytes(rng.randint(1, size)))
    return out[:count]


def drain(sock: DatagramSocket, expected: int, timeout: float = 2.0) -> list[tuple[bytes, Any]]:
    """Receive until ``expected`` datagrams arrived; copies, since views are reused."""
    got: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = sock.recv_batch()
        got.extend((bytes(data), addr) for data, addr in batch)
        if not batch:
            time.sleep(0.001)
    return got


def send_all(sender: DatagramSocket, datagrams: list[bytes], addr: tuple[str, int]) -> None:
    sent = 0
    while sent < len(datagrams):
        sent += sender.send_batch(datagrams[sent:], addr)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(("gso", "gro"), OFFLOADS)
def test_round_trip_preserves_order_and_content(
    sockets: Callable[..., DatagramSocket], host: str, gso: bool, gro: bool
) -> None:
    sender = sockets(host, gso=gso, gro=False)
    receiver = sockets(host, gso=False, gro=gro)
    if not gso:
        assert not sender.gso_supported
    if not gro:
        assert not receiver.gro_enabled
    datagrams = make_datagrams(random.Random(7), 3000)
    got: list[tuple[bytes, Any]] = []
    # Batches of up to 64, drained after each: nothing can overflow, so nothing is lost.
    for start in range(0, len(datagrams), 64):
        batch = datagrams[start : start + 64]
        send_all(sender, batch, receiver.local_address)
        got.extend(drain(receiver, len(batch)))
    assert [data for data, _ in got] == datagrams
    assert {addr for _, addr in got} == {sender.local_address}


def test_gso_and_gro_really_coalesce(sockets: Callable[..., DatagramSocket]) -> None:
    sender = sockets(gso=True)
    receiver = sockets(gro=True)
    if not (sender.gso_supported and receiver.gro_enabled):
        pytest.skip("kernel without UDP GSO/GRO")
    tx, rx = proxy(sender), proxy(receiver)
    datagrams = [bytes([i]) * 1472 for i in range(44)] + [b"tail"]
    assert sender.send_batch(datagrams, receiver.local_address) == 45
    assert tx.calls == {"sendmsg": 1}  # 44 x 1472 + 4 = 64772 B in one super-datagram
    got = drain(receiver, 45)
    assert [data for data, _ in got] == datagrams
    # Loopback hands the GSO packet over whole, so GRO returns it in one read, split by us.
    assert rx.calls["recvmsg_into"] <= 2


@pytest.mark.parametrize(
    ("sizes", "runs"),
    [
        ([1000] * 70, [(0, 64), (64, 70)]),  # at most 64 segments
        ([1472] * 50, [(0, 44), (44, 50)]),  # at most 65507 bytes: 44 x 1472 = 64768
        ([1000, 1000, 500, 1000], [(0, 3), (3, 4)]),  # a shorter datagram closes a run
        ([1000, 1200, 1200], [(0, 1), (1, 3)]),  # a longer one starts a new run
        ([0, 0, 5], [(0, 1), (1, 2), (2, 3)]),  # empty datagrams cannot be GSO segments
        ([700, 700, 0, 700], [(0, 2), (2, 3), (3, 4)]),  # nor close a run
        ([40000, 40000], [(0, 1), (1, 2)]),  # two would exceed 65507 bytes
    ],
)
def test_runs_group_equal_sizes(sizes: list[int], runs: list[tuple[int, int]]) -> None:
    datagrams = [bytes(size) for size in sizes]
    found = []
    start = 0
    while start < len(datagrams):
        end, _segment = udp._next_run(datagrams, start, len(datagrams), udp.GSO_MAX_BYTES // 2)
        found.append((start, end))
        start = end
    assert found == runs


def test_memoryview_input_and_mixed_sizes(sockets: Callable[..., DatagramSocket]) -> None:
    sender, receiver = sockets(), sockets()
    blob = memoryview(os.urandom(1472 * 10))
    datagrams: list[bytes | memoryview] = [blob[i * 1472 : (i + 1) * 1472] for i in range(10)]
    datagrams += [b"x" * 3, blob[:100], b"", b"y" * 9000]
    assert sender.send_batch(datagrams, receiver.local_address) == len(datagrams)
    got = drain(receiver, len(datagrams))
    assert [data for data, _ in got] == [bytes(d) for d in datagrams]


def test_recv_batch_respects_max_and_returns_views(sockets: Callable[..., DatagramSocket]) -> None:
    sender, receiver = sockets(gso=False), sockets(gro=False)
    send_all(sender, [bytes([i]) * 100 for i in range(50)], receiver.local_address)
    time.sleep(0.01)
    first = receiver.recv_batch(max_datagrams=20)
    assert len(first) == 20
    assert all(isinstance(data, memoryview) for data, _ in first)
    assert bytes(first[0][0]) == bytes([0]) * 100
    rest = drain(receiver, 30)
    assert [data[0] for data, _ in rest] == list(range(20, 50))


def test_dual_stack_socket_talks_to_ipv4_peer(sockets: Callable[..., DatagramSocket]) -> None:
    if not _ipv6_available():
        pytest.skip("no IPv6")
    any6 = sockets("::")
    peer4 = sockets("127.0.0.1")
    assert any6.send_batch([b"hello"], peer4.local_address) == 1
    [(data, addr)] = drain(peer4, 1)
    assert data == b"hello"
    assert peer4.send_batch([b"back"], addr) == 1
    [(data, addr6)] = drain(any6, 1)
    assert data == b"back" and addr6 == ("::ffff:127.0.0.1", peer4.local_address[1])


def test_reuse_port_lets_two_sockets_share_a_port(sockets: Callable[..., DatagramSocket]) -> None:
    first = sockets(reuse_port=True)
    second = DatagramSocket.bind("127.0.0.1", first.local_address[1], reuse_port=True)
    try:
        assert second.local_address == first.local_address
    finally:
        second.close()


def test_ipv6_addresses_keep_link_local_scope() -> None:
    assert udp._v6_address(("::1", 5, 0, 0)) == ("::1", 5)
    assert udp._v6_address(("fe80::1", 5, 0, 2)) == ("fe80::1%2", 5)


# -- GSO failures -----------------------------------------------------------------------------


def test_gso_einval_falls_back_and_disables(sockets: Callable[..., DatagramSocket]) -> None:
    sender, receiver = sockets(gso=True), sockets(gro=False)
    if not sender.gso_supported:
        pytest.skip("kernel without UDP GSO")
    fake = proxy(sender)
    fake.fail_on["sendmsg"] = {1: errno.EINVAL}
    datagrams = [bytes([i]) * 1000 for i in range(10)]
    assert sender.send_batch(datagrams, receiver.local_address) == 10
    assert not sender.gso_supported
    assert fake.calls["sendto"] == 10
    assert [data for data, _ in drain(receiver, 10)] == datagrams


def test_gso_emsgsize_keeps_gso_for_smaller_segments(
    sockets: Callable[..., DatagramSocket],
) -> None:
    sender, receiver = sockets(gso=True), sockets(gro=False)
    if not sender.gso_supported:
        pytest.skip("kernel without UDP GSO")
    fake = proxy(sender)
    fake.fail_on["sendmsg"] = {1: errno.EMSGSIZE}
    big = [b"b" * 2000] * 3
    small = [b"s" * 1000] * 3
    assert sender.send_batch(big + small, receiver.local_address) == 6
    assert sender.gso_supported
    # Run 1 is [2000 x 3, 1000] (a shorter datagram closes a run): GSO fails, so 4 x sendto;
    # run 2 is [1000 x 2] and still goes through GSO, since 1000 is under the new cap.
    assert fake.calls == {"sendmsg": 2, "sendto": 4}
    assert [data for data, _ in drain(receiver, 6)] == big + small


# -- back-pressure ----------------------------------------------------------------------------


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ENOBUFS])
async def test_backpressure_stops_early_and_wait_writable_resolves(
    sockets: Callable[..., DatagramSocket], gso: bool, code: int
) -> None:
    sender, receiver = sockets(gso=gso), sockets()
    fake = proxy(sender)
    datagrams = [b"a" * 1000] * 5 + [b"b" * 10] + [b"c" * 1000] * 3
    if sender.gso_supported:  # two runs: [a a a a a b] [c c c]; the second finds it full
        fake.fail_on["sendmsg"] = {2: code}
        accepted = 6
    else:
        fake.fail_on["sendto"] = {6: code}
        accepted = 5
    assert sender.send_batch(datagrams, receiver.local_address) == accepted
    await asyncio.wait_for(sender.wait_writable(), 1.0)
    rest = datagrams[accepted:]
    assert sender.send_batch(rest, receiver.local_address) == len(rest)
    assert [data for data, _ in drain(receiver, len(datagrams))] == datagrams


def test_flood_never_raises(sockets: Callable[..., DatagramSocket]) -> None:
    sender = sockets(sndbuf=1)  # the kernel rounds these up to its minimum
    receiver = sockets(rcvbuf=1)
    batch = [b"f" * 1472] * 64
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        assert 0 <= sender.send_batch(batch, receiver.local_address) <= 64
    assert len(receiver.recv_batch()) >= 1  # most were dropped, quietly


NETNS_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from slipstream.transport.udp import DatagramSocket

    async def flood(gso):
        sender = DatagramSocket.bind("127.0.0.1", 0, gso=gso, sndbuf=65536)
        receiver = DatagramSocket.bind("127.0.0.1", 0)
        receiver.attach(asyncio.get_running_loop(), receiver.recv_batch)
        sent = short = 0
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            n = sender.send_batch([bytes(1400)] * 44, receiver.local_address)
            sent += n
            if n < 44:
                short += 1
                await asyncio.wait_for(sender.wait_writable(), 1.0)
        sender.close(); receiver.close()
        return sent, short

    async def main():
        for gso in (False, True):
            sent, short = await flood(gso)
            # Waiting must throttle us: a spin would show as thousands of short sends. (Not an
            # upper bound on `sent`: tbf splits GSO trains and drops the excess silently.)
            assert short >= 1 and sent > 300, (gso, sent, short)
            assert short < 600, (gso, sent, short)  # EAGAIN: ~20; ENOBUFS: <= 1 per ms
        print("ok")

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("limit", ["100m", "20k"], ids=["EAGAIN", "ENOBUFS"])
def test_real_backpressure_in_private_netns(limit: str) -> None:
    """A token bucket on the loopback of a private network namespace makes the kernel full.

    Plain loopback never pushes back (it frees the send buffer at once). A large queue limit
    fills the socket's send buffer (EAGAIN); a tiny one makes the qdisc drop (ENOBUFS).
    """
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"):
        pytest.skip("needs root, unshare and tc")
    setup = (
        "ip link set lo up && "
        f"tc qdisc add dev lo root tbf rate 20mbit burst 16k limit {limit} && "
        f'exec "{sys.executable}" -c "$0"'
    )
    src = str(Path(udp.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    try:
        result = subprocess.run(
            ["unshare", "-n", "sh", "-c", setup, NETNS_SCRIPT],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"netns run failed: {exc}")
    if "Operation not permitted" in result.stderr and "unshare" in result.stderr:
        pytest.skip("unshare not permitted here")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- ICMP errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("gso", [True, False])
def test_icmp_port_unreachable_is_counted(
    sockets: Callable[..., DatagramSocket], host: str, gso: bool
) -> None:
    sender = sockets(host, gso=gso)
    closed = sockets(host)
    dead = closed.local_address
    closed.close()
    for _ in range(5):
        assert sender.send_batch([b"ping"] * 3, dead) == 3  # never raises
        time.sleep(0.002)
    assert sender.recv_batch() == []
    assert sender.icmp_errors >= 5  # one per (super-)datagram that reached the closed port
    assert sender.last_icmp_error is not None
    assert sender.last_icmp_error.errno == errno.ECONNREFUSED
    assert sender.last_icmp_error.destination == dead
    # The socket is still fine for a live peer.
    live = sockets(host)
    assert sender.send_batch([b"alive"], live.local_address) == 1
    assert drain(live, 1)[0][0] == b"alive"


async def test_icmp_error_does_not_spin_the_reader(sockets: Callable[..., DatagramSocket]) -> None:
    sender = sockets()
    closed = sockets()
    dead = closed.local_address
    closed.close()
    wakeups = 0

    def on_readable() -> None:
        nonlocal wakeups
        wakeups += 1
        sender.recv_batch()

    sender.attach(asyncio.get_running_loop(), on_readable)
    for _ in range(3):
        sender.send_batch([b"x"], dead)
    await asyncio.sleep(0.1)
    assert sender.icmp_errors == 3
    assert wakeups <= 3  # an undrained error queue would wake the reader thousands of times


# -- asyncio ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
async def test_attach_delivers_datagrams(sockets: Callable[..., DatagramSocket], host: str) -> None:
    sender, receiver = sockets(host), sockets(host)
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def on_readable() -> None:
        for data, _addr in receiver.recv_batch():
            queue.put_nowait(bytes(data))

    receiver.attach(asyncio.get_running_loop(), on_readable)
    datagrams = [str(i).encode() * 50 for i in range(200)]
    send_all(sender, datagrams, receiver.local_address)
    got = [await asyncio.wait_for(queue.get(), 2.0) for _ in datagrams]
    assert got == datagrams


async def test_close_detaches_and_cancels_waiter(sockets: Callable[..., DatagramSocket]) -> None:
    sock = sockets()
    loop = asyncio.get_running_loop()
    sock.attach(loop, lambda: None)
    sock._device_full = True  # make the waiter pending (ENOBUFS back-off) so close can cancel it
    waiter = asyncio.ensure_future(sock.wait_writable())
    sock.close()
    sock.close()  # idempotent
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not loop.remove_reader(sock.fileno())
    assert sock.recv_batch() == []


async def test_wait_writable_is_shared_and_one_shot(sockets: Callable[..., DatagramSocket]) -> None:
    sock = sockets()
    first = sock.wait_writable()
    assert sock.wait_writable() is first
    await asyncio.wait_for(first, 1.0)
    second = sock.wait_writable()
    assert second is not first
    await asyncio.wait_for(second, 1.0)


def test_locally_refused_sends_count_as_drops(sockets: Callable[..., DatagramSocket]) -> None:
    # A local firewall's output drop surfaces as EPERM: the datagrams are lost (the protocol
    # recovers or times out), the call returns normally, and later sends work.
    for gso in (True, False):
        sender, receiver = sockets(gso=gso), sockets(gro=False)
        fake = proxy(sender)
        fake.fail_on["sendmsg" if sender.gso_supported else "sendto"] = {1: errno.EPERM}
        refused = [bytes([i]) * 1000 for i in range(4)]
        # One GSO call carries the whole run; without GSO only the first datagram is refused.
        expected = [b"after"] if sender.gso_supported else [*refused[1:], b"after"]
        assert sender.send_batch(refused, receiver.local_address) == len(refused)
        assert sender.send_drops == 1
        assert isinstance(sender.last_send_error, PermissionError)
        assert sender.send_batch([b"after"], receiver.local_address) == 1
        assert [data for data, _ in drain(receiver, len(expected))] == expected
