"""Packet protection: AEAD cipher suites, the HKDF key schedule and nonce discipline.

Every datagram is authenticated; with every suite but ``none`` its body is also encrypted.
The nonce is the per-direction 12-byte IV XOR the packet number (right-aligned), as in
QUIC and TLS 1.3. Packet numbers strictly increase per direction and a retransmission gets
a fresh number, so a (key, nonce) pair is never used twice; :class:`PacketProtector`
enforces that by refusing a packet number that does not increase.

Measured on the project machine (Python 3.11, cryptography 50, 1400-byte payload):
``seal`` about 0.7 us and ``open`` about 0.9 us per packet with AES-128-GCM; see
docs/protocol.md for the full table.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Literal, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from slipstream.errors import UnsupportedError

TAG_SIZE = 16
IV_SIZE = 12
MASTER_SECRET_SIZE = 32
# Past this many packets in one direction we stop: far beyond any transfer, and it keeps the
# packet number comfortably inside the u64 header field and the 96-bit nonce.
MAX_PACKET_NUMBER = 2**62

Role = Literal["initiator", "responder"]

_NONCE = struct.Struct(">IQ")  # the IV split as u32 || u64, so XOR is two int operations
_pack_nonce = _NONCE.pack


class AuthenticationFailed(Exception):
    """A packet did not authenticate: forged, altered, or for another key."""


@dataclass(frozen=True, slots=True)
class CipherSuite:
    """A named AEAD configuration. ``encrypts=False`` means authenticate only (GMAC)."""

    name: str
    key_size: int
    encrypts: bool


_SUITES: dict[str, CipherSuite] = {}


def register_cipher_suite(suite: CipherSuite) -> None:
    """Make a suite selectable by name (the transfer spec's ``cipher`` string)."""
    _SUITES[suite.name] = suite


def get_cipher_suite(name: str) -> CipherSuite:
    try:
        return _SUITES[name]
    except KeyError:
        raise UnsupportedError(f"Unknown cipher {name!r}") from None


def cipher_names() -> list[str]:
    return sorted(_SUITES)


register_cipher_suite(CipherSuite("aes-128", 16, True))
register_cipher_suite(CipherSuite("aes-192", 24, True))
register_cipher_suite(CipherSuite("aes-256", 32, True))
# "none" still authenticates every packet: an unencrypted transfer must not accept forgeries.
register_cipher_suite(CipherSuite("none", 16, False))


class PacketProtector:
    """Seals or opens the packets of one direction with one key and IV.

    ``seal`` returns the protected body (ciphertext or cleartext, then the 16-byte tag); the
    caller prepends the associated data itself, which is cheaper than writing into a
    preallocated buffer (measured: encrypt + concatenation beats ``encrypt_into`` + copy).
    """

    __slots__ = (
        "suite",
        "_aead",
        "_encrypt",
        "_decrypt",
        "_iv_high",
        "_iv_low",
        "_last_sealed",
        "_encrypts",
    )

    def __init__(self, suite: CipherSuite, key: bytes, iv: bytes) -> None:
        if len(key) != suite.key_size or len(iv) != IV_SIZE:
            raise ValueError("key or IV of the wrong size")
        self.suite = suite
        self._aead = AESGCM(key)  # built once: building per packet costs 5x throughput
        self._encrypt = self._aead.encrypt  # bound once: the per-packet path is hot
        self._decrypt = self._aead.decrypt
        self._iv_high, self._iv_low = _NONCE.unpack(iv)
        self._last_sealed = -1
        self._encrypts = suite.encrypts

    @property
    def last_sealed(self) -> int:
        """The highest packet number sealed so far (-1 before the first)."""
        return self._last_sealed

    def seal(self, packet_number: int, aad: bytes, payload: bytes | memoryview) -> bytes:
        """Protect ``payload`` under ``aad``; returns ``body || tag`` (len(payload) + 16)."""
        if packet_number <= self._last_sealed or packet_number >= MAX_PACKET_NUMBER:
            raise ValueError("packet number reuse or exhaustion: refusing to reuse a nonce")
        self._last_sealed = packet_number
        nonce = _pack_nonce(self._iv_high, self._iv_low ^ packet_number)
        if self._encrypts:
            return self._encrypt(nonce, payload, aad)
        body = bytes(payload)
        return body + self._encrypt(nonce, b"", aad + body)

    def open(self, packet_number: int, aad: bytes | memoryview, body: bytes | memoryview) -> bytes:
        """Check and decrypt ``body || tag``; raises :class:`AuthenticationFailed`."""
        if len(body) < TAG_SIZE:
            raise AuthenticationFailed("shorter than a tag")
        nonce = _pack_nonce(self._iv_high, self._iv_low ^ packet_number)
        try:
            if self._encrypts:
                return self._decrypt(nonce, body, aad)
            cleartext = bytes(body[:-TAG_SIZE])
            self._decrypt(nonce, body[-TAG_SIZE:], bytes(aad) + cleartext)
            return cleartext
        except InvalidTag:
            raise AuthenticationFailed("bad tag") from None


class ProtectorPair(NamedTuple):
    """The two directions of one endpoint: ``outbound`` seals, ``inbound`` opens."""

    outbound: PacketProtector
    inbound: PacketProtector


class SessionSecrets:
    """Creation of the master secret, shared with the peer over the SSH control channel."""

    @staticmethod
    def generate(cipher: str) -> bytes:
        get_cipher_suite(cipher)  # fail early on an unknown name
        return os.urandom(MASTER_SECRET_SIZE)


def _expand(master_secret: bytes, session_id: bytes, label: bytes, size: int) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=size, salt=session_id, info=label)
    return hkdf.derive(master_secret)


def _direction_protector(
    suite: CipherSuite, master_secret: bytes, session_id: bytes, direction: bytes
) -> PacketProtector:
    # The suite name is part of the label so a downgrade changes every key.
    label = b"slipstream v1 " + suite.name.encode() + b" " + direction
    material = _expand(master_secret, session_id, label, suite.key_size + IV_SIZE)
    return PacketProtector(suite, material[: suite.key_size], material[suite.key_size :])


def derive_protectors(
    cipher: str, master_secret: bytes, session_id: bytes, role: Role
) -> ProtectorPair:
    """Derive both directions' protectors; ``role`` says which one this endpoint seals with.

    Each direction has its own key and IV, so both sides can number packets from 0.
    """
    if len(master_secret) < 16:
        raise ValueError("master secret too short")
    suite = get_cipher_suite(cipher)
    to_responder = _direction_protector(suite, master_secret, session_id, b"i->r")
    to_initiator = _direction_protector(suite, master_secret, session_id, b"r->i")
    if role == "initiator":
        return ProtectorPair(outbound=to_responder, inbound=to_initiator)
    if role == "responder":
        return ProtectorPair(outbound=to_initiator, inbound=to_responder)
    raise ValueError(f"role must be 'initiator' or 'responder', not {role!r}")
