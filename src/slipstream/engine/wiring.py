"""Builds the pieces of one session from the negotiated parameters, the same way on both ends.

The client and the server differ only in who initiates the UDP handshake and in which side
holds the files; everything else (keys, block size, rate controller) is derived here from the
ACCEPT message so the two ends cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream.engine.paths import DestinationResolver
from slipstream.engine.ratelimits import RateState
from slipstream.protocol import crypto, wire
from slipstream.protocol.rate import create_rate_controller
from slipstream.protocol.receiver import ReceiverSession
from slipstream.protocol.sender import SenderSession
from slipstream.spec import TransferSpec

DEFAULT_DGRAM_SIZE = 1500
# Path MTU discovery never goes above this: a GSO batch is limited to 64 KB, so bigger
# datagrams would leave too few per batch, and jumbo frames are 9000 anyway.
MAX_AUTO_DGRAM_SIZE = 9000
# What this implementation understands beyond the v1 baseline; sent in OPEN so a new
# server only uses a feature an old client would not choke on (and ACCEPT echoes it).
FEATURES = ("rate", "pmtu", "zlib")
# With no target rate the controller still has a ceiling; it is a cap, not a goal.
UNLIMITED_TARGET_KBPS = 10_000_000


@dataclass(frozen=True)
class SessionParams:
    """What the server's ACCEPT fixes for both ends."""

    session_id: bytes
    cipher: str
    secret: bytes
    block_payload: int
    udp_port: int
    # IP datagram size of a full DATA packet. With ``verify_mtu`` both ends pad HELLO and
    # HELLO_ACK to it, so the handshake proves the path carries it (docs/protocol.md §2).
    dgram_size: int = DEFAULT_DGRAM_SIZE
    verify_mtu: bool = False
    # The rate settings the server granted (RateState.to_wire) and its limits
    # (RateLimits.to_wire); None from an old server.
    rate: dict[str, Any] | None = None
    rate_limits: dict[str, Any] | None = None
    features: tuple[str, ...] = field(default=())

    @classmethod
    def create(
        cls,
        cipher: str,
        dgram_size: int | None,
        udp_port: int,
        ipv6: bool,
        *,
        verify_mtu: bool = False,
        features: tuple[str, ...] = (),
    ) -> SessionParams:
        size = dgram_size or DEFAULT_DGRAM_SIZE
        return cls(
            session_id=os.urandom(8),
            cipher=cipher,
            secret=os.urandom(32),
            block_payload=wire.payload_size_for(size, ipv6=ipv6),
            udp_port=udp_port,
            dgram_size=size,
            verify_mtu=verify_mtu,
            features=features,
        )

    def to_accept(self) -> dict[str, Any]:
        # The secret travels only inside the SSH channel and is never written to disk.
        body: dict[str, Any] = {
            "session_id": self.session_id.hex(),
            "cipher": self.cipher,
            "secret": self.secret.hex(),
            "block_payload": self.block_payload,
            "udp_port": self.udp_port,
            "dgram_size": self.dgram_size,
            "verify_mtu": self.verify_mtu,
            "features": list(self.features),
        }
        if self.rate is not None:
            body["rate"] = self.rate
            body["rate_limits"] = self.rate_limits
        return body

    @classmethod
    def from_accept(cls, msg: dict[str, Any]) -> SessionParams:
        block_payload = int(msg["block_payload"])
        default_size = block_payload + wire.DATA_OVERHEAD + 28
        return cls(
            session_id=bytes.fromhex(str(msg["session_id"])),
            cipher=str(msg["cipher"]),
            secret=bytes.fromhex(str(msg["secret"])),
            block_payload=block_payload,
            udp_port=int(msg["udp_port"]),
            dgram_size=int(msg.get("dgram_size") or default_size),
            verify_mtu=bool(msg.get("verify_mtu", False)),
            rate=msg.get("rate"),
            rate_limits=msg.get("rate_limits"),
            features=tuple(str(f) for f in msg.get("features") or ()),
        )


