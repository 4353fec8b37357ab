"""Builds the pieces of one session from the negotiated parameters, the same way on both ends.

The client and the server differ only in who initiates the UDP handshake and in which side
holds the files; everything else (keys, block size, rate controller) is derived here from the
ACCEPT message so the two ends cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from slipstream.protocol import crypto, wire
from slipstream.protocol.rate import create_rate_controller
from slipstream.protocol.receiver import ReceiverSession
from slipstream.protocol.sender import SenderSession
from slipstream.spec import TransferSpec

DEFAULT_DGRAM_SIZE = 1500
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

    @classmethod
    def create(
        cls, cipher: str, dgram_size: int | None, udp_port: int, ipv6: bool
    ) -> SessionParams:
        return cls(
            session_id=os.urandom(8),
            cipher=cipher,
            secret=os.urandom(32),
            block_payload=wire.payload_size_for(dgram_size or DEFAULT_DGRAM_SIZE, ipv6=ipv6),
            udp_port=udp_port,
        )

    def to_accept(self) -> dict[str, Any]:
        # The secret travels only inside the SSH channel and is never written to disk.
        return {
            "session_id": self.session_id.hex(),
            "cipher": self.cipher,
            "secret": self.secret.hex(),
            "block_payload": self.block_payload,
            "udp_port": self.udp_port,
        }

    @classmethod
    def from_accept(cls, msg: dict[str, Any]) -> SessionParams:
        return cls(
            session_id=bytes.fromhex(str(msg["session_id"])),
            cipher=str(msg["cipher"]),
            secret=bytes.fromhex(str(msg["secret"])),
            block_payload=int(msg["block_payload"]),
            udp_port=int(msg["udp_port"]),
        )


@dataclass(frozen=True)
class RateSettings:
    policy: str = "fair"
    target_kbps: int | None = None
    min_kbps: int = 0

    @classmethod
    def from_spec(cls, spec: TransferSpec) -> RateSettings:
        return cls(spec.rate_policy, spec.target_rate_kbps, spec.min_rate_kbps or 0)

    def controller(self) -> Any:
        target = self.target_kbps or UNLIMITED_TARGET_KBPS
        return create_rate_controller(
            self.policy, target_bps=target * 1000.0, min_bps=self.min_kbps * 1000.0
        )


def _role(initiator: bool) -> crypto.Role:
    return "initiator" if initiator else "responder"


def build_sender(
    params: SessionParams, *, initiator: bool, source: Any, rate: RateSettings, now: float
) -> SenderSession:
    protector_out, protector_in = crypto.derive_protectors(
        params.cipher, params.secret, params.session_id, _role(initiator)
    )
    return SenderSession(
        session_id=params.session_id,
        protector_out=protector_out,
        protector_in=protector_in,
        initiator=initiator,
        source=source,
        block_payload=params.block_payload,
        rate=rate.controller(),
        now=now,
    )


def build_receiver(
    params: SessionParams, *, initiator: bool, sink: Any, now: float
) -> ReceiverSession:
    protector_out, protector_in = crypto.derive_protectors(
        params.cipher, params.secret, params.session_id, _role(initiator)
    )
    return ReceiverSession(
        session_id=params.session_id,
        protector_out=protector_out,
        protector_in=protector_in,
        initiator=initiator,
        sink=sink,
        now=now,
    )
