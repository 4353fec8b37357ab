"""ControlStream's batching over a real TCP socket: one write per batch, never left corked."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from slipstream.engine.control_stream import MIN_FLUSH_INTERVAL, ControlStream
from slipstream.transport.tcp_tuning import tcp_socket


class _Writer:
    """A stand-in for asyncssh's writer: records writes and exposes a real TCP socket the way
    ``get_extra_info("connection").get_extra_info("socket")`` does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes: list[tuple[bytes, int]] = []

    def get_extra_info(self, name: str) -> Any:
        return self if name == "connection" else self.sock

    def write(self, data: bytes) -> None:
        corked = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
        self.writes.append((data, corked))
        self.sock.sendall(data)


@pytest.fixture
def tcp_pair() -> Any:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


async def test_a_batch_is_one_corked_write_and_the_cork_comes_off(tcp_pair: Any) -> None:
    client, server = tcp_pair
    writer = _Writer(client)
    stream = ControlStream(reader=None, writer=writer)
    for index in range(3):
        stream.send_nowait("ready", id=index, first_block=0, count=1, offset=0)
    await asyncio.sleep(0)  # the gathered messages are written once per loop iteration
    assert len(writer.writes) == 1
    data, corked_while_writing = writer.writes[0]
    assert data.count(b"\n") == 3
    assert corked_while_writing == 1
    # Left corked, the next small batch would wait up to 200 ms in the kernel.
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    server.settimeout(2)
    received = b""
    while received.count(b"\n") < 3:
        received += server.recv(4096)
    assert received == data


async def test_streams_without_a_tcp_socket_still_write() -> None:
    class Plain:
        def __init__(self) -> None:
            self.data = b""

        def get_extra_info(self, name: str) -> None:
            return None

        def write(self, data: bytes) -> None:
            self.data += data

    writer = Plain()
    stream = ControlStream(reader=None, writer=writer)
    stream.send_nowait("eof", files=0)
    await asyncio.sleep(0)
    assert writer.data.endswith(b"\n") and b'"eof"' in writer.data
    assert tcp_socket(writer) is None


async def test_a_burst_soon_after_a_write_waits_to_share_the_next_one() -> None:
    class Recording:
        def __init__(self) -> None:
            self.writes: list[tuple[float, bytes]] = []

        def get_extra_info(self, name: str) -> None:
            return None

        def write(self, data: bytes) -> None:
            self.writes.append((asyncio.get_running_loop().time(), data))

        async def drain(self) -> None:
            pass

    writer = Recording()
    stream = ControlStream(reader=None, writer=writer)
    stream.send_nowait("ready", id=0, first_block=0, count=1, offset=0)
    await asyncio.sleep(0)
    assert len(writer.writes) == 1  # after a quiet spell: at once
    for index in range(1, 4):
        stream.send_nowait("ready", id=index, first_block=index, count=1, offset=0)
        await asyncio.sleep(0)
    assert len(writer.writes) == 1  # held back, gathering
    await asyncio.sleep(MIN_FLUSH_INTERVAL * 2)
    assert len(writer.writes) == 2
    (first_at, _), (second_at, second) = writer.writes
    assert second.count(b"\n") == 3
    assert second_at - first_at >= MIN_FLUSH_INTERVAL * 0.9
    await stream.send("eof", files=4)  # an explicit send never waits
    assert len(writer.writes) == 3
