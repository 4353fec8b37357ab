"""The server's SSH host key: made once, then kept, because clients pin its fingerprint.

A new key on every start would make every client's known_hosts entry (and every ``sshfp``
pin in a transfer spec) fail with "host key changed", which users learn to click through;
that would defeat the point of checking host keys at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

import asyncssh

from slipstream.errors import ConfigError

log = logging.getLogger("slipstream.server")

KEY_ALGORITHM = "ssh-ed25519"


def fingerprint(key: asyncssh.SSHKey) -> str:
    """The key's OpenSSH SHA-256 fingerprint, ``SHA256:<base64 without padding>``."""
    return key.get_fingerprint("sha256")


def load_or_create_host_key(path: str | Path) -> asyncssh.SSHKey:
    """Load the private host key at ``path``, generating an ed25519 one if it is absent."""
    path = Path(path)
    if not path.exists():
        _create(path)
    return _load(path)


def _load(path: Path) -> asyncssh.SSHKey:
    _check_private(path)
    try:
        key = asyncssh.read_private_key(path)
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"{path}: cannot load the SSH host key: {exc}") from None
    log.info("host key %s fingerprint %s", path, fingerprint(key))
    return key


def _check_private(path: Path) -> None:
    # Like sshd, refuse a host key others can read: whoever reads it can impersonate us.
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the SSH host key: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the SSH host key is readable by other users "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )


def _create(path: Path) -> None:
    """Write a new key atomically and without ever clobbering an existing one.

    The key goes to a private temporary file first and is then hard-linked into place:
    ``link`` fails if the name exists, so two servers starting at once agree on one key
    and nobody ever reads a half-written file.
    """
    key = asyncssh.generate_private_key(KEY_ALGORITHM, comment="slipstream host key")
    data = key.export_private_key("openssh")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _write_private(tmp, data)
        try:
            os.link(tmp, path)
            log.info("generated a new SSH host key in %s", path)
        except FileExistsError:
            pass  # another process won the race; use its key
        finally:
            tmp.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot create the SSH host key: {exc.strerror or exc}"
        ) from None


def _write_private(path: Path, data: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale temp file from a crash
    # O_EXCL + mode 0600 at creation: the key is never readable by others, not even
    # for the moment between open() and a later chmod().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
