"""Content-protection envelopes: round trips, the size formula, and every way to damage one."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import xxhash

from slipstream.engine.blockio import FileSlot
from slipstream.engine.envelope import (
    HEADER_SIZE,
    TAG_SIZE,
    ChunkCipher,
    EnvelopeHeader,
    EnvelopeView,
    Keyring,
    decrypt_file,
    encrypt_file,
    envelope_size,
    plain_file_reader,
)
from slipstream.engine.outgoing import EnvelopeBlockSource
from slipstream.errors import BadPassphrase, ContentProtectionError, FileIOError

CHUNK = 1 << 16
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    return Keyring(PASSPHRASE)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 77])
def test_round_trip_and_size_formula(tmp_path: Path, keyring: Keyring, size: int) -> None:
    plain = os.urandom(size)
    (tmp_path / "f").write_bytes(plain)
    assert encrypt_file(tmp_path / "f", tmp_path / "f.env", keyring) == envelope_size(size)
    sealed = (tmp_path / "f.env").read_bytes()
    assert (
        len(sealed)
        == envelope_size(size)
        == HEADER_SIZE + size + TAG_SIZE * max(1, -(-size // CHUNK))
    )
    if size > 64:
        assert plain[:64] not in sealed
    assert decrypt_file(tmp_path / "f.env", tmp_path / "out", Keyring(PASSPHRASE)) == size
    assert (tmp_path / "out").read_bytes() == plain


def test_wrong_passphrase_writes_nothing(tmp_path: Path, keyring: Keyring) -> None:
    (tmp_path / "f").write_bytes(b"secret" * 1000)
    encrypt_file(tmp_path / "f", tmp_path / "f.env", keyring)
    with pytest.raises(BadPassphrase, match="Wrong passphrase"):
        decrypt_file(tmp_path / "f.env", tmp_path / "out", Keyring("not it"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "f.env"]
    with pytest.raises(BadPassphrase):
        Keyring("")


def _damaged(tmp_path: Path, keyring: Keyring, change) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_bytes(os.urandom(3 * CHUNK + 5))
    encrypt_file(tmp_path / "f", tmp_path / "f.env", keyring)
    data = bytearray((tmp_path / "f.env").read_bytes())
    (tmp_path / "f.env").write_bytes(bytes(change(data)))
    with pytest.raises((ContentProtectionError, BadPassphrase)):
        decrypt_file(tmp_path / "f.env", tmp_path / "out", keyring)
    assert not (tmp_path / "out").exists()


def _swap_chunks(data: bytearray) -> bytearray:
    stride = CHUNK + TAG_SIZE
    first = data[HEADER_SIZE : HEADER_SIZE + stride]
    data[HEADER_SIZE : HEADER_SIZE + stride] = data[HEADER_SIZE + stride : HEADER_SIZE + 2 * stride]
    data[HEADER_SIZE + stride : HEADER_SIZE + 2 * stride] = first
    return data


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d[: HEADER_SIZE + 2 * (CHUNK + TAG_SIZE)],  # cut at a chunk boundary
        lambda d: d[:-3],  # cut inside the last chunk
        lambda d: d + b"\x00" * 16,  # extended
        lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:],  # the wrapped key
        lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:],  # the size in the header
        lambda d: d[:5000] + bytes([d[5000] ^ 1]) + d[5001:],  # a ciphertext byte
        _swap_chunks,
    ],
    ids=["cut-at-boundary", "cut-inside", "extended", "key", "size", "byte", "swapped"],
)
def test_damage_is_detected(tmp_path: Path, keyring: Keyring, change) -> None:  # type: ignore[no-untyped-def]
    _damaged(tmp_path, keyring, change)


def test_not_an_envelope(tmp_path: Path, keyring: Keyring) -> None:
    (tmp_path / "f.env").write_bytes(b"plain text, not sealed" * 10)
    with pytest.raises(ContentProtectionError, match="not a Slipstream envelope"):
        decrypt_file(tmp_path / "f.env", tmp_path / "out", keyring)


def test_hostile_kdf_parameters_are_refused(keyring: Keyring) -> None:
    header, _ = keyring.new_header(10)
    raw = bytearray(header.encode())
    raw[10] = 30  # log2(N) = 30: gigabytes of scrypt memory
    with pytest.raises(ContentProtectionError):
        EnvelopeHeader.decode(bytes(raw))


def test_random_access_view_matches_sequential(tmp_path: Path, keyring: Keyring) -> None:
    size = 5 * CHUNK + 1234
    (tmp_path / "f").write_bytes(os.urandom(size))
    header, key = keyring.new_header(size)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        whole = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd)).read(0, 1 << 30)
        view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd), cache_chunks=1)
        rng = random.Random(7)
        for _ in range(300):  # like retransmissions: any block, any order
            start = rng.randrange(0, len(whole))
            assert view.read(start, 1420) == whole[start : start + 1420]
    finally:
        os.close(fd)
    (tmp_path / "f.env").write_bytes(whole)
    decrypt_file(tmp_path / "f.env", tmp_path / "out", keyring)
    assert (tmp_path / "out").read_bytes() == (tmp_path / "f").read_bytes()


def test_changed_source_is_never_sealed_twice(tmp_path: Path, keyring: Keyring) -> None:
    # Sealing other plaintext under the same chunk nonce would break GCM: refused.
    (tmp_path / "f").write_bytes(bytes(3 * CHUNK))
    header, key = keyring.new_header(3 * CHUNK)
    fd = os.open(tmp_path / "f", os.O_RDWR)
    try:
        view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(fd), cache_chunks=1)
        view.read(HEADER_SIZE, 10)  # chunk 0
        view.read(HEADER_SIZE + 2 * (CHUNK + TAG_SIZE), 10)  # evicts chunk 0
        os.pwrite(fd, b"changed", 0)
        with pytest.raises(FileIOError, match="changed"):
            view.read(HEADER_SIZE, 10)
    finally:
        os.close(fd)


def test_one_key_derivation_per_salt(keyring: Keyring) -> None:
    first, _ = keyring.new_header(1)
    second, _ = keyring.new_header(2)
    assert first.salt == second.salt  # one session salt: scrypt runs once for many files
    assert first.wrapped_key != second.wrapped_key


def test_envelope_block_source_serves_the_envelope(tmp_path: Path, keyring: Keyring) -> None:
    """What the sender puts on the wire for an encrypted upload: the envelope's bytes, block
    by block, in any order, digested during the first sequential pass."""
    size, payload = 3 * CHUNK + 999, 1420
    (tmp_path / "f").write_bytes(os.urandom(size))
    hashed: list[tuple[int, str, str | None]] = []
    source = EnvelopeBlockSource(payload, lambda *a: hashed.append(a), keyring)
    source.checksum = "sha256"
    slot = FileSlot(7, 100, -(-envelope_size(size) // payload), 0, envelope_size(size))
    source.register(slot, tmp_path / "f", size)
    blocks = {b: source.read_block(b) for b in range(slot.first_block, slot.end_block)}
    envelope = b"".join(blocks[b] for b in sorted(blocks))
    assert len(envelope) == envelope_size(size)
    for block in random.Random(3).sample(sorted(blocks), 20):  # retransmissions
        assert source.read_block(block) == blocks[block]
    (tmp_path / "f.env").write_bytes(envelope)
    decrypt_file(tmp_path / "f.env", tmp_path / "out", keyring)
    assert (tmp_path / "out").read_bytes() == (tmp_path / "f").read_bytes()
    assert hashed == [
        (7, xxhash.xxh3_128_hexdigest(envelope), hashlib.sha256(envelope).hexdigest())
    ]
    source.close()
