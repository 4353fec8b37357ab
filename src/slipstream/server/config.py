"""The server configuration file (TOML), parsed into typed, immutable dataclasses.

Every problem is a :class:`~slipstream.errors.ConfigError` whose message names the file,
the key and the reason, because the person reading it is an administrator editing that
file, not a developer reading a traceback.

Unknown keys are errors too: a misspelt ``wirte = false`` silently ignored would grant
write access the administrator meant to deny. Later features add their keys to the
``_*_KEYS`` sets and a field (with a default) to the dataclass, so old files keep loading.

Relative paths are resolved against the folder holding the config file, never the current
directory, so a service manager can start the server from anywhere.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from slipstream.errors import ConfigError
from slipstream.server.api_config import (
    AccessKey,
    ApiSettings,
    ApiUser,
    FallbackSettings,
    TokenSettings,
    parse_access_keys,
    parse_api,
    parse_api_users,
    parse_fallback,
    parse_tokens,
)
from slipstream.server.passwords import check_password_hash
from slipstream.server.rate_policy import (
    SERVER_RATE_KEYS,
    USER_RATE_KEYS,
    UserRatePolicy,
    parse_aggregate_rate,
    parse_user_rate,
)

DEFAULT_PORT = 33001
DEFAULT_LISTEN = "127.0.0.1"

_TOP_KEYS = frozenset(
    {"server", "users", "api", "http_fallback", "tokens", "api_users", "access_keys"}
)
_SERVER_KEYS = (
    frozenset({"listen", "ssh_port", "fasp_port", "host_key", "state_dir", "log_file", "overwrite"})
    | SERVER_RATE_KEYS
)
_USER_KEYS = frozenset(
    {
        "name",
        "password_hash",
        "authorized_keys",
        "authorized_keys_file",
        "docroot",
        "read",
        "write",
        "browse",
        "token_only",
        "overwrite",
    }
)
# Names go into logs and, later, into paths and tokens: keep them boring.
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class UserConfig:
    """One ``[[users]]`` entry: who may log in, and what they may do where."""

    name: str
    docroot: Path
    password_hash: str | None = None
    # OpenSSH authorized_keys lines (options allowed), inline ones first, then the file's.
    authorized_keys: tuple[str, ...] = ()
    read: bool = True  # may download
    write: bool = True  # may upload
    browse: bool = True  # may list directories
    token_only: bool = False  # logs in with server-issued tokens only (no password/key)
    overwrite: bool | None = None  # may uploads replace existing files (None: the server's)
    rate: UserRatePolicy = field(default_factory=UserRatePolicy)  # caps, default, policies


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The whole file. ``path`` is the file it came from (for messages and reloads)."""

    path: Path
    listen: str = DEFAULT_LISTEN
    ssh_port: int = DEFAULT_PORT
    fasp_port: int = DEFAULT_PORT
    host_key: Path
    state_dir: Path
    log_file: Path | None = None
    aggregate_rate_kbps: int | None = None  # one cap shared by every session (rate_policy.py)
    overwrite: bool = True  # uploads may replace existing files (users may override)
    users: tuple[UserConfig, ...] = field(default=())
    # REST API, HTTPS fallback and tokens: see server/api_config.py (off unless configured).
    api: ApiSettings = field(default_factory=ApiSettings)
    http_fallback: FallbackSettings = field(default_factory=FallbackSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    api_users: tuple[ApiUser, ...] = field(default=())
    access_keys: tuple[AccessKey, ...] = field(default=())

    def user(self, name: str) -> UserConfig | None:
        """The user called ``name``, or None."""
        for user in self.users:
            if user.name == name:
                return user
        return None


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and validate the server config file at ``path``."""
    path = Path(path).expanduser().absolute()
    data = _read_toml(path)
    ctx = _Ctx(path)
    ctx.check_keys(data, _TOP_KEYS, "")
    server = ctx.table(data, "server")
    users = _parse_users(ctx, data.get("users", []))
    config = _parse_server(ctx, server, users)
    return dataclasses.replace(
        config,
        api=parse_api(ctx, data, config.listen),
        http_fallback=parse_fallback(ctx, data),
        tokens=parse_tokens(ctx, data),
        api_users=parse_api_users(ctx, data.get("api_users", []), users),
        access_keys=parse_access_keys(ctx, data.get("access_keys", []), users),
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class _Ctx:
    """Typed getters that raise ConfigError naming the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {reason}")

    def check_keys(self, table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(allowed))})"
                )

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return value

    def string(
        self, table: Mapping[str, Any], key: str, where: str, default: str | None
    ) -> str | None:
        value = table.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(f"{where}{key}", f"must be a string, got {value!r}")
        return value

    def boolean(self, table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"{where}{key}", f"must be true or false, got {value!r}")
        return value

    def port(self, table: Mapping[str, Any], key: str, where: str) -> int:
        value = table.get(key, DEFAULT_PORT)
        # bool is an int in Python; `ssh_port = true` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            raise self.error(f"{where}{key}", f"must be a port number 0-65535, got {value!r}")
        return value

    def resolve(self, value: str) -> Path:
        return (self.base / Path(value).expanduser()).absolute()


