"""The server's side of one transfer session, run for each SSH "slipstream" channel.

It reads the client's OPEN, checks the user's rights and the spec, answers ACCEPT with fresh
session keys, then runs the same send or receive driver as the client, confined to the
user's docroot. One log line per session and per file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

from slipstream.engine.control_stream import ControlStream
from slipstream.engine.driver import CoreWatch
from slipstream.engine.incoming import ReceiveOptions
from slipstream.engine.livecontrol import ServerRate
from slipstream.engine.multisession import select_share
from slipstream.engine.outgoing import SendOptions
from slipstream.engine.pathmemory import PathMemory, resume_path
from slipstream.engine.paths import DestinationResolver, SourceEntry
from slipstream.engine.recv_driver import RecvDriver
from slipstream.engine.selection import LeftOut, select_sources
from slipstream.engine.semantics import changes_sources, check_file_semantics, session_metadata
from slipstream.engine.send_driver import SendDriver
from slipstream.engine.totals import SessionTotals
from slipstream.engine.wiring import (
    FEATURES,
    RateSettings,
    SessionParams,
    build_receiver,
    build_sender,
    choose_dgram_size,
)
from slipstream.errors import PeerAborted, PermissionDenied, ProtocolError, SlipstreamError
from slipstream.protocol import control
from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.hooks import SessionHooks
from slipstream.server.rate_policy import AggregateBudget
from slipstream.spec import TransferSpec, load_transfer_spec
from slipstream.transport.endpoint import Endpoint, UdpDispatcher
from slipstream.transport.pmtu import route_mtu

log = logging.getLogger("slipstream.server")

# A client that negotiated but never sent a UDP datagram is given up after this long.
UDP_HANDSHAKE_TIMEOUT = 30.0
# One log line each; a split file's ranges (multi_session_threshold) get one per range too.
_LOGGED_FILE_EVENTS = (
    "file_done",
    "file_error",
    "file_skipped",
    "file_excluded",
    "range_done",
    "range_error",
)


class SessionManager:
    """Owns the shared UDP port and runs every session that arrives over SSH."""

    def __init__(
        self,
        config: ServerConfig,
        dispatcher: UdpDispatcher,
        hooks: SessionHooks | None = None,
        budget: AggregateBudget | None = None,
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.hooks = hooks or SessionHooks()  # tokens, ops records, HTTPS fallback
        self.active: dict[bytes, dict[str, Any]] = {}
        # One aggregate cap for all sessions; the server shares it with its HTTPS fallback.
        self.budget = budget or AggregateBudget(config.aggregate_rate_kbps)
        # What each download's sender learned of the path to its client, for the next one.
        self.paths = PathMemory()

    async def handle(
        self, user: UserConfig, reader: Any, writer: Any, peer: tuple[str, int]
    ) -> int:
        ctl = ControlStream(reader, writer)
        tracked: Any = None
        try:
            first = await ctl.recv()
            if first is None:  # closed before OPEN: a client's spare stream it never used
                log.info("user %s from %s closed a control stream unused", user.name, _peer(peer))
                return 0
            spec, opened = self._read_open(first)
            self.hooks.authorize(user, spec)  # a token login: before any file system access
            self._check_rights(user, spec)
            tracked = self.hooks.started(user, peer, spec)
            await self._run(user, peer, ctl, spec, tracked, opened)
            self.hooks.finished(tracked, None)
            return 0
        except SlipstreamError as exc:
            self.hooks.finished(tracked, exc)
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
            self.hooks.finished(tracked, PeerAborted("The client went away"))
            log.warning(
                "session user=%s peer=%s result=aborted (client went away)", user.name, _peer(peer)
            )
            raise

    def _read_open(self, msg: dict[str, Any]) -> tuple[TransferSpec, dict[str, Any]]:
        if msg["t"] != control.OPEN:
            raise ProtocolError("The client did not open a session", origin="remote")
        if int(msg["v"]) != control.PROTOCOL_VERSION:
            raise ProtocolError(f"Unsupported protocol version {msg['v']}", origin="remote")
        return load_transfer_spec(msg["spec"]), msg

    def _check_rights(self, user: UserConfig, spec: TransferSpec) -> None:
        check_session_rights(user, spec)

    async def _run(
        self,
        user: UserConfig,
        peer: tuple[str, int],
        ctl: ControlStream,
        spec: TransferSpec,
        tracked: Any = None,
        opened: dict[str, Any] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.dispatcher.sock.local_address[:2]
        opened = opened or {}
        features = tuple(str(f) for f in opened.get("features") or ())
        rate = ServerRate(
            spec,
            user.rate.limits(),
            user.rate.target_rate_default_kbps,
            self.budget.share_kbps(extra=1),
        )
        params = _session_params(spec, opened, peer[0], port, ipv6=":" in host, rate=rate)
        watch = CoreWatch()
        driver: SendDriver | RecvDriver
        if spec.direction == "send":  # the client uploads: we receive
            resolver = _docroot_destination(user, spec)
            driver = RecvDriver(
                ctl,
                resolver,
                self._file_logger(user, peer, "in", tracked),
                params.block_payload,
                ReceiveOptions.from_spec(
                    spec,
                    allow_overwrite=self._may_overwrite(user),
                    link_root=user.docroot,
                ),
            )
            core: Any = build_receiver(params, initiator=False, sink=driver.sink, now=loop.time())
        else:
            entries = _docroot_sources(user, spec)
            driver = SendDriver(
                ctl,
                entries,
                self._file_logger(user, peer, "out", tracked),
                params.block_payload,
                SendOptions.from_spec(
                    spec, local=False, base_dir=user.docroot, docroot=user.docroot
                ),
            )
            core = build_sender(
                params,
                initiator=False,
                source=driver.source,
                rate=RateSettings.from_state(rate.state),
                now=loop.time(),
            )
            resume_path(core, self.paths, peer[0])
            driver.rate_handler = rate.on_client_rate  # a download client's live change
        rate.attach("receive" if spec.direction == "send" else "send", core, ctl, features)
        endpoint = Endpoint(core, self.dispatcher.sock, None, watch.on_event, watch.fail)
        driver.attach(core, endpoint.step, watch)
        self.dispatcher.register(params.session_id, endpoint)
        share_handle = self.budget.join(rate.on_share)
        try:
            extra = self.hooks.accept_extra(user, spec, tracked)
            await ctl.send(control.ACCEPT, **params.to_accept(), **extra)
            if "zlib" in features:  # the client deflates from here on too
                ctl.start_compression()
            totals = await driver.run()
            core.close(loop.time())
            endpoint.step()
            if spec.direction == "receive":  # we sent: remember the path
                self.paths.remember(peer[0], core.rate_controller.path_estimate())
            _log_session(user, peer, spec, totals)
        finally:
            self.budget.leave(share_handle)
            endpoint.close()
            self.dispatcher.unregister(params.session_id)

    def _may_overwrite(self, user: UserConfig) -> bool:
        return may_overwrite(self.config, user)

    def _file_logger(
        self, user: UserConfig, peer: tuple[str, int], way: str, tracked: Any = None
    ) -> Any:
        def emit(event: dict[str, Any]) -> None:
            kind = event.get("type")
            self.hooks.file_event(tracked, event)
            if kind in _LOGGED_FILE_EVENTS:
                log.info(
                    "file user=%s peer=%s dir=%s path=%s result=%s size=%s%s",
                    user.name,
                    _peer(peer),
                    way,
                    event.get("path"),
                    kind,
                    event.get("size", ""),
                    _file_details(event),
                )

        return emit


def check_session_rights(user: UserConfig, spec: TransferSpec) -> None:
    """The user's rights and the spec's file semantics, before a session (any transport)."""
    if spec.direction == "send" and not user.write:
        raise PermissionDenied(f"User {user.name} may not upload")
    if spec.direction == "receive" and not user.read:
        raise PermissionDenied(f"User {user.name} may not download")
    check_file_semantics(spec, client=False)
    if spec.direction == "receive" and not user.write and changes_sources(spec):
        raise PermissionDenied(
            f"User {user.name} may not remove or move files (remove/move_after_transfer)"
        )


def may_overwrite(config: ServerConfig, user: UserConfig) -> bool:
    """The per-user ``overwrite`` setting, else the server's (both default to allow)."""
    own = getattr(user, "overwrite", None)
    return bool(own if own is not None else getattr(config, "overwrite", True))


