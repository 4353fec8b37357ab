"""Password hashing for server users: scrypt in a self-describing string.

The stored form is ``scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>``. Keeping the cost
parameters inside the string lets us raise them later without breaking hashes already in
config files: each hash is verified with the parameters it was made with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

SCHEME = "scrypt"
DEFAULT_N = 2**14  # ~16 MiB and ~50 ms per check: slow for an attacker, fine for a login
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds on parameters read back from a config file: a typo such as n=2**30 would
# otherwise make every login allocate gigabytes (a denial of service we would inflict on
# ourselves), and a tiny n would make the hash worthless.
_MIN_N, _MAX_N = 2**10, 2**20
_MAX_R, _MAX_P = 32, 16
_MAX_MEM = 256 * 1024 * 1024


@dataclass(frozen=True)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def hash_password(password: str) -> str:
    """Hash ``password`` with a fresh random salt, for storing in the server config."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, DEFAULT_N, DEFAULT_R, DEFAULT_P, HASH_BYTES)
    return _format(_ScryptHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, salt, digest))


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; a malformed ``stored`` never matches.

    Never raises on bad input: this runs on the authentication path, where an exception
    would turn a wrong password into a server error.
    """
    try:
        parsed = _parse(stored)
    except ValueError:
        return False
    candidate = _scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.digest))
    return hmac.compare_digest(candidate, parsed.digest)


def check_password_hash(stored: str) -> None:
    """Raise ``ValueError`` saying what is wrong if ``stored`` is not a usable hash."""
    _parse(stored)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEM, dklen=dklen
    )


def _format(h: _ScryptHash) -> str:
    return f"{SCHEME}$n={h.n},r={h.r},p={h.p}${_b64(h.salt)}${_b64(h.digest)}"


def _parse(stored: str) -> _ScryptHash:
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(f"expected '{SCHEME}$n=...,r=...,p=...$<salt>$<hash>'")
    n, r, p = _parse_params(parts[1])
    salt, digest = _unb64(parts[2], "salt"), _unb64(parts[3], "hash")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return _ScryptHash(n, r, p, salt, digest)


def _parse_params(text: str) -> tuple[int, int, int]:
    try:
        params = dict(item.split("=", 1) for item in text.split(","))
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
    except (ValueError, KeyError):
        raise ValueError(f"bad scrypt parameters {text!r}: expected n=..,r=..,p=..") from None
    if n & (n - 1) or not _MIN_N <= n <= _MAX_N:
        raise ValueError(f"scrypt n={n} must be a power of two in [{_MIN_N}, {_MAX_N}]")
    if not (1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"scrypt r={r}, p={p} out of range (r<={_MAX_R}, p<={_MAX_P})")
    if 128 * n * r * 2 > _MAX_MEM:
        raise ValueError("scrypt parameters need too much memory")
    return n, r, p


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