def choose_dgram_size(
    spec_size: int | None, client_mtu: int | None, server_mtu: int | None
) -> tuple[int, bool]:
    """``(datagram size, verify it on the path)`` for a new session.

    An explicit ``dgram_size`` wins (and is verified like any other). Otherwise the smaller
    of the two ends' route MTUs, capped at :data:`MAX_AUTO_DGRAM_SIZE`; a client that sent
    no MTU is an old one: 1500 and no padded handshake, as before.
    """
    if client_mtu is None:
        return spec_size or DEFAULT_DGRAM_SIZE, False
    if spec_size:
        return spec_size, True
    mtus = [m for m in (client_mtu, server_mtu) if m]
    size = min([MAX_AUTO_DGRAM_SIZE, *mtus])
    return max(576, size), True


@dataclass(frozen=True)
class RateSettings:
    policy: str = "fair"
    target_kbps: int | None = None
    min_kbps: int = 0

    @classmethod
    def from_spec(cls, spec: TransferSpec) -> RateSettings:
        return cls(spec.rate_policy, spec.target_rate_kbps, spec.min_rate_kbps or 0)

    @classmethod
    def from_state(cls, state: RateState) -> RateSettings:
        """The settings in force after limits and the aggregate ceiling."""
        return cls(state.policy, state.effective_target_kbps, state.effective_min_kbps)

    def controller(self) -> Any:
        target = self.target_kbps or UNLIMITED_TARGET_KBPS
        return create_rate_controller(
            self.policy, target_bps=target * 1000.0, min_bps=self.min_kbps * 1000.0
        )


def client_rate_settings(spec: TransferSpec, params: SessionParams) -> RateSettings:
    """What the client's sender starts with: what the server granted (within its limits
    and the aggregate share), or the spec's own settings with an old server."""
    if params.rate is not None:
        return RateSettings.from_state(RateState.from_wire(params.rate))
    return RateSettings.from_spec(spec)


def open_extras(peer_ip: str) -> dict[str, Any]:
    """Fields a client adds to OPEN: what it understands, and its route MTU to the server
    (old servers ignore both)."""
    from slipstream.transport.pmtu import route_mtu

    extras: dict[str, Any] = {"features": list(FEATURES)}
    mtu = route_mtu(peer_ip)
    if mtu is not None:
        extras["mtu"] = mtu
    return extras


def _role(initiator: bool) -> crypto.Role:
    return "initiator" if initiator else "responder"


def build_sender(
    params: SessionParams, *, initiator: bool, source: Any, rate: RateSettings, now: float
) -> SenderSession:
    protector_out, protector_in = crypto.derive_protectors(
        params.cipher, params.secret, params.session_id, _role(initiator)
    )
    sender = SenderSession(
        session_id=params.session_id,
        protector_out=protector_out,
        protector_in=protector_in,
        initiator=initiator,
        source=source,
        block_payload=params.block_payload,
        rate=rate.controller(),
        now=now,
    )
    if params.verify_mtu:
        sender.verify_path_mtu(params.block_payload + wire.DATA_OVERHEAD)
    return sender


def build_receiver(
    params: SessionParams, *, initiator: bool, sink: Any, now: float
) -> ReceiverSession:
    protector_out, protector_in = crypto.derive_protectors(
        params.cipher, params.secret, params.session_id, _role(initiator)
    )
    receiver = ReceiverSession(
        session_id=params.session_id,
        protector_out=protector_out,
        protector_in=protector_in,
        initiator=initiator,
        sink=sink,
        now=now,
        max_datagram=params.dgram_size,
    )
    if params.verify_mtu:
        receiver.verify_path_mtu(params.block_payload + wire.DATA_OVERHEAD)
    return receiver


def destination_for_spec(
    spec: TransferSpec, *, base_dir: Path, docroot: Path | None, default_root: str
) -> DestinationResolver:
    """The receiving side's destination rules for a spec, checked and prepared.

    The client (``default_root`` ".", relative to its folder) and the server (``"/"``, the
    docroot) build it the same way, whichever transport carries the data.
    """
    resolver = DestinationResolver(
        spec.destination_root or default_root,
        docroot=docroot,
        base_dir=base_dir,
        single_source=len(spec.path_pairs()) == 1,
        create_dir=spec.create_dir,
        pair_mode=spec.is_pair_format or spec.src_base is not None,
    )
    resolver.prepare()
    return resolver
