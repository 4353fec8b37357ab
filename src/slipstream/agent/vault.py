"""Secrets of queued and interrupted transfers, sealed before they reach the history file.

A page's ``remote_password``, ``token`` or ``content_protection_passphrase`` must survive an
agent restart (an interrupted transfer resumes on its own, as Connect's do), but the SQLite
history is a file people copy, back up and attach to bug reports. So the secrets of each
transfer are sealed with AES-256-GCM under a key kept in a separate file (``agent.key``,
mode 0600), with the transfer's uuid as associated data (a sealed blob cannot be moved to
another transfer). The history alone reveals nothing; deleting the key forgets every stored
secret at once. It does not protect against a program running as the same user, which can
read both files (as it could read the page's memory).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("slipstream.agent")

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1:"


class Vault:
    def __init__(self, key_path: Path) -> None:
        self._aead = AESGCM(_load_or_create_key(key_path))

    def seal(self, uuid: str, values: dict[str, Any]) -> str | None:
        """The sealed text of ``values`` (None when there is nothing to keep)."""
        if not values:
            return None
        nonce = secrets.token_bytes(NONCE_BYTES)
        plain = json.dumps(values, separators=(",", ":")).encode()
        sealed = nonce + self._aead.encrypt(nonce, plain, uuid.encode())
        return PREFIX + base64.b64encode(sealed).decode()

    def unseal(self, uuid: str, text: object) -> dict[str, Any]:
        """The secrets sealed for ``uuid``; empty (and logged) when they cannot be opened."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            return {}
        try:
            raw = base64.b64decode(text[len(PREFIX) :], validate=True)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], uuid.encode())
            values = json.loads(plain)
        except (ValueError, InvalidTag):
            # A new key (agent.key deleted) or a damaged row: the page must send them again.
            log.warning("the stored credentials of transfer %s cannot be opened", uuid)
            return {}
        return values if isinstance(values, dict) else {}


def _load_or_create_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) == KEY_BYTES:
        return key
    if key:
        log.warning("%s is not a %d-byte key: replacing it", path, KEY_BYTES)
        path.unlink()
    key = secrets.token_bytes(KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created private from the first byte (never world-readable, even for an instant).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another agent on the same data dir was faster: use its key
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key
