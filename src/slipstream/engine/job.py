"""A client transfer job: a TransferSpec in, files moved, events out.

``transfer()`` is the public Python API (``slipstream.transfer``); the CLI and the agent call
it. It opens the SSH control channel, negotiates the session, runs the UDP handshake, then
hands the data phase to a send or receive driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream.engine.driver import CoreWatch
from slipstream.engine.livecontrol import ClientLive, RateControl
from slipstream.engine.multisession import (
    run_multi_session,
    select_share,
    session_count,
    session_index,
)
from slipstream.engine.pathmemory import PathMemory, resume_path
from slipstream.engine.paths import SourceEntry, expand_sources
from slipstream.engine.selection import select_sources
from slipstream.engine.semantics import check_file_semantics, session_metadata
from slipstream.engine.session import (
    ControlStream,
    ReceiveOptions,
    RecvDriver,
    SendDriver,
    SendOptions,
    SessionTotals,
)
from slipstream.engine.wiring import (
    DEFAULT_DGRAM_SIZE,
    SessionParams,
    build_receiver,
    build_sender,
    client_rate_settings,
    destination_for_spec,
    open_extras,
)
from slipstream.errors import (
    PathMtuError,
    PeerAborted,
    ProtocolError,
    SlipstreamError,
    UdpBlocked,
    UsageError,
    error_from_dict,
)
from slipstream.protocol import control
from slipstream.spec import TransferSpec, load_transfer_spec
from slipstream.transport.endpoint import Endpoint, OwnSocketReader
from slipstream.transport.shared import (
    SharedControl,
    SharedLogin,
    open_shared_control,
    start_master_in_background,
)
from slipstream.transport.trustfile import default_known_hosts_path
from slipstream.transport.udp import DatagramSocket

log = logging.getLogger("slipstream.engine")

Emit = Callable[[dict[str, Any]], None]
UDP_HANDSHAKE_TIMEOUT = 10.0
SECRET_FIELDS = (
    "remote_password",
    "ssh_private_key",
    "ssh_private_key_passphrase",
    "content_protection_passphrase",
    "token",  # travels in the SSH login (or the HTTPS Authorization header), never in OPEN
)


@dataclass
class ClientOptions:
    """How this client connects; none of it travels to the server."""

    password: str | None = None
    key_files: list[str] = field(default_factory=list)
    known_hosts: Path | None = None
    accept_new_host: bool = False
    cwd: Path | None = None
    udp_timeout: float = UDP_HANDSHAKE_TIMEOUT
    progress_interval: float = 1.0
    rate_control: RateControl | None = None  # live changes (engine/livecontrol.py)
    control_socket: Path | None = None  # serve `slipstream modify` here during the transfer
    docroot: Path | None = None  # confine local paths (server-initiated transfers)
    # Keep the SSH login this long (seconds) for later transfers to the same server, and use
    # one kept by an earlier transfer (transport/shared.py). 0: log in and out every time.
    persist: float = 0.0


@dataclass
class TransferResult:
    direction: str
    totals: SessionTotals
    transport: str = "fasp"

    @property
    def ok(self) -> bool:
        return self.totals.files_failed == 0

    def as_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "transport": self.transport, **self.totals.as_dict()}


def _emit_safely(on_event: Emit | None) -> Emit:
    def emit(event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        if on_event is not None:
            on_event(event)

    return emit


async def transfer(
    spec: TransferSpec | dict[str, Any],
    on_event: Emit | None = None,
    options: ClientOptions | None = None,
) -> TransferResult:
    """Run one transfer described by ``spec``; raises a SlipstreamError on failure."""
    spec = spec if isinstance(spec, TransferSpec) else load_transfer_spec(spec)
    options = options or ClientOptions()
    emit = _emit_safely(on_event)
    try:
        check_file_semantics(spec, client=True)
        if session_count(spec) > 1 and session_index(spec) is None:
            return await _run_multi(spec, options, emit)
        try:
            return await _run(spec, options, emit)
        except PathMtuError as exc:
            if (spec.dgram_size or 0) == DEFAULT_DGRAM_SIZE:
                raise
            # The padded handshake proved the chosen size does not pass: no data moved yet,
            # so a fresh session with standard datagrams loses nothing.
            emit({"type": "pmtu_fallback", "dgram_size": DEFAULT_DGRAM_SIZE, **exc.to_dict()})
            fallback = spec.model_copy(update={"dgram_size": DEFAULT_DGRAM_SIZE})
            return await _run(fallback, options, emit)
    except SlipstreamError as exc:
        emit({"type": "error", **exc.to_dict()})
        raise


async def _run_multi(spec: TransferSpec, options: ClientOptions, emit: Emit) -> TransferResult:
    """``multi_session: N``: N child processes, one session each (engine/multisession.py)."""
    summed = await run_multi_session(spec, emit, options)
    now = time.monotonic()
    totals = SessionTotals(
        files_done=summed["files_done"],
        files_skipped=summed["files_skipped"],
        files_failed=summed["files_failed"],
        dirs=summed["dirs"],
        bytes_files=summed["bytes"],
        started=now - summed["elapsed_s"],
        finished=now,
    )
    result = TransferResult(spec.direction, totals)
    emit({"type": "session_done", "sessions": summed["sessions"], **result.as_dict()})
    return result


def transfer_sync(
    spec: TransferSpec | dict[str, Any],
    on_event: Emit | None = None,
    options: ClientOptions | None = None,
) -> TransferResult:
    """Blocking wrapper around :func:`transfer`."""
    return asyncio.run(transfer(spec, on_event, options))


def _require_endpoint(spec: TransferSpec) -> tuple[str, str]:
    if not spec.remote_host:
        raise UsageError("remote_host: the server to transfer with is required")
    if not spec.remote_user:
        raise UsageError("remote_user: the transfer user is required")
    return spec.remote_host, spec.remote_user


def _wire_spec(spec: TransferSpec) -> dict[str, Any]:
    body = spec.to_json_dict()
    for name in SECRET_FIELDS:
        body.pop(name, None)
    return body


async def _run(spec: TransferSpec, options: ClientOptions, emit: Emit) -> TransferResult:
    # The HTTPS fallback (and aiohttp, ~0.17 s to import) loads only when it is used.
    host, user = _require_endpoint(spec)
    password = spec.remote_password or options.password
    if spec.http_fallback == "force":
        from slipstream.engine.fallback import plan_fallback

        return await _run_http(spec, options, emit, plan_fallback(spec, password, None), "forced")
    keys = list(options.key_files)
    if spec.authentication == "token":
        # The token rides in the SSH password field and no key is offered: docs/protocol.md.
        if not spec.token:
            raise UsageError("authentication is 'token' but the spec has no token")
        password, keys = spec.token, []
    elif getattr(spec, "ssh_private_key_path", None):
        keys.append(str(spec.ssh_private_key_path))
    login = SharedLogin(
        host=host,
        port=spec.ssh_port,
        user=user,
        persist=options.persist,
        password=password,
        # Absolute: a master (transport/master.py) runs in another folder.
        client_keys=tuple(_absolute(k) for k in keys)
        if keys or spec.authentication == "token"
        else None,
        passphrase=getattr(spec, "ssh_private_key_passphrase", None),
        known_hosts=_absolute(options.known_hosts or default_known_hosts_path()),
        sshfp=spec.sshfp,
        accept_new_host=options.accept_new_host,
    )
    channel, starting = await _control_channel(login, shareable=spec.authentication != "token")
    fallback: Any = None  # an engine.fallback.FallbackTarget once UDP turns out blocked
    try:
        ctl = ControlStream(channel.reader, channel.writer)
        extras = open_extras(channel.peer_address[0])
        await ctl.send(control.OPEN, v=control.PROTOCOL_VERSION, spec=_wire_spec(spec), **extras)
        accept = await _expect_accept(ctl)
        params = SessionParams.from_accept(accept)
        if "zlib" in params.features and "zlib" in extras["features"]:  # both offered it
            ctl.start_compression()
        peer_ip = channel.peer_address[0]
        emit(
            {
                "type": "session_start",
                "direction": spec.direction,
                "host": host,
                "user": user,
                "ssh_port": spec.ssh_port,
                "fasp_port": params.udp_port,
                "cipher": params.cipher,
                "dgram_size": params.dgram_size,  # path MTU discovery's choice
                "session_id": params.session_id.hex(),
                "transport": "fasp",
                "xfer_id": accept.get("xfer_id"),
                "login": "shared" if isinstance(channel, SharedControl) else "new",
                "control_compression": "zlib" if ctl.compressed else "none",
                **session_metadata(spec),
            }
        )
        try:
            totals = await _data_phase(spec, options, emit, ctl, params, (peer_ip, params.udp_port))
        except UdpBlocked as exc:
            if not spec.http_fallback:
                raise
            from slipstream.engine.fallback import plan_fallback

            fallback, reason = plan_fallback(spec, password, accept), exc.user_message
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
        if starting is not None:  # best effort: never the transfer's outcome
            with contextlib.suppress(Exception):
                await starting
    if fallback is not None:
        return await _run_http(spec, options, emit, fallback, reason)
    result = TransferResult(spec.direction, totals)
    emit({"type": "session_done", **result.as_dict()})
    return result


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().absolute())


async def _control_channel(
    login: SharedLogin, *, shareable: bool
) -> tuple[Any, asyncio.Future[None] | None]:
    """The session's control stream (a ControlChannel, or a SharedControl): from a shared
    login when one serves (``persist``), else a login of our own, then (``persist``) a
    master started for the next transfers."""
    share = shareable and login.persist > 0
    if share:
        shared = await open_shared_control(login)
        if shared is not None:
            return shared, None
    from slipstream.transport.ssh import open_control_channel  # asyncssh: ~0.1 s to load

    channel = await open_control_channel(login.host, login.port, login.user, **login.ssh_options())
    # Started once our login worked: the host key is known and the credentials are good.
    return channel, start_master_in_background(login) if share else None


async def _run_http(
    spec: TransferSpec, options: ClientOptions, emit: Emit, target: Any, reason: str
) -> TransferResult:
    """The whole transfer over the server's HTTPS fallback port (engine/fallback.py)."""
    from slipstream.engine.fallback import run_http_transfer

    emit({"type": "fallback", "transport": "http", "port": target.port, "reason": reason})
    cwd = options.cwd or Path.cwd()
    totals = await run_http_transfer(
        spec,
        _wire_spec(spec),
        target,
        emit,
        # The UDP sender's selection (filters, time windows, links), not the raw listing.
        sources=lambda: _selected_sources(spec, cwd, options.docroot),
        destination=lambda: destination_for_spec(
            spec, base_dir=cwd, docroot=options.docroot, default_root="."
        ),
        base_dir=cwd,
        docroot=options.docroot,
        progress_interval=options.progress_interval,
    )
    result = TransferResult(spec.direction, totals, transport="http")
    emit({"type": "session_done", **result.as_dict()})
    return result


