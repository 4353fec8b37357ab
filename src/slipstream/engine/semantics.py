"""Checks on the file-semantics fields of a spec that need more than one field to judge.

Run before anything connects (client) or before a session is accepted (server), so a
mistake is a usage error with nothing transferred, never a failure halfway.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from slipstream.engine.multisession import check_split
from slipstream.engine.outgoing import envelope_extension
from slipstream.engine.selection import FilterRules, TimeWindow
from slipstream.errors import UsageError
from slipstream.spec import TransferSpec


def check_file_semantics(spec: TransferSpec, *, client: bool) -> None:
    """Raise :class:`UsageError` for combinations that cannot work.

    ``client``: the check runs where the passphrase must be known (the server never sees
    it, by design).
    """
    FilterRules.from_spec(spec)  # every pattern compiles
    if spec.delete_before_transfer and (spec.multi_session or 1) > 1:
        # Each session of a multi-session transfer sees only its share of the files, so
        # one would delete what another just wrote.
        raise UsageError("delete_before_transfer cannot be combined with multi_session")
    check_split(spec)  # multi_session_threshold: what a split file cannot honour
    try:
        TimeWindow.from_spec(spec, time.time())
    except ValueError as exc:
        raise UsageError(f"exclude_newer_than / exclude_older_than: {exc}") from None
    _check_content_protection(spec, client=client)


def _check_content_protection(spec: TransferSpec, *, client: bool) -> None:
    mode = spec.content_protection
    envelope_extension(spec)
    if mode is None:
        return
    if mode == "encrypt" and spec.direction != "send":
        raise UsageError("content_protection 'encrypt' applies to uploads (direction send)")
    if mode == "decrypt" and spec.direction != "receive":
        raise UsageError("content_protection 'decrypt' applies to downloads (direction receive)")
    if client and not spec.content_protection_passphrase:
        raise UsageError(
            "content_protection needs a passphrase: set SLIPSTREAM_FILEPASS or "
            "content_protection_passphrase"
        )


def session_metadata(spec: TransferSpec) -> dict[str, Any]:
    """``cookie`` and ``tags`` as they travel in events and logs (absent when not given)."""
    metadata: dict[str, Any] = {}
    if spec.cookie is not None:
        metadata["cookie"] = spec.cookie
    tags = spec.tags
    if tags is None and spec.tags64:
        tags = _decode_tags64(spec.tags64)
    if tags is not None:
        metadata["tags"] = tags
    return metadata


def _decode_tags64(text: str) -> Any:
    try:
        return json.loads(base64.b64decode(text, validate=True))
    except (ValueError, TypeError):
        return {"tags64": text}  # not base64 JSON: carried as given


def changes_sources(spec: TransferSpec) -> bool:
    """Whether the spec removes or moves source files after the transfer."""
    return bool(spec.remove_after_transfer or spec.move_after_transfer or spec.delete_source)
