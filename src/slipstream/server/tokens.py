"""Transfer tokens: what lets a web page's user transfer without ever seeing a password.

A web application's backend asks the REST API for a transfer spec (``upload_setup`` /
``download_setup``); the answer carries a token that authorizes exactly that transfer. The
token is AES-256-GCM sealed with a key only the server holds, so it can be neither read nor
altered by the browser, and binds:

* the transfer user it logs in as;
* the direction (the client's: ``send`` is an upload, ``receive`` a download);
* the paths: for an upload the destination folder, for a download the exact sources;
* an expiry (24 h by default; verification allows a small clock skew for tokens made with
  ``slipstream token create`` on another machine sharing the key).

Wire form: ``SLT1.`` + base64url(nonce(12) || AES-GCM(zlib(JSON claims))), the prefix being
the associated data. Over SSH the token travels in the password field (see
docs/protocol.md, "Token authorization"); a login with any token-shaped password is let in
as a :class:`TokenUser` and the session is refused, with the precise reason, before any
file system access if the token does not fit the OPEN spec.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import os
import posixpath
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from slipstream.errors import ConfigError, TokenError
from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.sshd import Authenticator
from slipstream.spec import TransferSpec

TOKEN_PREFIX = "SLT1."
DEFAULT_LIFE_SECONDS = 86400
CLOCK_SKEW_SECONDS = 60
KEY_BYTES = 32
MAX_TOKEN_CHARS = 256 * 1024  # a download of thousands of files still fits; more is abuse
_AAD = TOKEN_PREFIX.encode("ascii")
_HKDF_INFO = b"slipstream transfer token v1"


def looks_like_token(text: str | None) -> bool:
    return bool(text) and str(text).startswith(TOKEN_PREFIX)


# --- paths as a token sees them ------------------------------------------------------------


def canonical_path(path: str) -> str:
    """A docroot-relative path in one spelling: ``/a/b``. Lexical only, like the resolver:
    ``..`` past the root stays at the root here and is refused later by the docroot check."""
    normal = posixpath.normpath("/" + path)
    return "/" + normal.lstrip("/")


def upload_destination(spec: TransferSpec) -> str:
    return canonical_path(spec.destination_root or "/")


def download_sources(spec: TransferSpec) -> list[str]:
    """Every source of a download, joined with ``source_root`` as the server reads them."""
    root = spec.source_root
    return sorted(
        {canonical_path(f"{root}/{p.source}" if root else p.source) for p in spec.path_pairs()}
    )


# --- claims ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenClaims:
    """What a token authorizes. ``paths``: the destination (upload) or the sources."""

    user: str
    direction: str
    paths: tuple[str, ...]
    issued_at: int
    expires_at: int
    token_id: str = field(default_factory=lambda: secrets.token_hex(8))
    issuer: str = ""
    xfer_id: str | None = None  # the ops record a fallback ticket continues

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": 1,
            "u": self.user,
            "d": self.direction,
            "p": list(self.paths),
            "iat": self.issued_at,
            "exp": self.expires_at,
            "jti": self.token_id,
            "iss": self.issuer,
        }
        if self.xfer_id:
            body["x"] = self.xfer_id
        return body

    @classmethod
    def from_json(cls, body: Any) -> TokenClaims:
        try:
            if body["v"] != 1:
                raise TokenError("The token has an unknown version")
            return cls(
                user=str(body["u"]),
                direction=str(body["d"]),
                paths=tuple(str(p) for p in body["p"]),
                issued_at=int(body["iat"]),
                expires_at=int(body["exp"]),
                token_id=str(body["jti"]),
                issuer=str(body.get("iss", "")),
                xfer_id=str(body["x"]) if body.get("x") else None,
            )
        except (KeyError, TypeError, ValueError):
            raise TokenError("The token is malformed") from None

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """A readable form for ``slipstream token inspect`` and the REST API."""
        now = time.time() if now is None else now
        return {
            "user": self.user,
            "direction": self.direction,
            "kind": "upload" if self.direction == "send" else "download",
            "paths": list(self.paths),
            "issued_at": _iso(self.issued_at),
            "expires_at": _iso(self.expires_at),
            "expired": now > self.expires_at,
            "token_id": self.token_id,
            "issuer": self.issuer,
            **({"xfer_id": self.xfer_id} if self.xfer_id else {}),
        }


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def claims_for_spec(
    spec: TransferSpec,
    user: str,
    *,
    life_seconds: int,
    issuer: str = "",
    xfer_id: str | None = None,
    now: float | None = None,
) -> TokenClaims:
    """The claims that authorize exactly ``spec`` for ``user``."""
    issued = int(time.time() if now is None else now)
    if spec.direction == "send":
        paths: tuple[str, ...] = (upload_destination(spec),)
    else:
        paths = tuple(download_sources(spec))
    return TokenClaims(
        user=user,
        direction=spec.direction,
        paths=paths,
        issued_at=issued,
        expires_at=issued + max(1, life_seconds),
        issuer=issuer,
        xfer_id=xfer_id,
    )


def check_binding(claims: TokenClaims, login_user: str, spec: TransferSpec) -> None:
    """Refuse ``spec`` unless the token authorizes it. Pure: no file system access."""
    if claims.user != login_user:
        raise TokenError(
            f"Token rejected: it was issued for user {claims.user!r}, not {login_user!r}"
        )
    if claims.direction != spec.direction:
        allowed = "uploads" if claims.direction == "send" else "downloads"
        raise TokenError(f"Token rejected: it authorizes {allowed} only")
    if spec.direction == "send":
        wanted = upload_destination(spec)
        if wanted != claims.paths[0]:
            raise TokenError(
                f"Token rejected: it authorizes uploads to {claims.paths[0]!r}, not {wanted!r}"
            )
        return
    extra = [path for path in download_sources(spec) if path not in set(claims.paths)]
    if extra:
        more = f" and {len(extra) - 1} other path(s)" if len(extra) > 1 else ""
        raise TokenError(
            f"Token rejected: it does not authorize downloading {extra[0]!r}{more}",
            internal_message=f"token {claims.token_id} paths {list(claims.paths)[:10]}",
        )


# --- sealing -------------------------------------------------------------------------------


class TokenCodec:
    """Issues and opens tokens with one server secret."""

    def __init__(
        self,
        secret: bytes,
        *,
        life_seconds: int = DEFAULT_LIFE_SECONDS,
        skew_seconds: int = CLOCK_SKEW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ConfigError("the token key must be at least 16 bytes")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
        self._aead = AESGCM(key)
        self.life_seconds = life_seconds
        self.skew_seconds = skew_seconds
        self.clock = clock

    def seal(self, claims: TokenClaims) -> str:
        plain = zlib.compress(json.dumps(claims.to_json(), separators=(",", ":")).encode(), 9)
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, plain, _AAD)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(blob).decode("ascii").rstrip("=")

    def issue_for_spec(
        self,
        spec: TransferSpec,
        user: str,
        *,
        life_seconds: int | None = None,
        issuer: str = "",
        xfer_id: str | None = None,
    ) -> str:
        life = self.life_seconds if life_seconds is None else life_seconds
        claims = claims_for_spec(
            spec, user, life_seconds=life, issuer=issuer, xfer_id=xfer_id, now=self.clock()
        )
        return self.seal(claims)

    def open(self, token: str) -> TokenClaims:
        """Decrypt and parse, without the expiry check (``inspect`` shows expired ones)."""
        if not looks_like_token(token) or len(token) > MAX_TOKEN_CHARS:
            raise TokenError("Token rejected: it is not a Slipstream token")
        body = token[len(TOKEN_PREFIX) :]
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            plain = self._aead.decrypt(blob[:12], blob[12:], _AAD)
            # Bounded: the plaintext is ours, but never trust a length we did not check.
            claims = json.loads(zlib.decompressobj().decompress(plain, 16 * MAX_TOKEN_CHARS))
        except (binascii.Error, ValueError, InvalidTag, zlib.error):
            raise TokenError(
                "Token rejected: it was altered or made with another server key"
            ) from None
        return TokenClaims.from_json(claims)

    def verify(self, token: str) -> TokenClaims:
        """Open ``token`` and check it is within its lifetime."""
        claims = self.open(token)
        now = self.clock()
        if now > claims.expires_at + self.skew_seconds:
            ago = int(now - claims.expires_at)
            raise TokenError(
                f"Token rejected: it expired at {_iso(claims.expires_at)} ({ago} s ago); "
                "ask the application for a new one"
            )
        if claims.issued_at > now + self.skew_seconds:
            raise TokenError(
                "Token rejected: it was issued in the future (check the server clocks)"
            )
        return claims


def load_or_create_key(path: Path) -> bytes:
    """The server's token secret: 32 random bytes, hex in a 0600 file made on first use."""
    if not path.exists():
        _create_key(path)
    try:
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the token key: {exc}") from None
    if len(secret) < 16:
        raise ConfigError(f"{path}: the token key is too short (want 32 hex-encoded bytes)")
    return secret


