"""The sans-IO protocol core: codec, crypto, sessions and rate control (no I/O, no clock)."""

from .crypto import PacketProtector, ProtectorPair, SessionSecrets, derive_protectors
from .events import Acked, Event, HandshakeComplete, PeerClosed, StreamComplete, Timeout
from .rate import RateController, create_rate_controller, register_rate_controller
from .receiver import BlockSink, ReceiverSession
from .sender import BlockSource, SenderSession
from .wire import DecodeError, PacketType, payload_size_for

__all__ = [
    "Acked",
    "BlockSink",
    "BlockSource",
    "DecodeError",
    "Event",
    "HandshakeComplete",
    "PacketProtector",
    "PacketType",
    "PeerClosed",
    "ProtectorPair",
    "RateController",
    "ReceiverSession",
    "SenderSession",
    "SessionSecrets",
    "StreamComplete",
    "Timeout",
    "create_rate_controller",
    "derive_protectors",
    "payload_size_for",
    "register_rate_controller",
]
