"""Content protection: files encrypted at rest under a passphrase the server never sees.

An upload with ``content_protection = "encrypt"`` stores every file as an *envelope*
(``NAME.aspera-env`` by default); a download with ``"decrypt"`` turns envelopes back into
plain files, and ``slipstream decrypt`` does the same offline. The format is specified in
``docs/envelope.md``; in short:

* a 128-byte header: magic, KDF parameters, chunk size, plaintext size, salt, and a random
  per-file data key wrapped (AES-256-GCM) by a key derived from the passphrase (scrypt);
* the plaintext in fixed-size chunks, each sealed with AES-256-GCM under the data key, the
  chunk index as nonce and (header, index, final flag) as associated data, so reordered,
  swapped, truncated or extended envelopes fail to open.

The envelope's size is a function of the plaintext size alone (:func:`envelope_size`), so
the sender can announce it before encrypting anything, and any byte range of it can be
produced on demand (:class:`EnvelopeView`): a retransmitted block is re-encrypted, not
stored.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from slipstream.engine.blockio import open_nofollow, os_error_to_slipstream
from slipstream.errors import BadPassphrase, ContentProtectionError, FileIOError, UsageError

MAGIC = b"SLIPENV1"
VERSION = 1
KDF_SCRYPT = 1
DEFAULT_EXTENSION = ".aspera-env"
HEADER_SIZE = 128
TAG_SIZE = 16
KEY_SIZE = 32
DEFAULT_CHUNK_LOG2 = 16  # 64 KiB of plaintext per chunk: 0.02 % overhead
DEFAULT_SCRYPT = (16, 8, 1)  # log2(N), r, p: about 0.1 s and 64 MiB, once per session
MAX_SCRYPT_MEMORY = 256 << 20  # refuse headers that would make us allocate more
# magic, version, kdf, log2n, r, p, chunk_log2, reserved, plaintext size, salt, wrap nonce,
# wrapped key (32 + tag), zero padding up to HEADER_SIZE.
_HEADER = struct.Struct(">8s6BHQ16s12s48s28x")
_AUTHENTICATED = 52  # header bytes before the wrapped key: bound to the key and every chunk
_CHUNK_AAD = struct.Struct(">QB")

assert _HEADER.size == HEADER_SIZE


def chunk_size_of(chunk_log2: int) -> int:
    return 1 << chunk_log2


def chunk_count(plain_size: int, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> int:
    """Chunks in an envelope; an empty file still has one (empty, final) chunk."""
    return max(1, -(-plain_size // chunk_size_of(chunk_log2)))


def envelope_size(plain_size: int, chunk_log2: int = DEFAULT_CHUNK_LOG2) -> int:
    return HEADER_SIZE + plain_size + TAG_SIZE * chunk_count(plain_size, chunk_log2)


@dataclass(frozen=True)
class EnvelopeHeader:
    plain_size: int
    salt: bytes
    wrap_nonce: bytes
    wrapped_key: bytes
    scrypt: tuple[int, int, int] = DEFAULT_SCRYPT
    chunk_log2: int = DEFAULT_CHUNK_LOG2

    def encode(self) -> bytes:
        log2n, r, p = self.scrypt
        return _HEADER.pack(
            MAGIC,
            VERSION,
            KDF_SCRYPT,
            log2n,
            r,
            p,
            self.chunk_log2,
            0,
            self.plain_size,
            self.salt,
            self.wrap_nonce,
            self.wrapped_key,
        )

    @property
    def authenticated(self) -> bytes:
        return self.encode()[:_AUTHENTICATED]

    @property
    def envelope_size(self) -> int:
        return envelope_size(self.plain_size, self.chunk_log2)

    @classmethod
    def decode(cls, data: bytes, name: str = "file") -> EnvelopeHeader:
        if len(data) < HEADER_SIZE or data[:8] != MAGIC:
            raise ContentProtectionError(f"{name} is not a Slipstream envelope")
        fields = _HEADER.unpack(data[:HEADER_SIZE])
        _, version, kdf, log2n, r, p, chunk_log2, reserved = fields[:8]
        if version != VERSION or kdf != KDF_SCRYPT or reserved or any(data[100:HEADER_SIZE]):
            raise ContentProtectionError(f"{name}: unsupported envelope version or format")
        if not 10 <= chunk_log2 <= 24 or not (1 <= r <= 32 and 1 <= p <= 16 and log2n <= 24):
            raise ContentProtectionError(f"{name}: envelope parameters out of range")
        if 128 * r * (1 << log2n) > MAX_SCRYPT_MEMORY or log2n < 10:
            raise ContentProtectionError(f"{name}: envelope key derivation parameters refused")
        plain_size, salt, nonce, wrapped = fields[8:]
        return cls(plain_size, salt, nonce, wrapped, (log2n, r, p), chunk_log2)


class Keyring:
    """Derives wrapping keys from one passphrase, once per salt (scrypt is slow on purpose).

    A session uses one salt for all its files, so 10,000 small files cost one derivation.
    Thread-safe: the sender's hashing worker and the event loop may both ask.
    """

    def __init__(self, passphrase: str) -> None:
        if not passphrase:
            raise BadPassphrase("Content protection needs a passphrase, and it is empty")
        self._secret = passphrase.encode()
        self._keks: dict[tuple[bytes, tuple[int, int, int]], bytes] = {}
        self._lock = threading.Lock()
        self.session_salt = os.urandom(16)

    def kek(self, salt: bytes, params: tuple[int, int, int]) -> bytes:
        with self._lock:
            key = self._keks.get((salt, params))
            if key is None:
                log2n, r, p = params
                kdf = Scrypt(salt=salt, length=KEY_SIZE, n=1 << log2n, r=r, p=p)
                key = kdf.derive(self._secret)
                self._keks[(salt, params)] = key
            return key

    def new_header(self, plain_size: int) -> tuple[EnvelopeHeader, bytes]:
        """A fresh header (and its data key) for a file of ``plain_size`` bytes."""
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(12)
        draft = EnvelopeHeader(plain_size, self.session_salt, nonce, bytes(48))
        wrapped = AESGCM(self.kek(draft.salt, draft.scrypt)).encrypt(
            nonce, data_key, draft.authenticated
        )
        return EnvelopeHeader(plain_size, draft.salt, nonce, wrapped), data_key

    def open_header(self, header: EnvelopeHeader, name: str = "file") -> bytes:
        """The data key of ``header``; :class:`BadPassphrase` if this passphrase is not its."""
        try:
            return AESGCM(self.kek(header.salt, header.scrypt)).decrypt(
                header.wrap_nonce, header.wrapped_key, header.authenticated
            )
        except InvalidTag:
            raise BadPassphrase(
                f"Wrong passphrase for {name}: it was encrypted with another passphrase"
            ) from None


class ChunkCipher:
    """Seals and opens the chunks of one envelope."""

    def __init__(self, header: EnvelopeHeader, data_key: bytes) -> None:
        self.header = header
        self._aead = AESGCM(data_key)
        self._bound = header.authenticated
        self.chunk = chunk_size_of(header.chunk_log2)
        self.count = chunk_count(header.plain_size, header.chunk_log2)

    def _aad(self, index: int) -> bytes:
        return self._bound + _CHUNK_AAD.pack(index, index == self.count - 1)

    def seal(self, index: int, plain: bytes) -> bytes:
        # The data key is random per file and the nonce is the chunk index, so a nonce is
        # reused only for the same chunk of the same file (see EnvelopeView's guard).
        return self._aead.encrypt(index.to_bytes(12, "big"), plain, self._aad(index))

    def open(self, index: int, sealed: bytes, name: str = "file") -> bytes:
        try:
            return self._aead.decrypt(index.to_bytes(12, "big"), sealed, self._aad(index))
        except InvalidTag:
            raise ContentProtectionError(
                f"{name}: envelope chunk {index} is corrupt, truncated or out of place"
            ) from None

    def plain_span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk
        return start, min(self.chunk, self.header.plain_size - start)

    def sealed_offset(self, index: int) -> int:
        return HEADER_SIZE + index * (self.chunk + TAG_SIZE)


PlainReader = Callable[[int, int], bytes]


@dataclass
class EnvelopeView:
    """Random access to the envelope of a plaintext file, encrypting chunks on demand.

    A chunk is re-encrypted when a retransmission needs it again. Encrypting different
    plaintext under the same (key, nonce) would break GCM, so the view remembers a
    fingerprint of every chunk it sealed and refuses to seal a changed one: a source file
    modified mid-transfer fails with an error instead.
    """

    cipher: ChunkCipher
    read_plain: PlainReader
    name: str = "file"
    cache_chunks: int = 4
    _cache: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    _fingerprints: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.cipher.header.envelope_size

    def sealed_chunk(self, index: int) -> bytes:
        sealed = self._cache.get(index)
        if sealed is not None:
            self._cache.move_to_end(index)
            return sealed
        start, length = self.cipher.plain_span(index)
        plain = self.read_plain(start, length) if length > 0 else b""
        if len(plain) != max(length, 0):
            raise FileIOError(f"{self.name} shrank while it was being encrypted")
        fingerprint = xxhash.xxh3_64_intdigest(plain)
        if self._fingerprints.setdefault(index, fingerprint) != fingerprint:
            raise FileIOError(f"{self.name} changed while it was being sent encrypted")
        sealed = self.cipher.seal(index, plain)
        self._cache[index] = sealed
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return sealed

    def read(self, offset: int, length: int) -> bytes:
        """Envelope bytes ``[offset, offset + length)`` (short only at the end)."""
        end = min(offset + length, self.size)
        parts: list[bytes] = []
        if offset < HEADER_SIZE:
            parts.append(self.cipher.header.encode()[offset : min(end, HEADER_SIZE)])
            offset = HEADER_SIZE
        stride = self.cipher.chunk + TAG_SIZE
        while offset < end:
            index = (offset - HEADER_SIZE) // stride
            base = self.cipher.sealed_offset(index)
            sealed = self.sealed_chunk(index)
            parts.append(sealed[offset - base : end - base])
            offset = base + len(sealed)
        return b"".join(parts)


def plain_file_reader(fd: int) -> PlainReader:
    return lambda offset, length: os.pread(fd, length, offset)


# --- whole files (offline tool, download decryption) ----------------------------------------


def read_header(fd: int, name: str) -> EnvelopeHeader:
    return EnvelopeHeader.decode(os.pread(fd, HEADER_SIZE, 0), name)


def decrypt_fd(src: int, dst: int, keyring: Keyring, name: str) -> int:
    """Decrypt the envelope open at ``src`` into ``dst``; returns the plaintext size.

    The passphrase is checked before anything is written, and the envelope's length must be
    exactly what its header promises, so truncation is caught even at a chunk boundary.
    """
    header = read_header(src, name)
    cipher = ChunkCipher(header, keyring.open_header(header, name))
    actual = os.fstat(src).st_size
    if actual != header.envelope_size:
        raise ContentProtectionError(
            f"{name}: envelope is {actual} bytes, its header promises {header.envelope_size}"
            " (truncated or extended)"
        )
    for index in range(cipher.count):
        start, length = cipher.plain_span(index)
        sealed = os.pread(src, length + TAG_SIZE, cipher.sealed_offset(index))
        plain = cipher.open(index, sealed, name)
        os.pwrite(dst, plain, start)
    os.ftruncate(dst, header.plain_size)
    return header.plain_size


def encrypt_fd(src: int, dst: int, keyring: Keyring) -> int:
    """Write the envelope of the plaintext open at ``src`` to ``dst``; returns its size."""
    plain_size = os.fstat(src).st_size
    header, key = keyring.new_header(plain_size)
    view = EnvelopeView(ChunkCipher(header, key), plain_file_reader(src), cache_chunks=1)
    os.pwrite(dst, header.encode(), 0)
    for index in range(view.cipher.count):
        os.pwrite(dst, view.sealed_chunk(index), view.cipher.sealed_offset(index))
    return view.size


def _convert(src: Path, dst: Path, work: Callable[[int, int], int]) -> int:
    """Run ``work(src_fd, tmp_fd)`` into a temporary file and rename it to ``dst``.

    Nothing appears under ``dst`` unless the whole conversion succeeded.
    """
    tmp = dst.with_name(dst.name + ".slipstream-tmp")
    fd_in = os.open(src, os.O_RDONLY)
    try:
        try:
            fd_out = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise os_error_to_slipstream(exc, tmp, "write") from exc
        try:
            size = work(fd_in, fd_out)
        except BaseException:
            os.close(fd_out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd_out)
        os.replace(tmp, dst)
        return size
    finally:
        os.close(fd_in)


def decrypt_file(src: Path, dst: Path, keyring: Keyring) -> int:
    """Decrypt ``src`` into ``dst`` (its folder is created); nothing is written unless the
    passphrase opens the envelope and every chunk authenticates."""
    fd = os.open(src, os.O_RDONLY)
    try:
        keyring.open_header(read_header(fd, src.name), src.name)  # before creating anything
    finally:
        os.close(fd)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return _convert(src, dst, lambda i, o: decrypt_fd(i, o, keyring, src.name))


def encrypt_file(src: Path, dst: Path, keyring: Keyring) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return _convert(src, dst, lambda i, o: encrypt_fd(i, o, keyring))


def check_extension(extension: str) -> str:
    """A usable envelope extension: starts with a dot, names no folder."""
    if not extension.startswith(".") or "/" in extension or "\x00" in extension or extension == ".":
        raise UsageError(f"Envelope extension {extension!r} must start with '.' and contain no '/'")
    return extension