async def _expect_accept(ctl: ControlStream) -> dict[str, Any]:
    msg = await ctl.recv()
    if msg is None:
        raise PeerAborted("The server closed the control channel during negotiation")
    if msg["t"] == control.ERROR:
        raise error_from_dict(msg["error"])
    if msg["t"] != control.ACCEPT:
        raise ProtocolError(f"Expected the session to be accepted, got {msg['t']!r}")
    return msg


def _udp_bind_host(peer_ip: str) -> str:
    return "::" if ":" in peer_ip else ("127.0.0.1" if peer_ip.startswith("127.") else "0.0.0.0")


async def _data_phase(
    spec: TransferSpec,
    options: ClientOptions,
    emit: Emit,
    ctl: ControlStream,
    params: SessionParams,
    peer: tuple[str, int],
) -> SessionTotals:
    loop = asyncio.get_running_loop()
    sock = DatagramSocket.bind(_udp_bind_host(peer[0]), 0)
    watch = CoreWatch()
    driver: SendDriver | RecvDriver
    paths: PathMemory | None = None  # an upload's sender remembers the path (pathmemory.py)
    cwd = options.cwd or Path.cwd()
    if spec.direction == "send":
        driver = SendDriver(
            ctl,
            _selected_sources(spec, cwd, options.docroot),
            emit,
            params.block_payload,
            SendOptions.from_spec(spec, local=True, base_dir=cwd, docroot=options.docroot),
        )
        core: Any = build_sender(
            params,
            initiator=True,
            source=driver.source,
            rate=client_rate_settings(spec, params),
            now=loop.time(),
        )
        paths = PathMemory.for_client()
        resume_path(core, paths, peer[0])
    else:
        resolver = destination_for_spec(
            spec, base_dir=cwd, docroot=options.docroot, default_root="."
        )
        driver = RecvDriver(
            ctl, resolver, emit, params.block_payload, ReceiveOptions.from_spec(spec)
        )
        core = build_receiver(params, initiator=True, sink=driver.sink, now=loop.time())
    endpoint = Endpoint(core, sock, peer, watch.on_event, watch.fail)
    driver.attach(core, endpoint.step, watch)
    OwnSocketReader(sock, endpoint)
    endpoint.step()
    live = ClientLive(options.rate_control, options.control_socket)
    await live.start(spec.direction, spec, params, core, ctl, driver)
    progress = loop.create_task(_report_progress(emit, driver, core, options.progress_interval))
    # The driver starts at once: an error the server reports over the control channel must
    # win over the UDP watchdog, and a download's manifest already flows meanwhile.
    watchdog = loop.create_task(_handshake_watchdog(watch, peer, options.udp_timeout, sock))
    try:
        totals = await driver.run()
        core.close(loop.time())
        endpoint.step()
        if paths is not None:
            paths.remember(peer[0], core.rate_controller.path_estimate())
        return totals
    except SlipstreamError as exc:
        await ctl.send_error(exc)
        raise
    finally:
        await live.stop()
        progress.cancel()
        watchdog.cancel()
        endpoint.close()
        sock.close()


