"""The server's side of one transfer session, run for each SSH "slipstream" channel.

It reads the client's OPEN, checks the user's rights and the spec, answers ACCEPT with fresh
session keys, then runs the same send or receive driver as the client, confined to the
user's docroot. One log line per session and per file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from typing import Any

from slipstream.engine.paths import DestinationResolver, SourceEntry, expand_sources
from slipstream.engine.session import (
    ControlStream,
    ReceiveOptions,
    RecvDriver,
    SendDriver,
    SessionTotals,
    _CoreWatch,
)
from slipstream.engine.wiring import RateSettings, SessionParams, build_receiver, build_sender
from slipstream.errors import PermissionDenied, ProtocolError, SlipstreamError
from slipstream.protocol import control
from slipstream.server.config import ServerConfig, UserConfig
from slipstream.spec import TransferSpec, load_transfer_spec
from slipstream.transport.endpoint import Endpoint, UdpDispatcher

log = logging.getLogger("slipstream.server")

# A client that negotiated but never sent a UDP datagram is given up after this long.
UDP_HANDSHAKE_TIMEOUT = 30.0


class SessionManager:
    """Owns the shared UDP port and runs every session that arrives over SSH."""

    def __init__(self, config: ServerConfig, dispatcher: UdpDispatcher) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.active: dict[bytes, dict[str, Any]] = {}

    async def handle(
        self, user: UserConfig, reader: Any, writer: Any, peer: tuple[str, int]
    ) -> int:
        ctl = ControlStream(reader, writer)
        try:
            spec = await self._read_open(ctl)
            self._check_rights(user, spec)
            await self._run(user, peer, ctl, spec)
            return 0
        except SlipstreamError as exc:
            log.warning(
                "session user=%s peer=%s result=error code=%d %s",
                user.name,
                _peer(peer),
                exc.code,
                exc.internal_message,
            )
            await ctl.send_error(exc)
            return 1
        except asyncio.CancelledError:
            log.warning(
                "session user=%s peer=%s result=aborted (client went away)", user.name, _peer(peer)
            )
            raise

    async def _read_open(self, ctl: ControlStream) -> TransferSpec:
        msg = await ctl.recv()
        if msg is None or msg["t"] != control.OPEN:
            raise ProtocolError("The client did not open a session", origin="remote")
        if int(msg["v"]) != control.PROTOCOL_VERSION:
            raise ProtocolError(f"Unsupported protocol version {msg['v']}", origin="remote")
        return load_transfer_spec(msg["spec"])

    def _check_rights(self, user: UserConfig, spec: TransferSpec) -> None:
        if spec.direction == "send" and not user.write:
            raise PermissionDenied(f"User {user.name} may not upload")
        if spec.direction == "receive" and not user.read:
            raise PermissionDenied(f"User {user.name} may not download")

    async def _run(
        self, user: UserConfig, peer: tuple[str, int], ctl: ControlStream, spec: TransferSpec
    ) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.dispatcher.sock.local_address[:2]
        params = SessionParams.create(spec.cipher, spec.dgram_size, port, ipv6=":" in host)
        watch = _CoreWatch()
        driver: SendDriver | RecvDriver
        if spec.direction == "send":  # the client uploads: we receive
            resolver = _docroot_destination(user, spec)
            driver = RecvDriver(
                ctl,
                resolver,
                self._file_logger(user, peer, "in"),
                params.block_payload,
                ReceiveOptions.from_spec(spec),
            )
            core: Any = build_receiver(params, initiator=False, sink=driver.sink, now=loop.time())
        else:
            entries = _docroot_sources(user, spec)
            driver = SendDriver(
                ctl, entries, self._file_logger(user, peer, "out"), params.block_payload
            )
            core = build_sender(
                params,
                initiator=False,
                source=driver.source,
                rate=RateSettings.from_spec(spec),
                now=loop.time(),
            )
        endpoint = Endpoint(core, self.dispatcher.sock, None, watch.on_event, watch.fail)
        driver.attach(core, endpoint.step, watch)
        self.dispatcher.register(params.session_id, endpoint)
        try:
            await ctl.send(control.ACCEPT, **params.to_accept())
            totals = await driver.run()
            core.close(loop.time())
            endpoint.step()
            _log_session(user, peer, spec, totals)
        finally:
            endpoint.close()
            self.dispatcher.unregister(params.session_id)

    def _file_logger(self, user: UserConfig, peer: tuple[str, int], way: str) -> Any:
        def emit(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind in ("file_done", "file_error", "file_skipped"):
                log.info(
                    "file user=%s peer=%s dir=%s path=%s result=%s size=%s",
                    user.name,
                    _peer(peer),
                    way,
                    event.get("path"),
                    kind,
                    event.get("size", ""),
                )

        return emit


def _peer(peer: tuple[str, int]) -> str:
    return f"{peer[0]}:{peer[1]}"


def _log_session(
    user: UserConfig, peer: tuple[str, int], spec: TransferSpec, totals: SessionTotals
) -> None:
    summary = totals.as_dict()
    log.info(
        "session user=%s peer=%s direction=%s files=%d skipped=%d failed=%d bytes=%d "
        "rate_mbps=%.1f result=%s",
        user.name,
        _peer(peer),
        "upload" if spec.direction == "send" else "download",
        totals.files_done,
        totals.files_skipped,
        totals.files_failed,
        totals.bytes_files,
        summary["rate_bps"] / 1e6,
        "ok" if totals.files_failed == 0 else "partial",
    )


def _docroot_sources(user: UserConfig, spec: TransferSpec) -> Iterator[SourceEntry]:
    entries = expand_sources(
        [(p.source, p.destination) for p in spec.path_pairs()],
        base_dir=user.docroot,
        docroot=user.docroot,
        source_root=spec.source_root,
        src_base=spec.src_base,
    )
    # Resolve the first source now, so a wrong or forbidden path is refused before the
    # session is accepted rather than after the client started its UDP handshake.
    first = next(entries, None)
    return itertools.chain([first] if first is not None else [], entries)


def _docroot_destination(user: UserConfig, spec: TransferSpec) -> DestinationResolver:
    pairs = spec.path_pairs()
    resolver = DestinationResolver(
        spec.destination_root or "/",
        docroot=user.docroot,
        base_dir=user.docroot,
        single_source=len(pairs) == 1,
        create_dir=spec.create_dir,
        pair_mode=spec.is_pair_format or spec.src_base is not None,
    )
    resolver.prepare()
    return resolver