def _session_params(
    spec: TransferSpec,
    opened: dict[str, Any],
    peer_ip: str,
    port: int,
    *,
    ipv6: bool,
    rate: ServerRate,
) -> SessionParams:
    """Keys, datagram size (path MTU, docs/protocol.md) and the rate granted to a session."""
    features = tuple(str(f) for f in opened.get("features") or ())
    client_mtu = opened.get("mtu") if "pmtu" in features else None
    size, verify = choose_dgram_size(
        spec.dgram_size,
        int(client_mtu) if isinstance(client_mtu, int) else None,
        route_mtu(peer_ip),
    )
    params = SessionParams.create(
        spec.cipher, size, port, ipv6=ipv6, verify_mtu=verify, features=FEATURES
    )
    return dataclasses.replace(params, rate=rate.state.to_wire(), rate_limits=rate.limits.to_wire())


def _peer(peer: tuple[str, int]) -> str:
    return f"{peer[0]}:{peer[1]}"


def _log_session(
    user: UserConfig, peer: tuple[str, int], spec: TransferSpec, totals: SessionTotals
) -> None:
    summary = totals.as_dict()
    log.info(
        "session user=%s peer=%s direction=%s files=%d skipped=%d failed=%d bytes=%d "
        "rate_mbps=%.1f result=%s%s",
        user.name,
        _peer(peer),
        "upload" if spec.direction == "send" else "download",
        totals.files_done,
        totals.files_skipped,
        totals.files_failed,
        totals.bytes_files,
        summary["rate_bps"] / 1e6,
        "ok" if totals.files_failed == 0 else "partial",
        _metadata_text(spec),
    )


def _file_details(event: dict[str, Any]) -> str:
    """The optional parts of a file log line: checksum, resume point, skip reason."""
    parts = []
    if event.get("length") is not None:  # a range of a split file
        parts.append(f" range={event.get('offset')}+{event['length']}")
    if event.get("file_checksum"):
        parts.append(f" checksum={event['file_checksum_type']}:{event['file_checksum']}")
    if event.get("resumed_from"):
        parts.append(f" resumed_from={event['resumed_from']}")
    if event.get("reason"):
        parts.append(f" reason={json.dumps(event['reason'])}")
    return "".join(parts)


def _metadata_text(spec: TransferSpec) -> str:
    """`` cookie=... tags=...`` as JSON values: quoted, so a newline cannot forge a line."""
    metadata = session_metadata(spec)
    return "".join(f" {key}={json.dumps(value)}" for key, value in metadata.items())


def _docroot_sources(user: UserConfig, spec: TransferSpec) -> Iterator[SourceEntry | LeftOut]:
    entries = select_sources(spec, base_dir=user.docroot, docroot=user.docroot)
    # One of N multi_session shares, or everything; big files may come as one range each
    # (multi_session_threshold: engine/multisession.py).
    entries = select_share(entries, spec)
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