async def _handshake_watchdog(
    watch: CoreWatch, peer: tuple[str, int], timeout: float, sock: DatagramSocket
) -> None:
    try:
        await asyncio.wait_for(watch.handshake.wait(), timeout)
    except TimeoutError:
        refused = " (the host answered 'port unreachable')" if sock.icmp_errors else ""
        if sock.send_drops:
            refused = f" (this machine refused to send: {sock.last_send_error})"
        watch.fail(
            UdpBlocked(
                f"No UDP reply from {peer[0]} port {peer[1]} within {timeout:g} s{refused}: "
                f"a firewall blocks the UDP data port; open udp/{peer[1]} or use HTTP fallback",
            )
        )


def _local_sources(
    spec: TransferSpec, cwd: Path, docroot: Path | None = None
) -> Iterator[SourceEntry]:
    entries = expand_sources(
        [(p.source, p.destination) for p in spec.path_pairs()],
        base_dir=cwd,
        docroot=docroot,
        source_root=spec.source_root,
        src_base=spec.src_base,
    )
    # One of N multi_session shares, or everything; HTTPS sends files whole (never split).
    return select_share(entries, spec, split=False)


def _selected_sources(spec: TransferSpec, cwd: Path, docroot: Path | None) -> Iterator[Any]:
    """The UDP session's sources: after the symlink policy, filters and time windows."""
    return select_share(select_sources(spec, base_dir=cwd, docroot=docroot), spec)


def _local_destination(spec: TransferSpec, cwd: Path, docroot: Path | None) -> Any:
    return destination_for_spec(spec, base_dir=cwd, docroot=docroot, default_root=".")


async def _report_progress(emit: Emit, driver: Any, core: Any, interval: float) -> None:
    """About once a second: bytes moved, current rate, files done."""
    last_bytes, last_time = 0, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        moved = _bytes_moved(driver, core)
        rate = (moved - last_bytes) * 8 / max(now - last_time, 1e-6)
        last_bytes, last_time = moved, now
        totals: SessionTotals = driver.totals
        emit(
            {
                "type": "progress",
                "bytes": moved,
                "rate_bps": rate,
                "files_done": totals.files_done,
                "files_skipped": totals.files_skipped,
                "files_failed": totals.files_failed,
                "bytes_expected": getattr(driver, "bytes_announced", None),
                "elapsed_s": round(totals.elapsed, 3),
            }
        )


def _bytes_moved(driver: Any, core: Any) -> int:
    if isinstance(driver, RecvDriver):
        return int(driver.sink.bytes_written)
    acked = int(getattr(core, "acked_count", 0)) * driver._payload
    return min(acked, driver.bytes_announced)