def _create_key(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            os.link(tmp, path)  # never clobber a key another process just made
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the token key: {exc.strerror}") from None


def codec_for_config(config: ServerConfig) -> TokenCodec:
    settings = config.tokens
    key_file = settings.key_file or config.state_dir / "token.key"
    return TokenCodec(load_or_create_key(key_file), life_seconds=settings.life_seconds)


# --- SSH login with a token ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TokenUser(UserConfig):
    """A login made with a token. ``claims`` is None when the token was refused; then
    ``problem`` says why, and the session reports it instead of doing anything."""

    claims: TokenClaims | None = None
    problem: str = ""

    @property
    def login_method(self) -> str:
        return "token" if self.claims is not None else "refused token"


def _as_token_user(user: UserConfig, **extra: Any) -> TokenUser:
    values = {f.name: getattr(user, f.name) for f in dataclasses.fields(UserConfig)}
    return TokenUser(**values, **extra)


def _refused_user(name: str, problem: str) -> TokenUser:
    # No rights and a docroot that does not exist: the session is refused before either
    # is looked at, and nothing here says whether the user name exists.
    return TokenUser(
        name=name,
        docroot=Path("/nonexistent/slipstream-token-refused"),
        read=False,
        write=False,
        browse=False,
        problem=problem,
    )


def token_login(codec: TokenCodec, config: ServerConfig, username: str, token: str) -> TokenUser:
    """The user a token logs in as; a refused token yields a user carrying the reason."""
    user = config.user(username)
    try:
        claims = codec.verify(token)
    except TokenError as exc:
        return _refused_user(username, exc.user_message)
    if user is None or claims.user != username:
        return _refused_user(username, f"Token rejected: it was not issued for user {username!r}")
    return _as_token_user(user, claims=claims)


def require_token_grant(user: UserConfig, spec: TransferSpec) -> None:
    """For a token login, refuse ``spec`` unless the token authorizes it."""
    if not isinstance(user, TokenUser):
        return
    if user.claims is None:
        raise TokenError(user.problem or "Token rejected")
    check_binding(user.claims, user.name, spec)


class TokenAuthenticator(Authenticator):
    """Passwords and keys as before, plus tokens in the password field.

    Users with ``token_only`` may log in with a token only.
    """

    def __init__(self, config: ServerConfig, codec: TokenCodec) -> None:
        super().__init__(config)
        self.codec = codec

    async def check_password(self, username: str, password: str) -> UserConfig | None:
        if looks_like_token(password):
            return token_login(self.codec, self.config, username, password)
        user = await super().check_password(username, password)
        return None if user is None or user.token_only else user

    def check_public_key(
        self, username: str, key: asyncssh.SSHKey, peer_ip: str
    ) -> UserConfig | None:
        user = super().check_public_key(username, key, peer_ip)
        return None if user is None or user.token_only else user


# --- administration (`slipstream token create|inspect`) --------------------------------------


def admin_create(
    config: ServerConfig,
    *,
    user: str,
    upload_to: str | None,
    download: list[str],
    source_root: str | None,
    life_seconds: int | None,
) -> tuple[str, TokenClaims]:
    """A token for ``user``: an upload to ``upload_to`` or a download of ``download``.
    Paths are checked against the user's docroot now, so a typo fails here, not later."""
    from slipstream.engine.paths import resolve_in_docroot
    from slipstream.errors import UsageError
    from slipstream.spec import load_transfer_spec

    account = config.user(user)
    if account is None:
        raise UsageError(f"no user {user!r} in {config.path}")
    if (upload_to is None) == (not download):
        raise UsageError("give either --upload DEST or --download SRC (repeatable)")
    if upload_to is not None:
        resolve_in_docroot(account.docroot, upload_to)
        # An upload token binds the destination only; the files are the client's.
        body: dict[str, Any] = {"direction": "send", "destination_root": upload_to, "paths": ["."]}
    else:
        for source in download:
            full = f"{source_root}/{source}" if source_root else source
            resolve_in_docroot(account.docroot, full, must_exist=True)
        body = {"direction": "receive", "paths": [{"source": s} for s in download]}
        if source_root:
            body["source_root"] = source_root
    codec = codec_for_config(config)
    life = codec.life_seconds if life_seconds is None else life_seconds
    spec = load_transfer_spec(body)
    claims = claims_for_spec(spec, user, life_seconds=life, issuer="admin", now=codec.clock())
    return codec.seal(claims), claims


def admin_inspect(config: ServerConfig, token: str) -> tuple[dict[str, Any], str | None]:
    """The token's claims (readable) and the reason it would be refused, if any."""
    codec = codec_for_config(config)
    claims = codec.open(token)  # raises TokenError when altered or from another key
    try:
        codec.verify(token)
        problem = None
    except TokenError as exc:
        problem = exc.user_message
    if problem is None and config.user(claims.user) is None:
        problem = f"Token rejected: user {claims.user!r} does not exist on this server"
    return claims.describe(codec.clock()), problem