def _parse_server(
    ctx: _Ctx, table: Mapping[str, Any], users: tuple[UserConfig, ...]
) -> ServerConfig:
    ctx.check_keys(table, _SERVER_KEYS, "server.")
    where = "server."
    listen = ctx.string(table, "listen", where, DEFAULT_LISTEN) or ""
    if not listen.strip():
        raise ctx.error("server.listen", "must be an address such as 127.0.0.1 or 0.0.0.0")
    host_key = ctx.string(table, "host_key", where, "host_key") or ""
    if not host_key:
        raise ctx.error("server.host_key", "must be a file path")
    log_file = ctx.string(table, "log_file", where, "")
    return ServerConfig(
        path=ctx.path,
        listen=listen.strip(),
        ssh_port=ctx.port(table, "ssh_port", where),
        fasp_port=ctx.port(table, "fasp_port", where),
        host_key=ctx.resolve(host_key),
        state_dir=ctx.resolve(ctx.string(table, "state_dir", where, "state") or "state"),
        log_file=ctx.resolve(log_file) if log_file else None,
        aggregate_rate_kbps=parse_aggregate_rate(ctx, table),
        overwrite=ctx.boolean(table, "overwrite", where, True),
        users=users,
    )


def _parse_users(ctx: _Ctx, raw: Any) -> tuple[UserConfig, ...]:
    if not isinstance(raw, list):
        raise ctx.error("users", "must be an array of tables ([[users]])")
    users: list[UserConfig] = []
    for index, entry in enumerate(raw, start=1):
        user = _parse_user(ctx, entry, index)
        if any(u.name == user.name for u in users):
            raise ctx.error(f"users[{user.name}].name", "duplicate user")
        users.append(user)
    return tuple(users)


def _parse_user(ctx: _Ctx, entry: Any, index: int) -> UserConfig:
    if not isinstance(entry, dict):
        raise ctx.error(f"users[#{index}]", "must be a table")
    name = _user_name(ctx, entry, index)
    where = f"users[{name}]."
    ctx.check_keys(entry, _USER_KEYS | USER_RATE_KEYS, where)
    password_hash = _password_hash(ctx, entry, where)
    keys = _authorized_keys(ctx, entry, where)
    token_only = ctx.boolean(entry, "token_only", where, False)
    if password_hash is None and not keys and not token_only:
        raise ctx.error(
            f"users[{name}]",
            "has neither password_hash nor authorized_keys/authorized_keys_file: "
            "nobody could log in as this user (token_only = true makes a token-only user)",
        )
    return UserConfig(
        name=name,
        docroot=_docroot(ctx, entry, where),
        password_hash=password_hash,
        authorized_keys=keys,
        read=ctx.boolean(entry, "read", where, True),
        write=ctx.boolean(entry, "write", where, True),
        browse=ctx.boolean(entry, "browse", where, True),
        token_only=token_only,
        overwrite=ctx.boolean(entry, "overwrite", where, True) if "overwrite" in entry else None,
        rate=parse_user_rate(ctx, entry, where),
    )


def _user_name(ctx: _Ctx, entry: Mapping[str, Any], index: int) -> str:
    name = ctx.string(entry, "name", f"users[#{index}].", None)
    if name is None:
        raise ctx.error(f"users[#{index}].name", "missing")
    if not _USER_NAME.match(name):
        raise ctx.error(
            f"users[#{index}].name",
            f"{name!r} is not a valid user name (letters, digits, '._@-', at most 64)",
        )
    return name


def _password_hash(ctx: _Ctx, entry: Mapping[str, Any], where: str) -> str | None:
    value = ctx.string(entry, "password_hash", where, None)
    if value is None:
        return None
    try:
        check_password_hash(value)
    except ValueError as exc:
        raise ctx.error(
            f"{where}password_hash",
            f"{exc} (make one with slipstream.server.passwords.hash_password)",
        ) from None
    return value


def _docroot(ctx: _Ctx, entry: Mapping[str, Any], where: str) -> Path:
    value = ctx.string(entry, "docroot", where, None)
    if not value:
        raise ctx.error(f"{where}docroot", "missing: every user needs a docroot folder")
    path = ctx.resolve(value)
    if not path.is_dir():
        raise ctx.error(f"{where}docroot", f"{path} is not an existing directory")
    return path


def _authorized_keys(ctx: _Ctx, entry: Mapping[str, Any], where: str) -> tuple[str, ...]:
    inline = entry.get("authorized_keys", [])
    if not isinstance(inline, list) or not all(isinstance(k, str) for k in inline):
        raise ctx.error(f"{where}authorized_keys", "must be an array of strings")
    lines = [line.strip() for line in inline if line.strip()]
    _check_key_lines(ctx, lines, f"{where}authorized_keys")
    file_value = ctx.string(entry, "authorized_keys_file", where, None)
    if file_value:
        lines += _read_key_file(ctx, ctx.resolve(file_value), f"{where}authorized_keys_file")
    return tuple(lines)


def _read_key_file(ctx: _Ctx, path: Path, key: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ctx.error(key, f"cannot read {path}: {reason}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    _check_key_lines(ctx, lines, f"{key} ({path})")
    return lines


def _check_key_lines(ctx: _Ctx, lines: list[str], key: str) -> None:
    # Parse each line on its own so the message can say which one is wrong.
    for number, line in enumerate(lines, start=1):
        try:
            asyncssh.import_authorized_keys(line)
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise ctx.error(
                key, f"entry {number} is not an OpenSSH public key line: {exc}"
            ) from None
