"""The server config tables of the REST API, the HTTPS fallback and tokens.

Parsed by :func:`slipstream.server.config.load_server_config` with the same typed getters
(and the same "unknown keys are errors" rule) as the rest of the file::

    [api]                      # present = the REST API is on
    https_port = 9092
    http_port = 9091           # optional plain HTTP; refused unless listen is loopback
    public_host = "files.example.com"   # remote_host in the specs it hands out
    tls_cert = "tls.crt"       # optional, with tls_key; default: self-signed in state_dir
    tls_key = "tls.key"

    [http_fallback]            # present = HTTPS fallback is on
    port = 8443

    [tokens]
    key_file = "token.key"     # default: state_dir/token.key, made on first start
    life_seconds = 86400

    [[api_users]]              # basic auth on the REST API
    name = "webapp"
    password_hash = "scrypt$..."
    transfer_user = "slipstream"

    [[access_keys]]            # id + secret, confined to a folder of the transfer user
    id = "ak-projects"
    secret_hash = "scrypt$..."
    transfer_user = "slipstream"
    root = "/projects"
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.server.passwords import check_password_hash

if TYPE_CHECKING:
    from slipstream.server.config import UserConfig, _Ctx

DEFAULT_API_HTTPS_PORT = 9092
DEFAULT_API_HTTP_PORT = 9091
DEFAULT_FALLBACK_PORT = 8443
DEFAULT_TOKEN_LIFE = 86400

API_KEYS = frozenset({"enabled", "https_port", "http_port", "public_host", "tls_cert", "tls_key"})
FALLBACK_KEYS = frozenset({"enabled", "port"})
TOKEN_KEYS = frozenset({"key_file", "life_seconds"})
API_USER_KEYS = frozenset({"name", "password_hash", "transfer_user"})
ACCESS_KEY_KEYS = frozenset({"id", "secret_hash", "transfer_user", "root"})


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    enabled: bool = False
    https_port: int = DEFAULT_API_HTTPS_PORT
    http_port: int | None = None
    public_host: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, kw_only=True)
class FallbackSettings:
    enabled: bool = False
    port: int = DEFAULT_FALLBACK_PORT


@dataclass(frozen=True, kw_only=True)
class TokenSettings:
    key_file: Path | None = None
    life_seconds: int = DEFAULT_TOKEN_LIFE


@dataclass(frozen=True, kw_only=True)
class ApiUser:
    """A REST API login (basic auth) acting for a transfer user."""

    name: str
    password_hash: str
    transfer_user: str


@dataclass(frozen=True, kw_only=True)
class AccessKey:
    """An access key id + secret acting for a transfer user below ``root`` only."""

    id: str
    secret_hash: str
    transfer_user: str
    root: str = "/"


def _port(ctx: _Ctx, table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    if key not in table:
        return default
    return ctx.port(table, key, where)


def parse_api(ctx: _Ctx, data: Mapping[str, Any], listen: str) -> ApiSettings:
    if "api" not in data:
        return ApiSettings()
    table = ctx.table(data, "api")
    ctx.check_keys(table, API_KEYS, "api.")
    http_port = _port(ctx, table, "http_port", "api.", DEFAULT_API_HTTP_PORT)
    if "http_port" in table and not _is_loopback(listen):
        raise ctx.error(
            "api.http_port",
            f"plain HTTP would send API passwords in clear text; it is only allowed when "
            f"server.listen is a loopback address (it is {listen!r})",
        )
    cert = ctx.string(table, "tls_cert", "api.", None)
    key = ctx.string(table, "tls_key", "api.", None)
    if (cert is None) != (key is None):
        raise ctx.error("api.tls_cert", "tls_cert and tls_key go together: give both or neither")
    return ApiSettings(
        enabled=ctx.boolean(table, "enabled", "api.", True),
        https_port=_port(ctx, table, "https_port", "api.", DEFAULT_API_HTTPS_PORT),
        http_port=http_port if "http_port" in table else None,
        public_host=ctx.string(table, "public_host", "api.", None),
        tls_cert=ctx.resolve(cert) if cert else None,
        tls_key=ctx.resolve(key) if key else None,
    )


def _is_loopback(listen: str) -> bool:
    if listen == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return False


def parse_fallback(ctx: _Ctx, data: Mapping[str, Any]) -> FallbackSettings:
    if "http_fallback" not in data:
        return FallbackSettings()
    table = ctx.table(data, "http_fallback")
    ctx.check_keys(table, FALLBACK_KEYS, "http_fallback.")
    return FallbackSettings(
        enabled=ctx.boolean(table, "enabled", "http_fallback.", True),
        port=_port(ctx, table, "port", "http_fallback.", DEFAULT_FALLBACK_PORT),
    )


def parse_tokens(ctx: _Ctx, data: Mapping[str, Any]) -> TokenSettings:
    table = ctx.table(data, "tokens")
    ctx.check_keys(table, TOKEN_KEYS, "tokens.")
    life = table.get("life_seconds", DEFAULT_TOKEN_LIFE)
    if isinstance(life, bool) or not isinstance(life, int) or not 60 <= life <= 366 * 86400:
        raise ctx.error("tokens.life_seconds", f"must be seconds from 60 to 1 year, got {life!r}")
    key_file = ctx.string(table, "key_file", "tokens.", None)
    return TokenSettings(key_file=ctx.resolve(key_file) if key_file else None, life_seconds=life)


def parse_api_users(ctx: _Ctx, raw: Any, users: tuple[UserConfig, ...]) -> tuple[ApiUser, ...]:
    entries = _entries(ctx, raw, "api_users")
    result: list[ApiUser] = []
    for index, entry in enumerate(entries, start=1):
        name = _required(ctx, entry, "name", f"api_users[#{index}].")
        where = f"api_users[{name}]."
        ctx.check_keys(entry, API_USER_KEYS, where)
        if any(u.name == name for u in result):
            raise ctx.error(f"{where}name", "duplicate API user")
        result.append(
            ApiUser(
                name=name,
                password_hash=_hash(ctx, entry, "password_hash", where),
                transfer_user=_transfer_user(ctx, entry, where, users),
            )
        )
    return tuple(result)


def parse_access_keys(ctx: _Ctx, raw: Any, users: tuple[UserConfig, ...]) -> tuple[AccessKey, ...]:
    entries = _entries(ctx, raw, "access_keys")
    result: list[AccessKey] = []
    for index, entry in enumerate(entries, start=1):
        key_id = _required(ctx, entry, "id", f"access_keys[#{index}].")
        where = f"access_keys[{key_id}]."
        ctx.check_keys(entry, ACCESS_KEY_KEYS, where)
        if any(k.id == key_id for k in result):
            raise ctx.error(f"{where}id", "duplicate access key")
        transfer_user = _transfer_user(ctx, entry, where, users)
        root = ctx.string(entry, "root", where, "/") or "/"
        _check_root(ctx, root, where, next(u for u in users if u.name == transfer_user))
        result.append(
            AccessKey(
                id=key_id,
                secret_hash=_hash(ctx, entry, "secret_hash", where),
                transfer_user=transfer_user,
                root=root,
            )
        )
    return tuple(result)


def _entries(ctx: _Ctx, raw: Any, key: str) -> list[Mapping[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise ctx.error(key, f"must be an array of tables ([[{key}]])")
    return raw


def _required(ctx: _Ctx, entry: Mapping[str, Any], key: str, where: str) -> str:
    value = ctx.string(entry, key, where, None)
    if not value:
        raise ctx.error(f"{where}{key}", "missing")
    return value


def _hash(ctx: _Ctx, entry: Mapping[str, Any], key: str, where: str) -> str:
    value = _required(ctx, entry, key, where)
    try:
        check_password_hash(value)
    except ValueError as exc:
        raise ctx.error(
            f"{where}{key}", f"{exc} (make one with slipstream.server.passwords.hash_password)"
        ) from None
    return value


def _transfer_user(
    ctx: _Ctx, entry: Mapping[str, Any], where: str, users: tuple[UserConfig, ...]
) -> str:
    name = _required(ctx, entry, "transfer_user", where)
    if not any(u.name == name for u in users):
        raise ctx.error(f"{where}transfer_user", f"no [[users]] entry named {name!r}")
    return name


def _check_root(ctx: _Ctx, root: str, where: str, user: UserConfig) -> None:
    # Checked now so a typo fails at start, not on the first request; the REST API still
    # resolves it with the docroot rules on every use.
    parts = [p for p in root.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ctx.error(f"{where}root", "must stay inside the transfer user's docroot")
    if not (user.docroot.joinpath(*parts)).is_dir():
        raise ctx.error(f"{where}root", f"{root!r} is not a folder in {user.name}'s docroot")
