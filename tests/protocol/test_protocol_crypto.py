import pytest

from slipstream.errors import UnsupportedError
from slipstream.protocol import crypto
from slipstream.protocol.crypto import (
    MAX_PACKET_NUMBER,
    TAG_SIZE,
    AuthenticationFailed,
    SessionSecrets,
    cipher_names,
    derive_protectors,
)

SECRET = bytes(range(32))
SID = b"sess0001"
CIPHERS = ["aes-128", "aes-192", "aes-256", "none"]


def pair(cipher: str) -> tuple[crypto.ProtectorPair, crypto.ProtectorPair]:
    return (
        derive_protectors(cipher, SECRET, SID, "initiator"),
        derive_protectors(cipher, SECRET, SID, "responder"),
    )


def test_registry_lists_the_suites() -> None:
    assert set(CIPHERS) <= set(cipher_names())
    with pytest.raises(UnsupportedError):
        derive_protectors("rot13", SECRET, SID, "initiator")
    with pytest.raises(UnsupportedError):
        SessionSecrets.generate("rot13")


def test_generate_gives_fresh_secrets() -> None:
    assert SessionSecrets.generate("aes-128") != SessionSecrets.generate("aes-128")
    assert len(SessionSecrets.generate("none")) == 32


@pytest.mark.parametrize("cipher", CIPHERS)
def test_seal_open_both_directions(cipher: str) -> None:
    initiator, responder = pair(cipher)
    aad, payload = b"header-bytes", b"x" * 1400
    body = initiator.outbound.seal(0, aad, payload)
    assert len(body) == len(payload) + TAG_SIZE
    assert responder.inbound.open(0, aad, body) == payload
    back = responder.outbound.seal(0, aad, payload)
    assert initiator.inbound.open(0, aad, back) == payload
    # Each direction has its own key and IV: packet number 0 both ways is no nonce reuse.
    assert back != body


@pytest.mark.parametrize("cipher", CIPHERS)
def test_tampering_is_detected(cipher: str) -> None:
    initiator, responder = pair(cipher)
    body = bytearray(initiator.outbound.seal(5, b"aad", b"payload"))
    for index in (0, len(body) - 1):
        damaged = bytearray(body)
        damaged[index] ^= 1
        with pytest.raises(AuthenticationFailed):
            responder.inbound.open(5, b"aad", bytes(damaged))
    with pytest.raises(AuthenticationFailed):
        responder.inbound.open(5, b"aaX", bytes(body))  # altered header
    with pytest.raises(AuthenticationFailed):
        responder.inbound.open(6, b"aad", bytes(body))  # replayed under another number
    with pytest.raises(AuthenticationFailed):
        responder.inbound.open(5, b"aad", b"short")


def test_none_cipher_is_cleartext_but_authenticated() -> None:
    initiator, responder = pair("none")
    body = initiator.outbound.seal(1, b"aad", b"visible payload")
    assert body.startswith(b"visible payload")
    assert responder.inbound.open(1, b"aad", body) == b"visible payload"
    forged = b"forged  payload" + body[len(b"visible payload") :]
    with pytest.raises(AuthenticationFailed):
        responder.inbound.open(1, b"aad", forged)


def test_wrong_key_fails() -> None:
    initiator, _ = pair("aes-128")
    other = derive_protectors("aes-128", bytes(32), SID, "responder")
    body = initiator.outbound.seal(0, b"a", b"b")
    with pytest.raises(AuthenticationFailed):
        other.inbound.open(0, b"a", body)


def test_cipher_name_is_bound_into_keys() -> None:
    aes, _ = pair("aes-128")
    gmac, _ = pair("none")
    assert aes.outbound.seal(0, b"", b"") != gmac.outbound.seal(0, b"", b"")


def test_packet_numbers_must_increase() -> None:
    initiator, _ = pair("aes-128")
    initiator.outbound.seal(3, b"", b"a")
    for reused in (3, 2):
        with pytest.raises(ValueError):
            initiator.outbound.seal(reused, b"", b"a")
    initiator.outbound.seal(MAX_PACKET_NUMBER - 1, b"", b"a")
    with pytest.raises(ValueError):
        initiator.outbound.seal(MAX_PACKET_NUMBER, b"", b"a")


def test_role_is_checked() -> None:
    with pytest.raises(ValueError):
        derive_protectors("aes-128", SECRET, SID, "observer")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        derive_protectors("aes-128", b"short", SID, "initiator")
