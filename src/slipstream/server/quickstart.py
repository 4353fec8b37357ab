"""A ready-to-run server folder in one call, for trying Slipstream and for tests.

``DIR/server.toml`` (one user, ``slipstream``, with a random password; the REST API with
one API user, ``api``, and the HTTPS fallback), ``DIR/docroot/``, ``DIR/host_key`` and
``DIR/credentials.json`` (the clear passwords, mode 0600). A second
run reuses all of it, so clients that saved the password or pinned the host key keep
working. An existing ``server.toml`` is never rewritten: the administrator may have edited it.

Port 0 is written as is and means "pick free ports when the server starts"; the real
ports are known only after binding, so ``QuickstartInfo`` carries the configured values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slipstream.errors import ConfigError
from slipstream.server.config import ServerConfig, load_server_config
from slipstream.server.hostkey import fingerprint, load_or_create_host_key
from slipstream.server.passwords import hash_password, verify_password

QUICKSTART_USER = "slipstream"
API_USER = "api"
CONFIG_NAME = "server.toml"
CREDENTIALS_NAME = "credentials.json"
DOCROOT_NAME = "docroot"
HOST_KEY_NAME = "host_key"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class QuickstartInfo:
    host: str  # where a client on this machine connects (a wildcard listen becomes loopback)
    user: str
    password: str
    docroot: Path
    config_path: Path
    ssh_port: int  # as configured: 0 until the server has bound its ports
    fasp_port: int
    host_key_fingerprint: str  # what a client passes as sshfp
    api_user: str | None = None  # None: a folder made before the REST API existed
    api_password: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["docroot"], data["config_path"] = str(self.docroot), str(self.config_path)
        return data


def create_quickstart(
    dir: Path,
    *,
    listen: str = "127.0.0.1",
    ssh_port: int = 0,
    fasp_port: int = 0,
    api_port: int = 0,
    fallback_port: int = 0,
) -> QuickstartInfo:
    """Create (or reuse) a quickstart server folder in ``dir``."""
    dir = Path(dir).expanduser().absolute()
    try:
        dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (dir / DOCROOT_NAME).mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{dir}: cannot create the quickstart folder: {exc.strerror}") from None
    password = _load_or_create_password(dir)
    api_password = _load_or_create_api_password(dir)
    config_path = dir / CONFIG_NAME
    if not config_path.exists():
        text = _config_text(listen, ssh_port, fasp_port, password)
        if api_password is not None:
            text += _api_text(api_port, fallback_port, api_password)
        _write_private(config_path, text, 0o600)
    config = load_server_config(config_path)
    _check_matches(config, password)
    key = load_or_create_host_key(config.host_key)
    info = _info(config, password, fingerprint(key))
    if api_password is not None and _api_matches(config, api_password):
        info = dataclasses.replace(info, api_user=API_USER, api_password=api_password)
    return info


def _load_or_create_password(dir: Path) -> str:
    path = dir / CREDENTIALS_NAME
    if path.exists():
        return _read_credentials(path)
    if (dir / CONFIG_NAME).exists():
        # The hash in server.toml cannot be turned back into a password, and overwriting an
        # existing config could lose the administrator's edits: ask instead of guessing.
        raise ConfigError(
            f"{path}: missing, but {dir / CONFIG_NAME} exists; restore {CREDENTIALS_NAME} "
            f"or delete {CONFIG_NAME} to generate new credentials"
        )
    password = secrets.token_urlsafe(18)
    body = json.dumps({"user": QUICKSTART_USER, "password": password}, indent=2) + "\n"
    _write_private(path, body, 0o600)
    return password


def _load_or_create_api_password(dir: Path) -> str | None:
    """The API user's password; None for a folder whose config predates the REST API."""
    path = dir / CREDENTIALS_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    value = data.get("api_password")
    if isinstance(value, str) and value:
        return value
    if (dir / CONFIG_NAME).exists():
        return None  # never rewrite an existing config to add the API
    data["api_user"], data["api_password"] = API_USER, secrets.token_urlsafe(18)
    _write_private(path, json.dumps(data, indent=2) + "\n", 0o600)
    return str(data["api_password"])


def _api_matches(config: ServerConfig, api_password: str) -> bool:
    entry = next((u for u in config.api_users if u.name == API_USER), None)
    if entry is None or not config.api.enabled:
        return False  # the administrator removed or disabled it: nothing to print
    if not verify_password(api_password, entry.password_hash):
        raise ConfigError(
            f"{config.path}: api_users[{API_USER}].password_hash: does not match the "
            f"api_password in {CREDENTIALS_NAME}"
        )
    return True


def _read_credentials(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the quickstart credentials: {exc}") from None
    password = data.get("password") if isinstance(data, dict) else None
    if not isinstance(password, str) or not password:
        raise ConfigError(f"{path}: password: missing or not a string")
    return password


def _check_matches(config: ServerConfig, password: str) -> None:
    user = config.user(QUICKSTART_USER)
    if user is None or not user.password_hash:
        raise ConfigError(f"{config.path}: users: no user {QUICKSTART_USER!r} with a password")
    if not verify_password(password, user.password_hash):
        raise ConfigError(
            f"{config.path}: users[{QUICKSTART_USER}].password_hash: does not match the "
            f"password in {CREDENTIALS_NAME}"
        )


def _info(config: ServerConfig, password: str, host_fp: str) -> QuickstartInfo:
    user = config.user(QUICKSTART_USER)
    assert user is not None  # checked by _check_matches
    return QuickstartInfo(
        host=_WILDCARDS.get(config.listen, config.listen),
        user=QUICKSTART_USER,
        password=password,
        docroot=user.docroot,
        config_path=config.path,
        ssh_port=config.ssh_port,
        fasp_port=config.fasp_port,
        host_key_fingerprint=host_fp,
    )


def _config_text(listen: str, ssh_port: int, fasp_port: int, password: str) -> str:
    return f"""\
# Slipstream server, made by quickstart. Relative paths are relative to this folder.
# Port 0 means: pick a free port at start (the serve command prints the real ones).

[server]
listen = {_toml_str(listen)}
ssh_port = {int(ssh_port)}
fasp_port = {int(fasp_port)}
host_key = "{HOST_KEY_NAME}"
state_dir = "state"

[[users]]
name = "{QUICKSTART_USER}"
# The clear password is in {CREDENTIALS_NAME}.
password_hash = "{hash_password(password)}"
docroot = "{DOCROOT_NAME}"
read = true
write = true
browse = true
"""


def _api_text(api_port: int, fallback_port: int, api_password: str) -> str:
    return f"""
# The REST API (HTTPS, self-signed certificate made on first start in state/) and the
# HTTPS fallback used when UDP is blocked. Port 0: any free port.
[api]
https_port = {int(api_port)}

[http_fallback]
port = {int(fallback_port)}

[[api_users]]
name = "{API_USER}"
# The clear password is in {CREDENTIALS_NAME}.
password_hash = "{hash_password(api_password)}"
transfer_user = "{QUICKSTART_USER}"
"""


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes, except that TOML also
    # wants DEL escaped (and JSON leaves it raw).
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` atomically, created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
