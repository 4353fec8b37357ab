"""Control-channel messages: JSON objects, one per line, over the SSH "slipstream" subsystem.

The control channel is reliable and ordered, so it carries everything that must not be lost
or reordered: the session negotiation, the file manifest, per-file readiness (which also
fixes the global block numbering, see ``docs/protocol.md``), checksums and confirmations.
Bulk data never goes here.

This module only frames and checks messages; it performs no I/O.
"""

from __future__ import annotations

import json
from typing import Any

from slipstream.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20  # a manifest entry is small; a longer line is a broken or hostile peer

# Message types ("t"). Client -> server: OPEN. Server -> client: ACCEPT, ERROR.
# Sender -> receiver: FILE, DIR, LINK, FILE_END, SUMS, EOF. Receiver -> sender: READY, SKIP,
# SUMS_REQ, FILE_DONE, LINK_DONE, DONE. Either side: ERROR (fatal for the session), RATE
# (live rate change request). docs/protocol.md "Control channel" describes the exchange.
# A split file (multi_session_threshold) is announced per session as FILE with the optional
# RANGE_FIELD ``[offset, length]`` next to the whole ``size``; SKIP and FILE_DONE for it carry
# WHOLE_FIELD ``true`` when they settle the file as a whole rather than just that range.
OPEN = "open"
ACCEPT = "accept"
ERROR = "error"
FILE = "file"
DIR = "dir"
FILE_END = "file_end"
EOF = "eof"
READY = "ready"
SKIP = "skip"
FILE_DONE = "file_done"
DONE = "done"
RATE = "rate"
LINK = "link"  # a symbolic link sent as a link (symlink_policy copy)
LINK_DONE = "link_done"
SUMS_REQ = "sums_req"  # resume / overwrite: the receiver asks checksums of byte ranges
SUMS = "sums"

RANGE_FIELD = "range"  # FILE: [offset, length] of a split file that travels in this session
WHOLE_FIELD = "whole"  # SKIP / FILE_DONE of a range: this answer settles the whole file

_REQUIRED: dict[str, tuple[str, ...]] = {
    OPEN: ("v", "spec"),
    ACCEPT: ("session_id", "udp_port", "cipher", "secret", "block_payload"),
    ERROR: ("error",),
    FILE: ("id", "path", "size"),
    DIR: ("path",),
    FILE_END: ("id", "digest"),
    EOF: ("files",),
    READY: ("id", "first_block", "count", "offset"),
    SKIP: ("id", "reason"),
    FILE_DONE: ("id",),
    DONE: (),
    RATE: (),
    LINK: ("id", "path", "target"),
    LINK_DONE: ("id",),
    SUMS_REQ: ("id", "ranges"),
    SUMS: ("id",),
}


def encode(msg_type: str, **fields: Any) -> bytes:
    """One message as a UTF-8 JSON line."""
    body = {"t": msg_type, **fields}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse and check one line from the peer; anything malformed is the peer's fault."""
    if len(line) > MAX_LINE:
        raise ProtocolError("Control message too long", origin="remote")
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(
            "Malformed control message", internal_message=f"bad JSON: {exc}", origin="remote"
        ) from exc
    if not isinstance(body, dict) or not isinstance(body.get("t"), str):
        raise ProtocolError("Malformed control message", origin="remote")
    required = _REQUIRED.get(body["t"])
    if required is None:
        raise ProtocolError(
            "Unknown control message", internal_message=f"type {body['t']!r}", origin="remote"
        )
    missing = [name for name in required if name not in body]
    if missing:
        raise ProtocolError(
            "Incomplete control message",
            internal_message=f"{body['t']} lacks {', '.join(missing)}",
            origin="remote",
        )
    return body
