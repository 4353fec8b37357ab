"""Drives one sans-IO session over a datagram socket: transmit, and one timer. Nothing else.

The client owns its socket; the server shares one socket between all sessions and hands
each endpoint the datagrams carrying its session id (``UdpDispatcher``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from slipstream.errors import SlipstreamError
from slipstream.transport.udp import DatagramSocket

log = logging.getLogger("slipstream.transport")

SESSION_ID_SLICE = slice(4, 12)  # where every datagram header carries the session id
MAX_SEND_BATCH = 64


class SessionCore(Protocol):
    authenticated_datagrams: int

    def receive_datagram(self, data: bytes | memoryview, now: float) -> None: ...
    def datagrams_to_send(self, now: float, max_datagrams: int = 64) -> list[bytes]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...


Address = tuple[str, int]


class Endpoint:
    """Feeds datagrams into a session core, sends what it wants to send, re-arms its timer.

    Events from the core go to ``on_event`` right after each step, so the engine sees
    acknowledgements and timeouts without polling.
    """

    def __init__(
        self,
        core: SessionCore,
        sock: DatagramSocket,
        peer: Address | None,
        on_event: Callable[[Any], None],
        on_error: Callable[[SlipstreamError], None],
    ) -> None:
        self.core = core
        self.sock = sock
        self.peer = peer
        self._on_event = on_event
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._backlog: list[bytes] = []
        self._waiting_writable = False
        self.closed = False
        self.datagrams_in = 0

    def now(self) -> float:
        return self._loop.time()

    def datagrams_received(self, batch: list[tuple[bytes | memoryview, Address]]) -> None:
        """Feed one drained batch (one clock reading for all of it: this is the hot path)."""
        if self.closed:
            return
        core = self.core
        receive = core.receive_datagram
        now = self.now()
        authenticated = core.authenticated_datagrams
        try:
            for data, addr in batch:
                receive(data, now)
                # The peer's address is learnt from traffic (it may sit behind NAT), but only
                # from datagrams that authenticated: a forged one cannot redirect the session.
                if core.authenticated_datagrams != authenticated:
                    authenticated = core.authenticated_datagrams
                    self.peer = addr
        except SlipstreamError as exc:  # the sink could not write: disk full, I/O error
            self._fail(exc)
        self.datagrams_in += len(batch)

    def step(self) -> None:
        """After input or a timer: drain events, send, re-arm. Call once per batch."""
        if self.closed:
            return
        try:
            self._drain_events()
            self.transmit()
            self._drain_events()
        except SlipstreamError as exc:  # the source could not read a file
            self._fail(exc)
            return
        self._arm_timer()

    def _fail(self, error: SlipstreamError) -> None:
        self.close()
        self._on_error(error)

    def transmit(self) -> None:
        if self.peer is None or self.closed:
            return
        if self._backlog and not self._flush_backlog():
            return
        now = self.now()
        while True:
            datagrams = self.core.datagrams_to_send(now, MAX_SEND_BATCH)
            if not datagrams:
                return
            sent = self.sock.send_batch(datagrams, self.peer)
            if sent < len(datagrams):
                # Kernel buffer full: keep the rest (bounded by one batch) and wait.
                self._backlog = datagrams[sent:]
                self._wait_writable()
                return
            if len(datagrams) < MAX_SEND_BATCH:
                return

    def _flush_backlog(self) -> bool:
        assert self.peer is not None
        sent = self.sock.send_batch(self._backlog, self.peer)
        self._backlog = self._backlog[sent:]
        if self._backlog:
            self._wait_writable()
            return False
        return True

    def _wait_writable(self) -> None:
        if self._waiting_writable:
            return
        self._waiting_writable = True

        async def wait() -> None:
            try:
                await self.sock.wait_writable()
            finally:
                self._waiting_writable = False
            self.step()

        self._loop.create_task(wait())

    def _drain_events(self) -> None:
        while (event := self.core.next_event()) is not None:
            self._on_event(event)

    def _arm_timer(self) -> None:
        when = self.core.get_timer()
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and not self.closed:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        try:
            self.core.handle_timer(self.now())
        except SlipstreamError as exc:
            self._fail(exc)
            return
        self.step()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class OwnSocketReader:
    """A client endpoint's socket: every datagram on it belongs to that one endpoint."""

    def __init__(self, sock: DatagramSocket, endpoint: Endpoint) -> None:
        self._sock = sock
        self._endpoint = endpoint
        sock.attach(asyncio.get_running_loop(), self._readable)

    def _readable(self) -> None:
        self._endpoint.datagrams_received(self._sock.recv_batch())
        self._endpoint.step()


class UdpDispatcher:
    """The server's one UDP port: routes each datagram to its session by session id."""

    def __init__(self, sock: DatagramSocket) -> None:
        self.sock = sock
        self._sessions: dict[bytes, Endpoint] = {}
        self.unknown_datagrams = 0
        sock.attach(asyncio.get_running_loop(), self._readable)

    def register(self, session_id: bytes, endpoint: Endpoint) -> None:
        self._sessions[session_id] = endpoint

    def unregister(self, session_id: bytes) -> None:
        self._sessions.pop(session_id, None)

    def _readable(self) -> None:
        batches: dict[bytes, list[tuple[bytes | memoryview, Address]]] = {}
        for item in self.sock.recv_batch():
            session_id = bytes(item[0][SESSION_ID_SLICE])
            batch = batches.get(session_id)
            if batch is None:
                if session_id not in self._sessions:
                    self.unknown_datagrams += 1
                    continue
                batch = batches[session_id] = []
            batch.append(item)
        for session_id, batch in batches.items():
            endpoint = self._sessions[session_id]
            endpoint.datagrams_received(batch)
            endpoint.step()
